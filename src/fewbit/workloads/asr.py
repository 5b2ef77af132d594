"""``asr``: speech recognition with a QuartzNet-style CTC encoder on synthesized speech, scored by word error rate.

Data (:mod:`fewbit.workloads.data.speech`): spoken digit sequences and short phrases synthesized offline with eSpeak NG
(``apt-get install espeak-ng``; flite as the fallback) across accents, voices, speaking rates and pitches, the test
speakers' voices never heard in training; synthesized once and cached. Training reads batches of utterances of
similar length, each with random speed perturbation and noise, as normalised log-mel features computed in torch.

Model (:mod:`fewbit.workloads.models.quartznet`): time-channel separable 1D convolutions with residual blocks,
BatchNorm, dropout; CTC loss; greedy CTC decoding. ``width`` sets the channels (``width`` in the first three
blocks, 1.5x in the last two, 2x in the epilogue), ``repeat`` the sub-blocks per block.

The metric is the word error rate ``wer`` in percent (jiwer, over the whole split; lower is better); evaluations also
report the character error rate ``cer`` (percent) and the CTC ``loss``.
"""

from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fewbit.workloads.base import (
    Model,
    Samples,
    Source,
    TrainSettings,
    Workload,
    batch_generator,
    limited,
    model_device,
)
from fewbit.workloads.data import speech
from fewbit.workloads.models.quartznet import QuartzNet, QuartzNetConfig, ctc_loss, greedy_decode


@dataclass(frozen=True)
class ASRConfig(TrainSettings):
    engine: str = "auto"  # speech synthesizer: auto (espeak-ng, else flite), espeak-ng or flite
    train_utterances: int = 4000
    valid_utterances: int = 300
    test_utterances: int = 600
    phrase_share: float = 0.25
    max_digits: int = 6
    n_mels: int = 64
    width: int = 128
    repeat: int = 2
    dropout: float = 0.1
    augment: bool = True
    speed_min: float = 0.9
    speed_max: float = 1.1
    snr_min: float = 10.0  # dB
    snr_max: float = 40.0
    eval_batch_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.engine not in speech.ENGINES:
            raise ValueError(f"engine={self.engine!r}; valid: {', '.join(speech.ENGINES)}")
        if min(self.n_mels, self.width, self.repeat, self.eval_batch_size) < 1:
            raise ValueError(f"n_mels={self.n_mels}, width={self.width}, repeat={self.repeat} and eval_batch_size="
                             f"{self.eval_batch_size} must be >= 1")
        if not 0 < self.speed_min <= self.speed_max or self.snr_min > self.snr_max:
            raise ValueError(f"need 0 < speed_min={self.speed_min} <= speed_max={self.speed_max} and snr_min="
                             f"{self.snr_min} <= snr_max={self.snr_max}")

    def corpus(self) -> speech.SpeechCorpus:
        return speech.SpeechCorpus(train_utterances=self.train_utterances, valid_utterances=self.valid_utterances,
                                   test_utterances=self.test_utterances, phrase_share=self.phrase_share,
                                   max_digits=self.max_digits, engine=self.engine, seed=self.data_seed)


