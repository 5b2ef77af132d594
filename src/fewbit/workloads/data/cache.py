"""Where generated data lives: a user cache folder, one sub-folder per data set keyed by its parameters.

``FEWBIT_CACHE`` overrides the root (default ``$XDG_CACHE_HOME/fewbit`` or ``~/.cache/fewbit``). Files are written
with :mod:`fewbit.atomic`, so an interrupted generation never leaves a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from fewbit.atomic import write_text


def root() -> Path:
    if "FEWBIT_CACHE" in os.environ:
        return Path(os.environ["FEWBIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fewbit"


def keyed_dir(kind: str, params: dict) -> Path:
    """``<root>/<kind>-<12 hex digits of the parameters' hash>``; the parameters are stored beside the data."""
    text = json.dumps(params, sort_keys=True)
    path = root() / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    path.mkdir(parents=True, exist_ok=True)
    params_file = path / "params.json"
    if not params_file.exists():
        write_text(params_file, text + "\n")
    return path


def split_of(key: str, seed: int, valid_percent: int, test_percent: int) -> str:
    """"train", "valid" or "test" for ``key`` by a hash of (seed, key): stable across runs and machines, so an
    item (a sentence, a chapter, a file) is always in the same split and never in two."""
    bucket = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest(), 16) % 100
    if bucket < test_percent:
        return "test"
    if bucket < test_percent + valid_percent:
        return "valid"
    return "train"
