"""Offline speech recognition data: spoken digit sequences and short phrases synthesized with eSpeak NG (or flite).

**Speakers.** An eSpeak NG speaker is a base voice (an accent: ``en-us``, ``en-gb-x-rp``, ``en-gb-scotland`` ...)
combined with a variant (a timbre: formants, pitch range, breathiness: ``m3``, ``f2``, ``klatt2`` ...), written
``en-us+m3``. The *variants* are split between train, valid and test with the seed, so no test speaker's timbre was
heard in training; the eight accents are shared, as there are too few to split. Each utterance also draws its own
speaking rate (words per minute) and pitch. With flite (the fallback) a speaker is one of its built-in voices and
the voices themselves are split.

**Audio.** The engine writes 16-bit PCM WAV (22,050 Hz for eSpeak NG) to stdout; it is resampled in torch to
``sample_rate`` (16 kHz) by windowed-sinc interpolation (:func:`resample`), and stored as int16.

**Cache.** Each split is a safetensors file (all utterances concatenated into one int16 tensor, plus offsets) and a
TSV file (speaker, transcript), written atomically under a folder keyed by the corpus parameters and the engine's
version (:mod:`fewbit.workloads.cache`). Generation runs one engine process per core.

**Features.** :func:`log_mel`: pre-emphasis, a Hann-windowed STFT (25 ms windows, 10 ms hop), power spectrum, a
triangular mel filterbank (:func:`mel_filterbank`, HTK mel scale), log, then per-utterance normalisation of each
mel channel (:func:`normalize`). :func:`augment` (training only) changes the speed and adds noise, seeded.

**Text.** Transcripts are normalised to lowercase letters, space and apostrophe; :func:`encode` maps them to ids
1..28 for CTC, with 0 the blank. :func:`error_rates` gives word and character error rates with jiwer.
"""

from __future__ import annotations

import functools
import math
import os
import random
import re
import shutil
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from fewbit.atomic import write_bytes, write_text
from fewbit.workloads.base import DataError
from fewbit.workloads.cache import keyed_dir

SPLITS = ("train", "valid", "test")
ENGINES = ("auto", "espeak-ng", "flite")
INSTALL_HINT = "apt-get install espeak-ng"

# eSpeak NG's English accents (mbrola voices excluded: they need extra packages).
ESPEAK_VOICES = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
                 "en-us-nyc")
# Variants with intelligible, distinct timbres (whisper, croak and the robot voices are left out).
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2",
                   "klatt3", "klatt4", "Alex", "Andy", "Annie", "belinda", "benjamin", "david", "edward", "iven",
                   "john", "linda", "max", "Michael", "norbert", "paul", "quincy", "rob", "robert", "steph", "travis",
                   "victor", "Zac", "grandma", "grandpa")
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")

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


