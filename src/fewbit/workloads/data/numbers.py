"""A parallel corpus of number phrases, generated offline with num2words: English to French, German or Spanish.

Each pair renders one number in both languages as a cardinal ("one hundred and twenty-three thousand, ..." ->
"ciento veintitrés mil ..."), an ordinal ("twenty-first" -> "vigésimo primero") or a year ("nineteen eighty-four"
-> "mil novecientos ochenta y cuatro"). Numbers are drawn log-uniformly so that short and long phrases both occur.
The split of a pair is decided by a hash of its English side, so no source sentence is in two splits; duplicates
within a split are dropped. Everything is a function of the parameters and the seed, and cached on disk
(:mod:`fewbit.workloads.data.cache`).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from fewbit.atomic import write_text
from fewbit.workloads.data.cache import keyed_dir, split_of

LANGUAGES = ("fr", "de", "es")
KINDS = ("cardinal", "ordinal", "year")
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class NumberCorpus:
    """Parameters of the corpus. ``valid_percent`` and ``test_percent`` are the shares of distinct English
    phrases (by hash) that go to those splits; ``pairs`` counts the draws before deduplication."""

    target: str = "es"
    pairs: int = 24000
    seed: int = 0
    max_cardinal: int = 1_000_000
    max_ordinal: int = 10_000
    years: tuple[int, int] = (1000, 2100)
    valid_percent: int = 5
    test_percent: int = 5

    def __post_init__(self) -> None:
        if self.target not in LANGUAGES:
            raise ValueError(f"target language {self.target!r}; valid: {', '.join(LANGUAGES)}")
        if self.pairs < 100:
            raise ValueError(f"pairs={self.pairs}; generate at least 100")
        if not 0 < self.valid_percent + self.test_percent < 100:
            raise ValueError("valid_percent + test_percent must lie strictly between 0 and 100")


def _num2words():
    try:
        from num2words import num2words
    except ImportError as error:
        raise ImportError("the number-phrase corpus needs num2words: pip install num2words") from error
    return num2words


def _split_of(source: str, spec: NumberCorpus) -> str:
    return split_of(source, spec.seed, spec.valid_percent, spec.test_percent)


def _draw(rng: random.Random, kind: str, spec: NumberCorpus) -> int:
    if kind == "year":
        return rng.randrange(*spec.years)
    high = spec.max_cardinal if kind == "cardinal" else spec.max_ordinal
    return min(int(math.exp(rng.uniform(0, math.log(high)))), high - 1) + (kind == "ordinal")


def generate(spec: NumberCorpus) -> dict[str, list[tuple[str, str]]]:
    """The corpus as {split: [(english, target), ...]}, without touching the cache."""
    num2words = _num2words()
    rng = random.Random(spec.seed)
    seen: set[str] = set()
    splits: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for _ in range(spec.pairs):
        kind = rng.choice(KINDS)
        n = _draw(rng, kind, spec)
        to = "cardinal" if kind == "cardinal" else kind
        source = num2words(n, lang="en", to=to)
        if source in seen:
            continue
        seen.add(source)
        splits[_split_of(source, spec)].append((source, num2words(n, lang=spec.target, to=to)))
    return splits


def load(spec: NumberCorpus | None = None) -> dict[str, list[tuple[str, str]]]:
    """The corpus, from the cache or generated (and cached) on first use. Tab-separated files, one per split."""
    spec = spec or NumberCorpus()
    params = {"corpus": "num2words", **asdict(spec)}
    directory = keyed_dir("numbers", params)
    files = {s: directory / f"{s}.tsv" for s in SPLITS}
    if not all(f.exists() for f in files.values()):
        for split, pairs in generate(spec).items():
            write_text(files[split], "".join(f"{src}\t{tgt}\n" for src, tgt in pairs))
    return {s: read_pairs(files[s]) for s in SPLITS}


def read_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) != 2:  # a cached corpus file damaged by hand or by a full disk
            raise ValueError(f"{path}:{number}: expected 'source<TAB>target', got {line!r}; delete {path.parent} to "
                             "regenerate the corpus")
        pairs.append((fields[0], fields[1]))
    return pairs
