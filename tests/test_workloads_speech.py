"""Synthesized speech data: features against references written from their definitions, resampling, text,
synthesis with held-out speakers, and the cache."""

from __future__ import annotations

import math
import shutil
import struct

import numpy as np
import pytest
import torch

from fewbit.workloads.data import speech
from fewbit.workloads.data.speech import MelSpec, SpeechCorpus, SynthesisError

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs `apt-get install espeak-ng`")
TINY = SpeechCorpus(train_utterances=6, valid_utterances=3, test_utterances=3, max_digits=3, seed=1)


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWBIT_CACHE", str(tmp_path / "cache"))


# --- features -----------------------------------------------------------------------------------------------------


def slow_mel_filterbank(n_mels, n_fft, sample_rate, f_min, f_max):
    """Triangles from the definition, one bin at a time, in Python floats."""
    def mel(f):
        return 2595 * math.log10(1 + f / 700)

    def hz(m):
        return 700 * (10 ** (m / 2595) - 1)

    step = (mel(f_max) - mel(f_min)) / (n_mels + 1)
    edges = [hz(mel(f_min) + i * step) for i in range(n_mels + 2)]
    bank = np.zeros((n_mels, n_fft // 2 + 1))
    for i in range(n_mels):
        left, center, right = edges[i:i + 3]
        for k in range(n_fft // 2 + 1):
            f = k * sample_rate / n_fft
            if left < f <= center:
                bank[i, k] = (f - left) / (center - left)
            elif center < f < right:
                bank[i, k] = (right - f) / (right - center)
    return bank


@pytest.mark.parametrize(("n_mels", "n_fft", "rate", "f_min", "f_max"),
                         [(64, 512, 16000, 0.0, 8000.0), (40, 400, 16000, 20.0, 7600.0), (80, 1024, 22050, 0.0, 11025)])
def test_mel_filterbank_matches_the_definition(n_mels, n_fft, rate, f_min, f_max):
    bank = speech.mel_filterbank(n_mels, n_fft, rate, f_min, f_max)
    assert bank.shape == (n_mels, n_fft // 2 + 1) and bank.dtype == torch.float32
    np.testing.assert_allclose(bank.numpy(), slow_mel_filterbank(n_mels, n_fft, rate, f_min, f_max), atol=1e-6)
    with pytest.raises(ValueError, match="f_max"):
        speech.mel_filterbank(n_mels, n_fft, rate, 0, rate)


@pytest.mark.parametrize("num_samples", [1, 159, 160, 16000, 23456])
def test_log_mel_framing_matches_a_numpy_stft(num_samples):
    """Centred frames: zero padding of n_fft / 2 on both sides, one frame per hop, the 400-sample Hann window in
    the middle of the 512-sample FFT."""
    spec = MelSpec()
    torch.manual_seed(0)
    wave = torch.randn(num_samples) * 0.1
    out = speech.log_mel(wave, spec)
    frames = 1 + num_samples // spec.hop_length
    assert out.shape == (spec.n_mels, frames) == (spec.n_mels, spec.frames(num_samples))

    x = wave.double().numpy()
    x = np.concatenate([x[:1], x[1:] - spec.preemphasis * x[:-1]])
    x = np.pad(x, spec.n_fft // 2)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(spec.win_length) / spec.win_length)  # periodic
    window = np.zeros(spec.n_fft)
    offset = (spec.n_fft - spec.win_length) // 2
    window[offset:offset + spec.win_length] = hann
    columns = [np.abs(np.fft.rfft(x[t * spec.hop_length:t * spec.hop_length + spec.n_fft] * window)) ** 2
               for t in range(frames)]
    bank = slow_mel_filterbank(spec.n_mels, spec.n_fft, spec.sample_rate, 0, spec.sample_rate / 2)
    expected = np.log(bank @ np.stack(columns, axis=1) + 2.0**-24)
    np.testing.assert_allclose(out.numpy(), expected, atol=2e-3, rtol=1e-4)
    assert speech.log_mel(wave[None].repeat(2, 1), spec).shape == (2, spec.n_mels, frames)


def test_normalize_and_batched_features():
    torch.manual_seed(0)
    waves = [torch.randn(n) * 0.1 for n in (3000, 8000, 5121)]
    batch, lengths = speech.features(waves)
    assert batch.shape == (3, 64, 51) and lengths.tolist() == [19, 51, 33]
    for wave, row, length in zip(waves, batch, lengths, strict=True):
        alone = speech.normalize(speech.log_mel(wave))
        torch.testing.assert_close(row[:, :length], alone, atol=1e-4, rtol=1e-4)  # padding changes nothing
        assert row[:, length:].abs().max() == 0 if length < batch.shape[-1] else True
        assert row[:, :length].mean(-1).abs().max() < 1e-5
        torch.testing.assert_close(row[:, :length].std(-1), torch.ones(64), atol=1e-3, rtol=0)
    assert torch.isfinite(speech.normalize(torch.zeros(64, 10))).all()  # silence stays finite


@pytest.mark.parametrize(("orig", "new"), [(22050, 16000), (16000, 22050), (8000, 16000)])
def test_resample_keeps_tones_in_band_and_removes_those_above(orig, new):
    t_in = torch.arange(2 * orig, dtype=torch.float64) / orig  # float64: float32 times would be off by 1e-7 s
    t_out = torch.arange(2 * new, dtype=torch.float64) / new
    nyquist = min(orig, new) / 2
    for fraction, tolerance in ((0.05, 1e-4), (0.25, 1e-4), (0.5, 3e-4), (0.8, 5e-3)):
        freq = fraction * nyquist
        out = speech.resample(torch.sin(2 * math.pi * freq * t_in), orig, new)
        assert out.shape == (2 * new,) and out.dtype == torch.float32
        edge = new // 50  # the first and last 20 ms see the zeros outside the signal
        error = (out - torch.sin(2 * math.pi * freq * t_out))[edge:-edge].abs().max()
        assert error < tolerance, (freq, error)
    if new < orig:  # a tone above the new Nyquist frequency must not alias back in
        alias = speech.resample(torch.sin(2 * math.pi * 0.45 * orig * t_in), orig, new)
        assert alias[new // 50:-new // 50].pow(2).mean().sqrt() < 1e-2
    assert speech.resample(torch.ones(3, 441), orig, new).shape == (3, math.ceil(441 * new / orig))


def test_augment_is_seeded_and_does_what_it_says():
    torch.manual_seed(0)
    wave = torch.sin(2 * math.pi * 300 * torch.arange(16000) / 16000)
    a = speech.augment(wave, torch.Generator().manual_seed(3), speed=(0.8, 1.25), snr_db=(20, 20))
    b = speech.augment(wave, torch.Generator().manual_seed(3), speed=(0.8, 1.25), snr_db=(20, 20))
    assert torch.equal(a, b)
    assert 12800 - 1 <= len(a) <= 20000 + 1 and len(a) != 16000
    same_speed = speech.augment(wave, torch.Generator().manual_seed(3), speed=(1.0, 1.0), snr_db=(20, 20))
    noise = same_speed - wave
    snr = 10 * math.log10(wave.pow(2).mean() / noise.pow(2).mean())
    assert snr == pytest.approx(20, abs=0.3)
    silence = torch.zeros(100)
    assert torch.equal(speech.augment(silence, torch.Generator(), speed=(1, 1)), silence)


# --- text ---------------------------------------------------------------------------------------------------------


def test_transcripts_vocabulary_and_error_rates():
    assert speech.normalize_transcript("  Call 911, NOW!  It's-late ") == "call nine one one now it's late"
    text = "zero what's seven"
    ids = speech.encode(text)
    assert min(ids) >= 1 and max(ids) == speech.VOCAB_SIZE - 1 == 28 and speech.decode(ids) == text
    assert speech.decode([0, *ids, 0]) == text
    with pytest.raises(ValueError, match=r"'7' in 'seven 7'.*normalize_transcript"):
        speech.encode("seven 7")
    rates = speech.error_rates(["one two three", "four"], ["one too three", ""])  # 1 sub + 1 del of 4 words
    assert rates["wer"] == pytest.approx(2 / 4)
    assert rates["cer"] == pytest.approx(5 / 17)  # 'two' -> 'too': 1 of 13 characters; 'four' deleted: 4 of 4
    with pytest.raises(ValueError, match="same positive count"):
        speech.error_rates(["one"], [])


def test_batches_by_length_cover_every_index_once():
    lengths = torch.randint(10, 1000, (237,), generator=torch.Generator().manual_seed(0))
    for generator in (None, torch.Generator().manual_seed(1)):
        batches = speech.batches_by_length(lengths, 16, generator)
        assert sorted(i for b in batches for i in b) == list(range(237))
        assert all(lengths[b].tolist() == sorted(lengths[b].tolist()) for b in batches)
    assert speech.batches_by_length(lengths, 16) == speech.batches_by_length(lengths, 16)


# --- synthesis and the corpus ---------------------------------------------------------------------------------------


def test_parse_wav_ignores_streaming_sizes():
    samples = np.array([0, 1000, -1000, 32767, -32768], dtype="<i2")
    fmt = struct.pack("<HHIIHH", 1, 1, 22050, 44100, 2, 16)
    data = (b"RIFF" + struct.pack("<I", 0x7FFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data"
            + struct.pack("<I", 0x7FFFFFFF) + samples.tobytes())
    parsed, rate = speech.parse_wav(data)
    assert rate == 22050 and parsed.tolist() == samples.tolist()
    with pytest.raises(SynthesisError, match="did not write a WAV"):
        speech.parse_wav(b"error: unknown voice")


def test_missing_synthesizer_names_the_install_command(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SynthesisError, match=r"espeak-ng or flite.*apt-get install espeak-ng"):
        speech.load(TINY)
    with pytest.raises(ValueError, match="engine='festival'"):
        speech.find_engine("festival")


def test_speakers_are_held_out_by_timbre():
    groups = SpeechCorpus(valid_groups=4, test_groups=6).speaker_groups("espeak-ng")
    variants = {split: {s.split("+")[1] for s in speakers} for split, speakers in groups.items()}
    assert len(variants["test"]) == 6 and len(variants["valid"]) == 4
    assert not variants["train"] & variants["test"] and not variants["train"] & variants["valid"]
    assert not variants["valid"] & variants["test"]
    assert len(groups["test"]) == 6 * len(speech.ESPEAK_VOICES)
    assert SpeechCorpus(seed=1).speaker_groups("espeak-ng") != groups  # the seed chooses the held-out timbres
    flite = SpeechCorpus(valid_groups=1, test_groups=1).speaker_groups("flite")
    assert sorted(s for g in flite.values() for s in g) == sorted(speech.FLITE_VOICES)


@needs_espeak
def test_synthesize_one_utterance():
    samples, rate = speech.synthesize("three one four", "en-gb-x-rp+f3", words_per_minute=160, pitch=60)
    assert rate == 22050 and samples.dtype == np.int16
    assert 0.5 < len(samples) / rate < 3 and np.abs(samples).max() > 1000  # speech, not silence


def test_a_failing_synthesizer_is_reported_with_its_message(monkeypatch):
    import subprocess

    def failing_run(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout=b"", stderr=b"Error: voice not found")

    monkeypatch.setattr(subprocess, "run", failing_run)
    with pytest.raises(SynthesisError, match=r"espeak-ng -v en-us\+m1 .* failed \(exit 1\): Error: voice not found"):
        speech.synthesize("one", "en-us+m1")


@needs_espeak
def test_unknown_voices_are_refused_not_replaced_by_the_default():
    spec = SpeechCorpus(voices=("en-us", "xx-nowhere"), variants=("m3", "nosuch", *speech.ESPEAK_VARIANTS[:12]))
    with pytest.raises(SynthesisError, match=r"does not know xx-nowhere, \+nosuch"):
        speech.load(spec, progress=False)


@needs_espeak
def test_corpus_is_synthesized_once_then_read_from_the_cache(monkeypatch):
    data = speech.load(TINY, progress=False)
    assert {split: len(d) for split, d in data.items()} == {"train": 6, "valid": 3, "test": 3}
    train_timbres = {s.split("+")[1] for s in data["train"].speakers}
    for split in ("valid", "test"):
        assert not train_timbres & {s.split("+")[1] for s in data[split].speakers}
    for split in data.values():
        assert split.sample_rate == 16000 and split.audio.dtype == torch.int16
        for i, text in enumerate(split.transcripts):
            assert text == speech.normalize_transcript(text) and speech.encode(text)
            wave = split.waveform(i)
            assert 0.2 < len(wave) / 16000 < 4 and wave.abs().max() > 0.03

    def no_synthesis(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(speech.corpus, "generate", no_synthesis)  # load() calls the corpus module's generate
    again = speech.load(TINY, progress=False)
    assert torch.equal(again["test"].audio, data["test"].audio) and again["test"].speakers == data["test"].speakers
    with pytest.raises(AssertionError, match="cache"):  # other parameters, another folder
        speech.load(SpeechCorpus(train_utterances=7, valid_utterances=3, test_utterances=3), progress=False)