class SynthesisError(DataError):
    """The speech synthesizer is missing or failed; the message says how to fix it."""


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
    :func:`fewbit.workloads.quartznet.greedy_decode`)."""
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


# --- synthesis ----------------------------------------------------------------------------------------------------


def find_engine(preferred: str = "auto") -> str:
    """The synthesizer to use: ``"espeak-ng"`` if installed (or asked for), else ``"flite"``; an error naming the
    install command when neither is on PATH."""
    if preferred not in ENGINES:
        raise ValueError(f"engine={preferred!r}; valid: {', '.join(ENGINES)}")
    candidates = ("espeak-ng", "flite") if preferred == "auto" else (preferred,)
    for engine in candidates:
        if shutil.which(engine):
            return engine
    raise SynthesisError(f"speech synthesis needs {' or '.join(candidates)} on PATH, which is missing; install it "
                         f"with `{INSTALL_HINT}`" + ("" if preferred != "flite" else " or `apt-get install flite`"))


def engine_version(engine: str) -> str:
    result = subprocess.run([engine, "--version"], capture_output=True, text=True, timeout=30)
    return (result.stdout or result.stderr).strip().splitlines()[0] if result.returncode == 0 else "unknown"


def parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Mono 16-bit PCM samples and the sample rate of a WAV file's bytes. The RIFF and data sizes are not trusted:
    a WAV written to a pipe has no way to know them, and eSpeak NG writes 0x7fffffff there; the data chunk is taken
    to run to the end of the bytes."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise SynthesisError(f"the synthesizer did not write a WAV file (first bytes {data[:12]!r})")
    position, rate = 12, None
    while position + 8 <= len(data):
        chunk, size = data[position:position + 4], struct.unpack("<I", data[position + 4:position + 8])[0]
        body = position + 8
        if chunk == b"fmt ":
            audio_format, channels, rate = struct.unpack("<HHI", data[body:body + 8])
            bits = struct.unpack("<H", data[body + 14:body + 16])[0]
            if (audio_format, channels, bits) != (1, 1, 16):
                raise SynthesisError(f"expected mono 16-bit PCM WAV, got format {audio_format}, {channels} channels, "
                                     f"{bits} bits")
        elif chunk == b"data":
            if rate is None:
                raise SynthesisError("WAV data chunk before its fmt chunk")
            end = min(len(data), body + size)
            end -= (end - body) % 2
            return np.frombuffer(data[body:end], dtype="<i2").astype(np.int16), rate
        position = body + size + (size % 2)
    raise SynthesisError("WAV file without a data chunk")


def synthesize(text: str, speaker: str, words_per_minute: int = 175, pitch: int = 50,
               engine: str = "espeak-ng") -> tuple[np.ndarray, int]:
    """One utterance: int16 samples and their sample rate. ``speaker``: ``voice+variant`` for eSpeak NG (e.g.
    ``en-gb-x-rp+f3``), a voice name for flite. ``pitch``: eSpeak NG's 0..99 scale (50 is the voice's normal
    pitch); flite maps it to a mean F0 of 70 + 1.3 * pitch Hz."""
    if engine == "espeak-ng":
        command = ["espeak-ng", "-v", speaker, "-s", str(words_per_minute), "-p", str(pitch), "--stdout", text]
    elif engine == "flite":
        stretch = 175 / words_per_minute  # flite's speed control is a duration factor
        command = ["flite", "-voice", speaker, "--setf", f"duration_stretch={stretch:.3f}", "--setf",
                   f"int_f0_target_mean={70 + 1.3 * pitch:.0f}", "-t", text, "-o", "/dev/stdout"]
    else:
        raise ValueError(f"engine={engine!r}; valid: espeak-ng, flite")
    try:
        result = subprocess.run(command, capture_output=True, timeout=60)
    except FileNotFoundError:
        raise SynthesisError(f"{engine} is not installed; install it with `{INSTALL_HINT}`") from None
    if result.returncode != 0 or not result.stdout:
        raise SynthesisError(f"{' '.join(command)} failed (exit {result.returncode}): "
                             f"{result.stderr.decode(errors='replace').strip()[:500]}")
    return parse_wav(result.stdout)


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int, zero_crossings: int = 16,
             rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited resampling of (..., L) samples by windowed-sinc interpolation; returns (..., ceil(L * new /
    orig)) samples.

    Output sample m sits at input time t = m * orig / new (in input samples) and is sum_n x[n] h(t - n) with the
    low-pass kernel h(u) = beta * sinc(beta * u) * cos^2(pi * beta * u / (2 * Z)) for |beta * u| < Z (else 0),
    sinc(v) = sin(pi v) / (pi v). beta = rolloff * min(orig, new) / orig is the cut-off as a fraction of the input
    Nyquist frequency (just below the output's Nyquist when downsampling, so nothing aliases); Z =
    ``zero_crossings`` of the sinc on each side, under a Hann window. With Z = 16 a tone at half the lower Nyquist
    frequency comes out within 1e-4 of its amplitude, at 0.8 of it within 0.3%. Cost: 2 Z / beta + o
    multiply-adds per output sample, about 500 for 22,050 -> 16,000 Hz. With g = gcd(orig, new), o =
    orig / g and n = new / g, the output repeats in blocks of n samples every o input samples, so the sum is one
    GEMM: the input's strided windows (blocks, K) times the (K, n) kernel of the n phases. Samples outside the
    input count as zero.
    """
    if orig_rate == new_rate:
        return wave.clone()
    kernel, orig, new, width = _sinc_kernel(orig_rate, new_rate, zero_crossings, rolloff)
    shape, length = wave.shape[:-1], wave.shape[-1]
    x = F.pad(wave.reshape(-1, length).to(torch.float32), (width, width + orig))
    windows = x.unfold(-1, kernel.shape[1], orig)  # (B, blocks, K): block q starts at input sample q * orig - width
    y = (windows @ kernel.T).reshape(x.shape[0], -1)  # (B, blocks * new): y[b, q * new + j] = output q * new + j
    return y[:, :math.ceil(length * new / orig)].reshape(*shape, -1)