class SpeechRecognition(Workload):
    name = "asr"
    description = "QuartzNet-style CTC encoder on speech synthesized with eSpeak NG; word error rate (jiwer)"
    metric = "wer"
    higher_is_better = False
    secondary = "cer"
    Config = ASRConfig

    @classmethod
    def sources(cls) -> list[Source]:
        return [
            Source("espeak-ng", "digits and phrases synthesized with eSpeak NG", shutil.which("espeak-ng") is not None,
                   speech.INSTALL_HINT),
            Source("flite", "the same, synthesized with flite (fewer voices)", shutil.which("flite") is not None,
                   "apt-get install flite"),
        ]

    def _setup(self) -> None:
        c = self.config
        self.mel = speech.MelSpec(n_mels=c.n_mels)
        self.splits = speech.load(c.corpus(), progress=sys.stderr.isatty())
        self.frames = {split: self.mel.frames(data.num_samples()) for split, data in self.splits.items()}
        # Batches per pass: batches_by_length cuts windows of 50 batches, so every pass has ceil(N / batch_size).
        self.batches_per_pass = math.ceil(len(self.splits["train"]) / c.batch_size)
        self._epoch: tuple[int, int, list[list[int]]] | None = None

    def info(self) -> dict:
        return {"engine": speech.find_engine(self.config.engine),
                **{f"{split}_utterances": len(data) for split, data in self.splits.items()},
                **{f"{split}_hours": round(data.hours(), 3) for split, data in self.splits.items()}}

    def build_model(self) -> nn.Module:
        c = self.config
        torch.manual_seed(c.seed)
        wide = c.width * 3 // 2
        return QuartzNet(QuartzNetConfig(
            vocab_size=speech.VOCAB_SIZE, n_mels=c.n_mels, prologue=(c.width, 33),
            blocks=((c.width, 13), (c.width, 15), (c.width, 17), (wide, 21), (wide, 25)), repeat=c.repeat,
            epilogue=(2 * c.width, 29, 2 * c.width), dropout=c.dropout))

    def _batches(self, epoch: int, micro: int) -> list[list[int]]:
        """Index batches of one pass over the training split, utterances of similar length together."""
        if self._epoch is None or self._epoch[:2] != (epoch, micro):
            generator = torch.Generator().manual_seed((self.config.seed * 1_000_003 + epoch) * 64 + micro)
            batches = speech.batches_by_length(self.frames["train"], self.config.batch_size, generator)
            self._epoch = (epoch, micro, batches)
        return self._epoch[2]

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, ...]:
        """(features (B, n_mels, T), frames (B,), targets (sum of lengths,), target lengths (B,)). Step s reads
        batch s mod n of pass s // n over the training split (one pass per micro-batch index)."""
        c = self.config
        n = self.batches_per_pass
        indices = self._batches(step // n, micro)[step % n]
        generator = batch_generator(c.seed, step, micro)
        data = self.splits["train"]
        waves = [data.waveform(i) for i in indices]
        if c.augment:
            waves = [speech.augment(w, generator, speed=(c.speed_min, c.speed_max), snr_db=(c.snr_min, c.snr_max))
                     for w in waves]
        return self._encode(waves, [data.transcripts[i] for i in indices])

    def _encode(self, waves: list[torch.Tensor], transcripts: list[str]) -> tuple[torch.Tensor, ...]:
        feats, frames = speech.features(waves, self.mel)
        targets = [speech.encode(t) for t in transcripts]
        return (feats, frames, torch.tensor([i for t in targets for i in t], dtype=torch.long),
                torch.tensor([len(t) for t in targets], dtype=torch.long))

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        feats, frames, targets, target_lengths = batch
        return ctc_loss(model(feats), QuartzNet.output_lengths(frames), targets, target_lengths)

    def samples(self, split: str, limit: int = 0) -> UtteranceSamples:
        self.check_split(split)
        data = self.splits[split]
        count = limited(split, len(data), limit)
        return UtteranceSamples(split, data, self.frames[split][:count], self._encode)

    def predict(self, model: Model, inputs: tuple[torch.Tensor, ...]) -> list[tuple[str, float]]:
        """Per utterance: (greedy CTC transcript, CTC loss of the reference divided by its length). ``inputs`` as
        :meth:`batch` gives them; decoding reads only the features, the targets are there for the loss."""
        feats, frames, targets, target_lengths = (t.to(model_device(model)) for t in inputs)
        logits = model(feats)
        lengths = QuartzNet.output_lengths(frames)
        losses = ctc_loss(logits, lengths, targets, target_lengths, reduction="none")
        return [(speech.decode(ids), loss)
                for ids, loss in zip(greedy_decode(logits, lengths), losses.tolist(), strict=True)]

    def score(self, outputs, references) -> dict[str, float]:
        """Word and character error rates in percent (jiwer) and the mean per-utterance CTC loss."""
        rates = speech.error_rates(list(references), [o[0] for o in outputs])
        return {"wer": 100.0 * rates["wer"], "cer": 100.0 * rates["cer"],
                "loss": sum(o[1] for o in outputs) / len(outputs), "utterances": float(len(outputs))}

    def transcribe(self, model: nn.Module, split: str = "test", n: int = 3) -> list[tuple[str, str]]:
        """(reference, hypothesis) for the first ``n`` utterances of a split."""
        data = self.splits[split]
        model.eval()
        feats, frames, _, _ = self._encode([data.waveform(i) for i in range(n)], data.transcripts[:n])
        with torch.no_grad():
            logits = model(feats.to(model_device(model)))
        decoded = greedy_decode(logits, QuartzNet.output_lengths(frames))
        return [(data.transcripts[i], speech.decode(ids)) for i, ids in enumerate(decoded)]


@dataclass
class UtteranceSamples(Samples):
    """The first ``len(frames)`` utterances of a split, as features with their transcripts."""

    split: str
    data: speech.SpeechSplit
    frames: list[int]
    encode: Callable[[list[torch.Tensor], list[str]], tuple[torch.Tensor, ...]]  # the workload's, as batch() uses

    def __len__(self) -> int:
        return len(self.frames)

    def inputs(self, indices) -> tuple[torch.Tensor, ...]:
        """(features (B, n_mels, T), frames (B,), targets, target lengths (B,)), as :meth:`batch` gives them."""
        return self.encode([self.data.waveform(i) for i in indices], [self.data.transcripts[i] for i in indices])

    def references(self, indices) -> list[str]:
        return [self.data.transcripts[i] for i in indices]

    def batches(self, batch_size: int) -> list[list[int]]:
        """Utterances of similar length together (less padding)."""
        return speech.batches_by_length(self.frames, batch_size)


__all__ = ["ASRConfig", "SpeechRecognition", "UtteranceSamples"]
