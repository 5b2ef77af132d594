"""A byte-level language-modelling corpus that every machine has: the Python standard library's own source.

``source="stdlib"`` (default) reads the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]``: real, varied,
well-written text (code, docstrings, comments), about 10 MB, present wherever Python runs. Left out: test suites
(any ``test``/``tests``/``idle_test`` folder), ``site-packages``/``dist-packages`` (installed third-party code, which
differs between machines), ``encodings`` (generated code-page tables) and ``pydoc_data`` (one generated 750 kB
string). Files are listed in sorted order and each goes whole to train, valid or test by the hash of its path
relative to the library, so no file is in two splits. Within a split the files follow a fixed pseudo-random order
(again by hash), so that a ``max_bytes`` cap keeps a sample of the whole library rather than its first letters.

``source="kjv"`` is the King James Bible instead (:func:`fewbit.workloads.data.bible.english_text`, split by chapter),
when its Debian module is installed: natural English prose, about 4 MB.

Tokens are bytes (vocabulary 256), so perplexity and bits per byte need no tokenizer to compare. The three splits
are cached as raw ``.bin`` files (:mod:`fewbit.workloads.data.cache`). The standard library differs between Python
versions, so the cache key holds the Python version and the library's path next to the parameters; the same key
on two machines means the same files, not necessarily the same bytes (a distribution may patch its library).

Training reads random windows (:func:`sample_batch`); evaluation reads the split once in non-overlapping windows
(:class:`TokenWindows`), so each token is predicted from 0 to ``block_size - 1`` tokens of context: the numbers are
somewhat worse than a sliding-window evaluation would give, and comparable between runs with the same block size.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fewbit.atomic import write_bytes, write_text
from fewbit.workloads.base import Samples, evaluate_samples, model_device
from fewbit.workloads.data.cache import keyed_dir, split_of

SPLITS = ("train", "valid", "test")
SOURCES = ("stdlib", "kjv")
VOCAB_SIZE = 256  # one token per byte
EXCLUDED_FOLDERS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                              "encodings", "pydoc_data"})


@dataclass(frozen=True)
class TextCorpus:
    """Parameters of the corpus. ``valid_percent`` and ``test_percent`` are the shares of files (stdlib) or
    chapters (kjv), by hash, in those splits. ``max_bytes`` caps the total over the three splits (0: no cap); every
    split keeps its share of the cap, cut from its start."""

    source: str = "stdlib"
    max_bytes: int = 0
    valid_percent: int = 5
    test_percent: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"text source {self.source!r}; valid: {', '.join(SOURCES)}")
        if self.max_bytes < 0:
            raise ValueError(f"max_bytes={self.max_bytes}; use 0 for no cap or a positive number of bytes")
        if min(self.valid_percent, self.test_percent) < 0 or not 0 < self.valid_percent + self.test_percent < 100:
            raise ValueError(f"valid_percent={self.valid_percent}, test_percent={self.test_percent}: each must be "
                             ">= 0 and their sum strictly between 0 and 100")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _bucket(key: str, seed: int) -> int:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest(), 16)


def _split_of(key: str, spec: TextCorpus) -> str:
    return split_of(key, spec.seed, spec.valid_percent, spec.test_percent)


def stdlib_files(spec: TextCorpus | None = None) -> dict[str, list[str]]:
    """The standard-library files of each split, as paths relative to :func:`stdlib_root`, in reading order."""
    spec = spec or TextCorpus()
    root = stdlib_root()
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py") if p.is_file())
    files = [f for f in files if not EXCLUDED_FOLDERS & set(f.split("/")[:-1])]
    if not files:
        raise FileNotFoundError(f"no Python source under {root}; is the standard library installed?")
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for f in files:
        splits[_split_of(f, spec)].append(f)
    return {s: sorted(names, key=lambda f: _bucket(f, spec.seed + 1)) for s, names in splits.items()}


def generate(spec: TextCorpus) -> dict[str, bytes]:
    """The bytes of each split, without touching the cache. Each stdlib file is followed by a newline."""
    if spec.source == "kjv":
        from fewbit.workloads.data import bible

        text = bible.english_text(bible.BibleCorpus(seed=spec.seed, valid_percent=spec.valid_percent,
                                                    test_percent=spec.test_percent))
        data = {s: text[s].encode("utf-8") for s in SPLITS}
    else:
        root = stdlib_root()
        data = {s: b"".join((root / f).read_bytes() + b"\n" for f in names)
                for s, names in stdlib_files(spec).items()}
    total = sum(len(d) for d in data.values())
    if spec.max_bytes and total > spec.max_bytes:
        data = {s: d[: len(d) * spec.max_bytes // total] for s, d in data.items()}
    return data


def _key(spec: TextCorpus) -> dict:
    if spec.source == "kjv":
        from fewbit.workloads.data import bible

        origin = {"module": bible.modules()["english"]}
    else:
        origin = {"python": sys.version.split()[0], "implementation": sys.implementation.name,
                  "stdlib": str(stdlib_root()), "excluded": sorted(EXCLUDED_FOLDERS)}
    return {"corpus": "text", "origin": origin, **asdict(spec)}


def load(spec: TextCorpus | None = None) -> dict[str, torch.Tensor]:
    """{split: 1-D uint8 tensor of byte tokens}, from the cache or generated (and cached) on first use. The
    ``kjv`` source raises ImportError or FileNotFoundError naming what to install when it is missing."""
    spec = spec or TextCorpus()
    directory = keyed_dir("text", _key(spec))
    files = {s: directory / f"{s}.bin" for s in SPLITS}
    if not all(f.exists() for f in files.values()):
        data = generate(spec)
        if spec.source == "stdlib":
            write_text(directory / "files.json", json.dumps(stdlib_files(spec), indent=1) + "\n")
        for split in SPLITS:
            write_bytes(files[split], data[split])
    return {s: torch.frombuffer(bytearray(files[s].read_bytes()), dtype=torch.uint8) for s in SPLITS}


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a 1-D uint8 tensor (the token ids)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


def decode(tokens: torch.Tensor | list[int]) -> str:
    """Text of byte tokens; bytes that are not valid UTF-8 (a sample cut mid-character) become U+FFFD."""
    values = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
    return bytes(values).decode("utf-8", errors="replace")


def sample_batch(tokens: torch.Tensor, batch_size: int, block_size: int, step: int, seed: int = 0,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch: ``batch_size`` windows of ``block_size + 1`` consecutive tokens starting at uniformly
    drawn positions; returns inputs x (B, T) and targets y (B, T) = x shifted by one, both int64.

    The draw depends only on ``(seed, step)``, so a resumed run reads the same batches."""
    n = tokens.numel()
    if n < block_size + 1:
        raise ValueError(f"{n} tokens cannot fill one window of block_size + 1 = {block_size + 1}; use a smaller "
                         "block_size or a larger corpus")
    generator = torch.Generator().manual_seed(_bucket(f"batch:{step}", seed) % 2**63)
    starts = torch.randint(0, n - block_size, (batch_size,), generator=generator)
    windows = tokens[starts[:, None] + torch.arange(block_size + 1)].long()  # (B, T + 1)
    windows = windows.to(device) if device is not None else windows
    return windows[:, :-1], windows[:, 1:]


