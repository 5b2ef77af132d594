"""English-Spanish verse pairs from two locally installed Bibles: the King James Version (1769) and the Reina-Valera
(1909), both public domain, read from the Debian packages ``sword-text-kjv`` and ``sword-text-sparv`` with pysword.
The modules are looked for in ``$SWORD_PATH`` (``os.pathsep``-separated), ``~/.sword``, ``/usr/share/sword`` (where
Debian installs them) and ``/usr/local/share/sword``.

Both modules use the KJV versification, so verse ``book chapter:verse`` of one is the translation of the same
reference in the other; that gives about 31,000 aligned pairs (a verse empty on either side is skipped). The text is
cleaned of its OSIS markup (Strong's numbers, notes, titles) by pysword, then of two leftovers: the paragraph sign
``¶`` and stray ``\\nd`` (USFM "name of deity") codes; runs of white space become one space. The Reina-Valera
prints the first word of every chapter in capitals ("EN el principio"), written here "En el principio", and opens
every eighth verse of Psalm 119 with a Hebrew letter's name ("GIMEL."), removed here as the KJV has it outside the
verse.

Splits are made by *chapter*, not by verse: the hash of ``seed:book chapter`` puts a whole chapter into train, valid
or test. Neighbouring verses often repeat each other almost word for word (parallel clauses, lists, refrains), so a
split by verse would leak near-copies of every test verse into training; by chapter, about 60 of the 1,189 chapters
form each 5 % split. Whole books would be cleaner still but too coarse (66 books, very unequal in size). Repeated
verses remain across chapters ("And the LORD spake unto Moses, saying,"); a valid or test verse whose English text
also occurs in train is dropped, as are repeats within valid and test, so no English verse is in two splits.

The pairs are cached as TSV files (:mod:`fewbit.workloads.data.cache`), keyed by the parameters and by the two modules'
names and versions. :func:`english_text` gives the KJV alone, split the same way, for language modelling.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from fewbit.atomic import write_text
from fewbit.workloads.data.cache import keyed_dir, split_of
from fewbit.workloads.data.numbers import read_pairs

SPLITS = ("train", "valid", "test")
INSTALL_MODULES = "apt-get install sword-text-kjv sword-text-sparv"
INSTALL_PYSWORD = "pip install pysword"
# Module names, newest Debian packaging first (older releases shipped them as KJV and SpaRV).
ENGLISH_MODULES = ("engKJV2006eb", "KJV")
SPANISH_MODULES = ("spaRV1909eb", "SpaRV")
# Where SWORD libraries live: $SWORD_PATH, the user's own, then the system ones (Debian: /usr/share/sword).
SEARCH_PATHS = ("~/.sword", "/usr/share/sword", "/usr/local/share/sword")


@dataclass(frozen=True)
class BibleCorpus:
    """Parameters of the verse-pair corpus. ``valid_percent`` and ``test_percent`` are the shares of *chapters*
    (by hash) in those splits; ``max_chars`` drops pairs with more characters than that on either side (0: keep
    all; the longest verse, Esther 8:9, has about 530 characters in English)."""

    seed: int = 0
    valid_percent: int = 5
    test_percent: int = 5
    max_chars: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.valid_percent + self.test_percent < 100:
            raise ValueError("valid_percent + test_percent must lie strictly between 0 and 100")
        if min(self.valid_percent, self.test_percent) < 0:
            raise ValueError(f"valid_percent={self.valid_percent}, test_percent={self.test_percent}: must be >= 0")
        if self.max_chars < 0:
            raise ValueError(f"max_chars={self.max_chars}; use 0 for no limit or a positive number of characters")


def _search_paths() -> list[Path]:
    paths = [p for p in os.environ.get("SWORD_PATH", "").split(os.pathsep) if p]
    return [Path(p).expanduser() for p in (*paths, *SEARCH_PATHS)]


def _conf(path: Path) -> dict[str, str]:
    """The ``[ModuleName]`` a SWORD .conf file declares (key ``module``) and its ``Key=value`` lines."""
    fields: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return fields
    for line in lines:
        line = line.strip()
        if line.startswith("[") and line.endswith("]") and "module" not in fields:
            fields["module"] = line[1:-1]
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            fields.setdefault(key.strip().lower(), value.strip())
    return fields


@dataclass(frozen=True)
class _Library:
    root: Path
    english: str
    spanish: str
    versions: tuple[str, str]


def _find_library() -> _Library | None:
    """The first SWORD library root holding both modules, with their names and versions; None if there is none."""
    for root in _search_paths():
        if not (root / "mods.d").is_dir():
            continue
        confs = {c.get("module"): c for c in map(_conf, sorted((root / "mods.d").glob("*.conf")))}
        english = next((m for m in ENGLISH_MODULES if m in confs), None)
        spanish = next((m for m in SPANISH_MODULES if m in confs), None)
        if english and spanish:
            versions = (confs[english].get("version", "?"), confs[spanish].get("version", "?"))
            return _Library(root, english, spanish, versions)
    return None


def _have_pysword() -> bool:
    return importlib.util.find_spec("pysword") is not None


def available() -> bool:
    """True when pysword is importable and both SWORD modules are installed (reads only the small .conf files)."""
    return _have_pysword() and _find_library() is not None


def _library() -> _Library:
    """The installed modules, or an error that names what to install."""
    if not _have_pysword():
        raise ImportError(f"the Bible corpus reads SWORD modules with pysword: {INSTALL_PYSWORD}")
    library = _find_library()
    if library is None:
        raise FileNotFoundError(
            f"the Bible corpus needs the SWORD modules {ENGLISH_MODULES[0]} and {SPANISH_MODULES[0]} (searched "
            f"{', '.join(str(p) for p in _search_paths())}); install them with: {INSTALL_MODULES}")
    return library


def modules() -> dict[str, str]:
    """The installed modules as {"english": "<name> <version>", "spanish": ...}; an error naming what to install
    when pysword or a module is missing. Cheap (reads the .conf files): a cache key for data derived from them."""
    library = _library()
    return {"english": f"{library.english} {library.versions[0]}",
            "spanish": f"{library.spanish} {library.versions[1]}"}


def _open(root: Path, module: str):
    """One module as a pysword Bible."""
    from pysword.modules import SwordModules

    sword = SwordModules(str(root))
    sword.parse_modules()
    bible = sword.get_bible_from_module(module)
    # pysword decompresses a module's whole block (a book) for every verse it returns; remembering the last few
    # blocks on this instance makes reading a Bible take about two seconds instead of about fifty.
    if hasattr(bible, "_decompressed_text"):
        bible._decompressed_text = functools.lru_cache(maxsize=4)(bible._decompressed_text)
    return bible


_MARKUP_LEFTOVERS = re.compile(r"¶|\\nd\b")
_SPACES = re.compile(r"\s+")


def clean(text: str) -> str:
    """A verse as plain text: pysword's cleaned text without ``¶`` and ``\\nd`` codes, white space collapsed."""
    return _SPACES.sub(" ", _MARKUP_LEFTOVERS.sub(" ", text)).strip()


