"""The synthesized speech corpus: transcripts (spoken digit sequences and short phrases), speakers split by voice
variant, generation with one engine process per core, and the on-disk cache (see :mod:`fewbit.workloads.data.speech`).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch

from fewbit.atomic import write_bytes, write_text
from fewbit.workloads.data.cache import keyed_dir
from fewbit.workloads.data.speech.synthesis import (
    ENGINES,
    ESPEAK_VARIANTS,
    ESPEAK_VOICES,
    FLITE_VOICES,
    SynthesisError,
    engine_version,
    find_engine,
    resample,
    synthesize,
)

SPLITS = ("train", "valid", "test")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PHRASES = (
    "yes", "no", "stop", "go", "up", "down", "left", "right", "on", "off", "cancel", "repeat that", "go back",
    "turn left", "turn right", "start again", "call home", "next one", "open the door", "close the window",
    "lights on", "lights off", "volume up", "volume down", "what time is it", "play some music", "pause",
    "set an alarm", "i'm ready", "that's correct", "that's wrong", "good morning", "good night", "thank you",
    "send a message", "read it again", "show the map", "how far is it", "it's raining", "we're done",
)

# CTC vocabulary: id 0 is the blank; characters get 1..28.
BLANK = 0
CHARACTERS = " 'abcdefghijklmnopqrstuvwxyz"
VOCAB_SIZE = 1 + len(CHARACTERS)
_CHAR_IDS = {c: i + 1 for i, c in enumerate(CHARACTERS)}


# --- text ---------------------------------------------------------------------------------------------------------


def normalize_transcript(text: str) -> str:
    """Lowercase; digits spelt out (``7`` -> ``seven``); every character other than a-z and apostrophe becomes a
    space; runs of spaces collapse; no leading or trailing space."""
    text = re.sub(r"\d", lambda m: f" {DIGIT_WORDS[int(m.group())]} ", text.lower())
    text = re.sub(r"[^a-z']+", " ", text)
    return text.strip()


def encode(text: str) -> list[int]:
    """Character ids (1..28) of a normalised transcript; any other character is an error."""
    try:
        return [_CHAR_IDS[c] for c in text]
    except KeyError as error:
        raise ValueError(f"character {error.args[0]!r} in {text!r} is not in the vocabulary {CHARACTERS!r}; "
                         "pass the text through normalize_transcript first") from None


def decode(ids: list[int]) -> str:
    """The text of character ids; blanks (0) are skipped (CTC repeats must be collapsed before, see
    :func:`fewbit.workloads.models.quartznet.greedy_decode`)."""
    return "".join(CHARACTERS[i - 1] for i in ids if i != BLANK)


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Word and character error rates (``{"wer": ..., "cer": ...}``, fractions: 0.05 is 5%) over a whole set,
    computed by jiwer as (substitutions + deletions + insertions) / reference length, summed over utterances."""
    try:
        import jiwer
    except ImportError as error:
        raise ImportError("word error rates need jiwer: pip install jiwer") from error
    if len(references) != len(hypotheses) or not references:
        raise ValueError(f"{len(references)} references and {len(hypotheses)} hypotheses: expected the same "
                         "positive count")
    if not all(references):
        raise ValueError("a reference transcript is empty; WER is undefined for it")
    return {"wer": float(jiwer.wer(references, hypotheses)), "cer": float(jiwer.cer(references, hypotheses))}