@dataclass
class TokenWindows(Samples):
    """A token stream read once in non-overlapping windows of ``block_size + 1`` tokens (window ``i`` starts at
    ``i * block_size``; the last may be shorter): every token after the first is predicted exactly once, from 0 to
    ``block_size - 1`` tokens of context. ``count`` > 0 reads only the first ``count`` tokens."""

    split: str
    tokens: torch.Tensor
    block_size: int
    count: int = 0

    def __post_init__(self) -> None:
        self.count = self.tokens.numel() if not self.count else min(self.tokens.numel(), self.count)
        if self.count < 2:
            raise ValueError(f"{self.count} tokens: evaluation needs at least 2 (one to read, one to predict)")
        self.full = (self.count - 1) // self.block_size
        self.tail = self.full * self.block_size < self.count - 1

    def __len__(self) -> int:
        return self.full + self.tail

    def _window(self, i: int) -> torch.Tensor:
        start = i * self.block_size
        return self.tokens[start:min(start + self.block_size + 1, self.count)]

    def inputs(self, indices) -> torch.Tensor:
        """(B, L) int64 windows; a batch never mixes the short tail with full windows (:meth:`batches`)."""
        return torch.stack([self._window(i) for i in indices]).long()

    def references(self, indices) -> list[int]:
        """Tokens predicted in each window (its length - 1)."""
        return [self._window(i).numel() - 1 for i in indices]

    def batches(self, batch_size: int) -> list[list[int]]:
        full = [list(range(i, min(i + batch_size, self.full))) for i in range(0, self.full, batch_size)]
        return full + ([[self.full]] if self.tail else [])

    def groups(self, indices) -> list[list[int]]:
        """The short tail window apart from the full ones: padding it would add predicted tokens."""
        short = [p for p, i in enumerate(indices) if self.tail and i == self.full]
        full = [p for p, i in enumerate(indices) if not (self.tail and i == self.full)]
        return [g for g in (full, short) if g]


def window_nll(model: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor) -> list[float]:
    """Negative log-likelihood (nats, summed) of each window's tokens after its first under ``model`` (ids (B, T)
    -> logits (B, T, V)), one per window."""
    windows = windows.to(model_device(model))
    logits = model(windows[:, :-1]).float()
    nll = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")  # (B, T)
    return nll.sum(-1).tolist()


def nll_metrics(outputs: Sequence[float], references: Sequence[int]) -> dict[str, float]:
    """``nll`` (nats per token), ``perplexity`` (exp nll), ``bits_per_byte`` (nll / ln 2: a token is a byte) and
    ``tokens`` (how many were predicted) from per-window NLL sums and predicted-token counts."""
    tokens = sum(references)
    nll = sum(outputs) / tokens
    return {"nll": nll, "perplexity": math.exp(nll), "bits_per_byte": nll / math.log(2), "tokens": tokens}


def evaluate(model: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, block_size: int,
             batch_size: int = 32, max_tokens: int = 0) -> dict[str, float]:
    """:func:`nll_metrics` of ``model`` on ``tokens`` read as :class:`TokenWindows` (``max_tokens`` > 0: only the
    first that many tokens). A module is put in eval mode for the call and restored after."""
    samples = TokenWindows("tokens", tokens, block_size, max_tokens)
    return evaluate_samples(model, samples, window_nll, nll_metrics, batch_size)