_OPENING_CAPITALS = re.compile(r"^(\W*\w)(\w+)")


def _lower_opening_capitals(verse: str) -> str:
    """The Reina-Valera prints a chapter's first word in capitals ("EN el principio"): write it "En"."""
    match = _OPENING_CAPITALS.match(verse)
    if match and match[2].isupper():
        return match[1] + match[2].lower() + verse[match.end():]
    return verse


# Psalm 119 is an acrostic: the Reina-Valera opens every eighth verse with the Hebrew letter's name, which the KJV
# has as a title outside the verse.
_ACROSTIC_LETTER = re.compile(r"^(ALEPH|BETH|GIMEL|DALETH|HE|VAU|ZAIN|CHETH|TETH|JOD|CAPH|LAMED|MEM|NUN|SAMECH|AIN|"
                              r"PE|TZADDI|COPH|RESH|SIN|SCHIN|TAU)\.?\s+", re.IGNORECASE)


def _reina_valera(book: str, chapter: int, verses: list[str]) -> list[str]:
    """The Reina-Valera's verses brought to the KJV's conventions: no acrostic letters, no opening capitals."""
    if (book, chapter) == ("Ps", 119):
        verses = [_ACROSTIC_LETTER.sub("", v) if i % 8 == 0 else v for i, v in enumerate(verses)]
    if verses:
        verses[0] = _lower_opening_capitals(verses[0])
    return verses