@functools.lru_cache(maxsize=8)
def _sinc_kernel(orig_rate: int, new_rate: int, zero_crossings: int,
                 rolloff: float) -> tuple[torch.Tensor, int, int, int]:
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    beta = rolloff * min(orig, new) / orig
    width = math.ceil(zero_crossings / beta)  # taps on each side beyond the block
    taps = torch.arange(-width, orig + width, dtype=torch.float64)  # input offsets k from the block start
    phases = torch.arange(new, dtype=torch.float64)[:, None] * orig / new  # t of each output phase in the block
    u = (phases - taps) * beta  # (new, 2 * width + orig), in sinc zero-crossing units
    window = torch.where(u.abs() < zero_crossings, torch.cos(math.pi * u / (2 * zero_crossings)) ** 2, 0.0)
    kernel = (beta * torch.sinc(u) * window).to(torch.float32)  # (new, K)
    return kernel, orig, new, width


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


# --- features and augmentation ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MelSpec:
    """Log-mel feature settings: 25 ms Hann windows every 10 ms at 16 kHz, a 512-point FFT (257 bins, 31.25 Hz
    apart), 64 mel bands over 0..8000 Hz, pre-emphasis y[t] = x[t] - 0.97 x[t-1] (flattens speech's spectral tilt)."""

    sample_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float | None = None  # None: sample_rate / 2
    preemphasis: float = 0.97

    def __post_init__(self) -> None:
        if not 0 < self.win_length <= self.n_fft or self.hop_length < 1:
            raise ValueError(f"need 0 < win_length={self.win_length} <= n_fft={self.n_fft} and hop_length >= 1")

    def frames(self, num_samples: int | torch.Tensor) -> int | torch.Tensor:
        """Frames of a centred STFT: one per hop, the first centred on sample 0: 1 + floor(L / hop)."""
        return 1 + num_samples // self.hop_length


def hz_to_mel(hz: torch.Tensor | float) -> torch.Tensor:
    """HTK mel scale: m = 2595 * log10(1 + f / 700)."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(hz, dtype=torch.float64) / 700.0)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """Triangular filters (n_mels, n_fft // 2 + 1) on the FFT bins, unit peak height.

    The n_mels + 2 edge frequencies are equally spaced on the mel scale from f_min to f_max; filter i rises
    linearly from edge i to edge i + 1 and falls to edge i + 2, evaluated at bin frequencies k * sample_rate /
    n_fft. Values are computed in float64 and returned in float32.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min={f_min} < f_max={f_max} <= sample_rate / 2 = {sample_rate / 2}")
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2,
                                     dtype=torch.float64))
    bins = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (center - lower)
    falling = (upper - bins) / (upper - center)
    return torch.minimum(rising, falling).clamp(min=0).to(torch.float32)


def log_mel(wave: torch.Tensor, spec: MelSpec | None = None) -> torch.Tensor:
    """Log-mel energies of (L,) or (B, L) float samples: (n_mels, frames) or (B, n_mels, frames), with frames =
    ``spec.frames(L)``. log(mel power + 2^-24): the floor keeps silence finite (about -16.6) and is far below any
    real energy of 16-bit audio. Not normalised (see :func:`normalize`)."""
    spec = spec or MelSpec()
    x = _preemphasize(wave.float(), spec.preemphasis)
    window = torch.hann_window(spec.win_length, periodic=True, device=x.device)
    stft = torch.stft(x, spec.n_fft, spec.hop_length, spec.win_length, window, center=True, pad_mode="constant",
                      return_complex=True)  # (..., n_fft // 2 + 1, frames)
    power = stft.real**2 + stft.imag**2
    bank = mel_filterbank(spec.n_mels, spec.n_fft, spec.sample_rate, spec.f_min, spec.f_max).to(x.device)
    return torch.log(torch.matmul(bank, power) + 2.0**-24)