# --- the corpus ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeechCorpus:
    """Parameters of the synthesized corpus. ``phrase_share``: the fraction of utterances that are short phrases
    (:data:`PHRASES`); the others read ``min_digits``..``max_digits`` random digits. ``words_per_minute`` and
    ``pitch``: ranges drawn uniformly per utterance (eSpeak NG units). ``valid_groups``/``test_groups``: how many
    variants (eSpeak NG) or voices (flite) go to those splits; the rest are for training."""

    train_utterances: int = 4000
    valid_utterances: int = 300
    test_utterances: int = 600
    phrase_share: float = 0.25
    min_digits: int = 1
    max_digits: int = 6
    words_per_minute: tuple[int, int] = (130, 220)
    pitch: tuple[int, int] = (25, 75)
    voices: tuple[str, ...] = ESPEAK_VOICES
    variants: tuple[str, ...] = ESPEAK_VARIANTS
    valid_groups: int = 4
    test_groups: int = 6
    engine: str = "auto"
    sample_rate: int = 16000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r}; valid: {', '.join(ENGINES)}")
        if min(self.train_utterances, self.valid_utterances, self.test_utterances) < 1:
            raise ValueError("every split needs at least one utterance")
        if not 0 <= self.phrase_share <= 1 or not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"phrase_share={self.phrase_share} must lie in [0, 1] and 1 <= min_digits="
                             f"{self.min_digits} <= max_digits={self.max_digits}")
        if self.valid_groups < 1 or self.test_groups < 1:
            raise ValueError("valid_groups and test_groups must be >= 1 (speakers are held out)")

    def speaker_groups(self, engine: str) -> dict[str, tuple[str, ...]]:
        """{split: speakers}, disjoint. eSpeak NG: all voices x the split's variants; flite: the split's voices."""
        groups = list(self.variants) if engine == "espeak-ng" else list(FLITE_VOICES)
        if len(groups) < self.valid_groups + self.test_groups + 1:
            raise ValueError(f"{len(groups)} speaker groups cannot give {self.valid_groups} to valid, "
                             f"{self.test_groups} to test and at least one to train")
        random.Random(f"speakers:{self.seed}").shuffle(groups)
        chosen = {"test": groups[:self.test_groups],
                  "valid": groups[self.test_groups:self.test_groups + self.valid_groups],
                  "train": groups[self.test_groups + self.valid_groups:]}
        if engine == "flite":
            return {split: tuple(g) for split, g in chosen.items()}
        return {split: tuple(f"{voice}+{variant}" for voice in self.voices for variant in g)
                for split, g in chosen.items()}

    def utterances(self, split: str) -> int:
        return {"train": self.train_utterances, "valid": self.valid_utterances, "test": self.test_utterances}[split]


@dataclass
class SpeechSplit:
    """One split: all waveforms concatenated (int16 ``audio``; utterance i is ``audio[offsets[i]:offsets[i+1]]``),
    with their transcripts (normalised) and speakers."""

    audio: torch.Tensor
    offsets: torch.Tensor
    transcripts: list[str]
    speakers: list[str]
    sample_rate: int

    def __len__(self) -> int:
        return len(self.transcripts)

    def waveform(self, index: int) -> torch.Tensor:
        """Utterance ``index`` as float32 samples in [-1, 1)."""
        return self.audio[self.offsets[index]:self.offsets[index + 1]].float() / 32768

    def num_samples(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def hours(self) -> float:
        return float(self.offsets[-1]) / self.sample_rate / 3600


def _plan(spec: SpeechCorpus, split: str, engine: str) -> list[tuple[str, str, int, int]]:
    """(text, speaker, words per minute, pitch) for every utterance of a split: a function of the spec only."""
    rng = random.Random(f"{split}:{spec.seed}")
    speakers = spec.speaker_groups(engine)[split]
    plan = []
    for _ in range(spec.utterances(split)):
        if rng.random() < spec.phrase_share:
            text = rng.choice(PHRASES)
        else:
            text = " ".join(rng.choice(DIGIT_WORDS) for _ in range(rng.randint(spec.min_digits, spec.max_digits)))
        plan.append((text, rng.choice(speakers), rng.randint(*spec.words_per_minute), rng.randint(*spec.pitch)))
    return plan


def check_speakers(spec: SpeechCorpus, engine: str) -> None:
    """An error listing the voices or variants that the installed eSpeak NG lacks (it would silently speak them
    with its default voice, mislabelling the speakers). flite voices are built in and not checked."""
    if engine != "espeak-ng":
        return
    listing = subprocess.run(["espeak-ng", "--voices"], capture_output=True, text=True, timeout=30).stdout
    variants = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, timeout=30).stdout
    known_voices = {line.split()[1] for line in listing.splitlines()[1:] if len(line.split()) > 1}
    known_variants = set()  # a variant is named by its VoiceName or its file name
    for line in variants.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 4:
            known_variants |= {fields[3], fields[4].removeprefix("!v/")}
    missing = sorted(set(spec.voices) - known_voices) + sorted(f"+{v}" for v in set(spec.variants) - known_variants)
    if missing:
        raise SynthesisError(f"eSpeak NG does not know {', '.join(missing)}; list them with `espeak-ng --voices` and "
                             "`espeak-ng --voices=variant`, or reinstall with `apt-get install --reinstall "
                             "espeak-ng-data`")


