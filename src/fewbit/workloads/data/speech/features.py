"""Log-mel features (pre-emphasis, Hann STFT, HTK mel filterbank, log, per-utterance normalisation) and training
augmentation (speed change and noise, seeded)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

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


__all__ = ["MelSpec", "augment", "features", "hz_to_mel", "log_mel", "mel_filterbank", "mel_to_hz", "normalize"]