def _preemphasize(x: torch.Tensor, coefficient: float) -> torch.Tensor:
    if not coefficient:
        return x
    return torch.cat([x[..., :1], x[..., 1:] - coefficient * x[..., :-1]], dim=-1)


def normalize(features: torch.Tensor, lengths: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Per utterance and mel channel: subtract the mean over the valid frames, divide by their standard deviation
    (+ ``eps``, so a constant channel stays finite). ``features`` (n_mels, T) or (B, n_mels, T); frames at or past
    ``lengths`` are set to zero."""
    squeeze = features.ndim == 2
    x = features[None] if squeeze else features
    frames = x.shape[-1]
    lengths = torch.full((x.shape[0],), frames) if lengths is None else lengths
    valid = (torch.arange(frames, device=x.device) < lengths.to(x.device)[:, None])[:, None, :]  # (B, 1, T)
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = (x * valid).sum(-1, keepdim=True) / count
    var = (((x - mean) * valid) ** 2).sum(-1, keepdim=True) / (count - 1).clamp(min=1)
    x = torch.where(valid, (x - mean) / (var.sqrt() + eps), 0.0)
    return x[0] if squeeze else x


def features(waves: list[torch.Tensor], spec: MelSpec | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch of normalised log-mel features (B, n_mels, T_max) and the frame counts (B,) of float
    waveforms of any lengths."""
    spec = spec or MelSpec()
    if not waves:
        raise ValueError("features of an empty batch")
    lengths = torch.tensor([spec.frames(len(w)) for w in waves])
    padded = torch.zeros(len(waves), max(len(w) for w in waves))
    for i, w in enumerate(waves):
        padded[i, :len(w)] = _preemphasize(w.float(), spec.preemphasis)  # before padding: nothing leaks into it
    # The zeros past an utterance's end are what the centred STFT's constant padding would put there anyway, so each
    # utterance's valid frames equal its features computed alone; frames past its length are zeroed by normalize.
    return normalize(log_mel(padded, replace(spec, preemphasis=0.0)), lengths), lengths


def augment(wave: torch.Tensor, generator: torch.Generator, speed: tuple[float, float] = (0.9, 1.1),
            snr_db: tuple[float, float] = (10.0, 40.0)) -> torch.Tensor:
    """Speed perturbation and additive white noise for one float waveform (L,), drawn from ``generator``.

    Speed: a factor s uniform in ``speed`` plays the audio s times faster by linear interpolation to round(L / s)
    samples (pitch moves with it, as in Kaldi's speed perturbation). Noise: Gaussian with power P_signal /
    10^(SNR/10), SNR uniform in ``snr_db`` decibels. A silent waveform stays silent.
    """
    factor = speed[0] + (speed[1] - speed[0]) * torch.rand((), generator=generator).item()
    if factor != 1.0:
        length = max(1, round(wave.shape[-1] / factor))
        wave = F.interpolate(wave[None, None], size=length, mode="linear", align_corners=True)[0, 0]
    snr = snr_db[0] + (snr_db[1] - snr_db[0]) * torch.rand((), generator=generator).item()
    noise_power = wave.pow(2).mean() / 10 ** (snr / 10)
    return wave + noise_power.sqrt() * torch.randn(wave.shape, generator=generator)


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


__all__ = ["BLANK", "CHARACTERS", "VOCAB_SIZE", "MelSpec", "SpeechCorpus", "SpeechSplit", "SynthesisError", "augment",
           "batches_by_length", "decode", "encode", "error_rates", "features", "find_engine", "generate", "load",
           "log_mel", "mel_filterbank", "normalize", "normalize_transcript", "resample", "synthesize"]