def generate(spec: SpeechCorpus, progress: bool = True) -> dict[str, SpeechSplit]:
    """Synthesize the corpus (no cache): one engine process per core, resampled to ``spec.sample_rate``."""
    engine = find_engine(spec.engine)
    check_speakers(spec, engine)
    plans = {split: _plan(spec, split, engine) for split in SPLITS}
    total = sum(len(p) for p in plans.values())
    splits = {}
    with _progress(progress) as bar, ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        task = bar.add_task(f"synthesizing speech with {engine}", total=total) if bar else None
        for split, plan in plans.items():
            waves = []
            jobs = pool.map(lambda job: synthesize(job[0], job[1], job[2], job[3], engine), plan)
            for samples, rate in jobs:
                wave = resample(torch.from_numpy(samples.astype(np.float32)), rate, spec.sample_rate)
                waves.append(wave.round().clamp(-32768, 32767).to(torch.int16))
                if bar:
                    bar.advance(task)
            offsets = torch.tensor([0] + [len(w) for w in waves]).cumsum(0)
            transcripts = [normalize_transcript(text) for text, *_ in plan]
            speakers = [speaker for _, speaker, *_ in plan]
            splits[split] = SpeechSplit(torch.cat(waves), offsets, transcripts, speakers, spec.sample_rate)
    return splits


def _progress(enabled: bool):
    from contextlib import nullcontext

    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    transient=True)


def load(spec: SpeechCorpus | None = None, progress: bool = True) -> dict[str, SpeechSplit]:
    """The corpus from the cache, or synthesized (and cached) on first use. The cache key holds the parameters,
    the engine chosen and its version, so upgrading eSpeak NG regenerates rather than mixing audio."""
    from safetensors.torch import load_file, save

    spec = spec or SpeechCorpus()
    engine = find_engine(spec.engine)
    params = {"corpus": "speech", **asdict(spec), "engine": engine, "engine_version": engine_version(engine)}
    directory = keyed_dir("speech", params)
    files = {s: (directory / f"{s}.safetensors", directory / f"{s}.tsv") for s in SPLITS}
    if not all(audio.exists() and text.exists() for audio, text in files.values()):
        for split, data in generate(spec, progress).items():
            audio_file, text_file = files[split]
            write_bytes(audio_file, save({"audio": data.audio, "offsets": data.offsets},
                                         metadata={"sample_rate": str(data.sample_rate)}))
            write_text(text_file, "".join(f"{s}\t{t}\n" for s, t in zip(data.speakers, data.transcripts,
                                                                         strict=True)))
    splits = {}
    for split, (audio_file, text_file) in files.items():
        tensors = load_file(audio_file)
        rows = [line.split("\t") for line in text_file.read_text(encoding="utf-8").splitlines()]
        if any(len(r) != 2 for r in rows) or len(rows) + 1 != len(tensors["offsets"]):
            raise ValueError(f"{directory}: {split} audio and transcripts disagree; delete the folder to regenerate")
        splits[split] = SpeechSplit(tensors["audio"], tensors["offsets"], [t for _, t in rows], [s for s, _ in rows],
                                    spec.sample_rate)
    return splits


def batches_by_length(lengths: list[int] | torch.Tensor, batch_size: int,
                      generator: torch.Generator | None = None) -> list[list[int]]:
    """Index batches of similar lengths (less padding, so faster on CPU). With a generator: indices shuffled, then
    sorted by length within windows of 50 batches, and the batches shuffled; without: sorted by length."""
    lengths = torch.as_tensor(lengths)
    if generator is None:
        order = torch.argsort(lengths, stable=True).tolist()
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    order = torch.randperm(len(lengths), generator=generator)
    window = 50 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)].tolist()
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


__all__ = ["BLANK", "CHARACTERS", "SPLITS", "VOCAB_SIZE", "SpeechCorpus", "SpeechSplit", "batches_by_length",
           "check_speakers", "decode", "encode", "error_rates", "generate", "load", "normalize_transcript"]
