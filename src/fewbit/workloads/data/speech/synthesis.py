"""Speech synthesis with eSpeak NG (or flite) as a subprocess, WAV parsing, and windowed-sinc resampling.

An eSpeak NG speaker is a base voice (an accent) combined with a variant (a timbre), written ``en-us+m3``; the
engine writes 16-bit PCM WAV to stdout, resampled in torch to the corpus rate by :func:`resample`.
"""

from __future__ import annotations

import functools
import math
import shutil
import struct
import subprocess

import numpy as np
import torch
import torch.nn.functional as F

from fewbit.workloads.base import DataError

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


class SynthesisError(DataError):
    """The speech synthesizer is missing or failed; the message says how to fix it."""




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


__all__ = ["ENGINES", "ESPEAK_VARIANTS", "ESPEAK_VOICES", "FLITE_VOICES", "INSTALL_HINT", "SynthesisError",
           "engine_version", "find_engine", "parse_wav", "resample", "synthesize"]