@functools.lru_cache(maxsize=2)  # the two modules, read once per process (about 4 MB of text each)
def _chapters(root: Path, module: str, spanish: bool = False) -> tuple[tuple[str, int, tuple[str, ...]], ...]:
    """(book, chapter number, verse texts) in canonical order, Genesis 1 to Revelation 22, with empty verses kept
    as "". ``spanish``: the module is the Reina-Valera (see :func:`_reina_valera`)."""
    bible = _open(root, module)
    chapters = []
    for testament in bible.get_structure().get_books().values():
        for book in testament:
            for chapter, length in enumerate(book.chapter_lengths, start=1):
                verses = [clean(v) for v in bible.get_iter(books=[book.osis_name], chapters=[chapter])]
                if spanish:
                    verses = _reina_valera(book.osis_name, chapter, verses)
                if len(verses) != length:
                    raise ValueError(f"{book.osis_name} {chapter}: {len(verses)} verses read, the versification "
                                     f"says {length}; reinstall the modules: {INSTALL_MODULES}")
                chapters.append((book.osis_name, chapter, tuple(verses)))
    return tuple(chapters)


def _split_of(book: str, chapter: int, spec: BibleCorpus) -> str:
    return split_of(f"{book} {chapter}", spec.seed, spec.valid_percent, spec.test_percent)


def verse_pairs() -> list[tuple[str, str, str]]:
    """Every aligned verse as (reference like ``John 3:16``, English, Spanish), canonical order, empty verses
    skipped; not split and not cached on disk (reading both modules takes a few seconds, once per process)."""
    library = _library()
    english = _chapters(library.root, library.english)
    spanish = _chapters(library.root, library.spanish, spanish=True)
    pairs = []
    for (book, chapter, en), (_, _, es) in zip(english, spanish, strict=True):
        for verse, (src, tgt) in enumerate(zip(en, es, strict=True), start=1):
            if src and tgt:
                pairs.append((f"{book} {chapter}:{verse}", src, tgt))
    return pairs


def generate(spec: BibleCorpus) -> dict[str, list[tuple[str, str]]]:
    """The corpus as {split: [(english, spanish), ...]} in canonical order, without touching the cache."""
    splits: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for reference, src, tgt in verse_pairs():
        if spec.max_chars and max(len(src), len(tgt)) > spec.max_chars:
            continue
        book, chapter = reference.rsplit(":", 1)[0].rsplit(" ", 1)
        splits[_split_of(book, int(chapter), spec)].append((src, tgt))
    seen = {src for src, _ in splits["train"]}
    for split in ("valid", "test"):
        kept = []
        for src, tgt in splits[split]:
            if src not in seen:
                seen.add(src)
                kept.append((src, tgt))
        splits[split] = kept
    return splits


def load(spec: BibleCorpus | None = None) -> dict[str, list[tuple[str, str]]]:
    """The corpus, from the cache or read (and cached) on first use. Tab-separated files, one per split.

    Raises ImportError naming ``pip install pysword`` or FileNotFoundError naming the apt packages when a piece is
    missing; the cache is found through the installed modules' names and versions, so it is never used without them."""
    spec = spec or BibleCorpus()
    directory = keyed_dir("bible", {"corpus": "sword", "modules": modules(), **asdict(spec)})
    files = {s: directory / f"{s}.tsv" for s in SPLITS}
    if not all(f.exists() for f in files.values()):
        for split, pairs in generate(spec).items():
            write_text(files[split], "".join(f"{src}\t{tgt}\n" for src, tgt in pairs))
    return {s: read_pairs(files[s]) for s in SPLITS}


def english_text(spec: BibleCorpus | None = None) -> dict[str, str]:
    """The KJV as plain text per split, one verse per line in canonical order, split by chapter exactly like the
    pairs (every non-empty English verse, also those whose Spanish side is empty; ``max_chars`` is ignored)."""
    spec = spec or BibleCorpus()
    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    library = _library()
    for book, chapter, verses in _chapters(library.root, library.english):
        lines[_split_of(book, chapter, spec)].extend(v for v in verses if v)
    return {s: "".join(f"{line}\n" for line in lines[s]) for s in SPLITS}
