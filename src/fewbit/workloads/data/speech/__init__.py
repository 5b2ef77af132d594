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
version (:mod:`fewbit.workloads.data.cache`). Generation runs one engine process per core.

**Features.** :func:`log_mel`: pre-emphasis, a Hann-windowed STFT (25 ms windows, 10 ms hop), power spectrum, a
triangular mel filterbank (:func:`mel_filterbank`, HTK mel scale), log, then per-utterance normalisation of each
mel channel (:func:`normalize`). :func:`augment` (training only) changes the speed and adds noise, seeded.

**Text.** Transcripts are normalised to lowercase letters, space and apostrophe; :func:`encode` maps them to ids
1..28 for CTC, with 0 the blank. :func:`error_rates` gives word and character error rates with jiwer.

Split by job: :mod:`.synthesis` (engines, WAV, resampling), :mod:`.corpus` (transcripts, speakers, generation and
cache), :mod:`.features` (log-mel features and augmentation). Their public names are re-exported here.
"""

from fewbit.workloads.data.speech.corpus import (
    BLANK,
    CHARACTERS,
    SPLITS,
    VOCAB_SIZE,
    SpeechCorpus,
    SpeechSplit,
    batches_by_length,
    check_speakers,
    decode,
    encode,
    error_rates,
    generate,
    load,
    normalize_transcript,
)
from fewbit.workloads.data.speech.features import (
    MelSpec,
    augment,
    features,
    hz_to_mel,
    log_mel,
    mel_filterbank,
    mel_to_hz,
    normalize,
)
from fewbit.workloads.data.speech.synthesis import (
    ENGINES,
    ESPEAK_VARIANTS,
    ESPEAK_VOICES,
    FLITE_VOICES,
    INSTALL_HINT,
    SynthesisError,
    engine_version,
    find_engine,
    parse_wav,
    resample,
    synthesize,
)

__all__ = [
    "BLANK",
    "CHARACTERS",
    "ENGINES",
    "ESPEAK_VARIANTS",
    "ESPEAK_VOICES",
    "FLITE_VOICES",
    "INSTALL_HINT",
    "SPLITS",
    "VOCAB_SIZE",
    "MelSpec",
    "SpeechCorpus",
    "SpeechSplit",
    "SynthesisError",
    "augment",
    "batches_by_length",
    "check_speakers",
    "decode",
    "encode",
    "engine_version",
    "error_rates",
    "features",
    "find_engine",
    "generate",
    "hz_to_mel",
    "load",
    "log_mel",
    "mel_filterbank",
    "mel_to_hz",
    "normalize",
    "normalize_transcript",
    "parse_wav",
    "resample",
    "synthesize",
]
