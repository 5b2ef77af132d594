"""Checkpoints: tensors in safetensors, everything else in JSON, written atomically, last N kept; no pickle.

A checkpoint is a folder ``step-00001234`` holding ``tensors.safetensors`` (model, master weights, optimizer
tensors, torch RNG state) and ``state.json`` (step, scaler, schedule, optimizer hyper-parameters, Python and NumPy
RNG states, the model's signature and the config). It is written into a temporary folder, every file fsync'ed,
then renamed into place, so a crash leaves either the old set of checkpoints or the new one, never half a file.

**Integrity** (format version 2). ``state.json`` lists every tensor with its dtype, shape and checksum (the first 64
bits of the sha256 of its bytes, :func:`tensor_checksum`), and the tensors file's metadata holds the sha256 of
``state.json``; :func:`load` verifies both, so a flipped bit in either file, a truncated file, a missing or extra
tensor, or an edited shape or dtype raises :class:`CheckpointError` naming the file and the tensor, and
:func:`load_latest_valid` reports it and falls back to the previous checkpoint. Version 1 checkpoints (written
before checksums) still load, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

PREFIX = "step-"
FORMAT_VERSION = 2  # 2: checksums of every tensor and of state.json; 1 (none) still loads, with a warning
READABLE_VERSIONS = (1, 2)
STATE_CHECKSUM_KEY = "fewbit_state_sha256"  # in the tensors file's metadata
# 64 bits of a sha256: a random corruption goes unnoticed with probability 2^-64.
_CHECKSUM_HEX_DIGITS = 16


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupted, or does not match the model or config."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state_dict -> (tensors by flat name, JSON-able rest)."""
    tensors, plain = {}, {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                plain.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, entries in meta["plain"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def tensor_checksum(t: torch.Tensor) -> str:
    """The first 64 bits (16 hex digits) of the sha256 of a tensor's bytes as safetensors stores them (row-major,
    little-endian)."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:_CHECKSUM_HEX_DIGITS]


def tensor_manifest(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """``{name: {"dtype", "shape", "sha256"}}`` of ``tensors``: what :func:`verify_tensors` checks them against."""
    return {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                   "sha256": tensor_checksum(t)} for name, t in sorted(tensors.items())}


def verify_tensors(tensors: dict[str, torch.Tensor], manifest: dict[str, dict], where: str,
                   error: type[Exception] = ValueError) -> None:
    """Raise ``error`` naming ``where`` and the tensor unless ``tensors`` are exactly ``manifest``'s: the same
    names, dtypes, shapes and checksums."""
    if not isinstance(manifest, dict):
        raise error(f"{where}: its tensor list is not a mapping of name to dtype, shape and checksum")
    missing, extra = sorted(set(manifest) - set(tensors)), sorted(set(tensors) - set(manifest))
    if missing:
        raise error(f"{where} is corrupted: tensor {missing[0]!r} is missing ({len(missing)} missing)")
    if extra:
        raise error(f"{where} is corrupted: tensor {extra[0]!r} is not in its list of tensors")
    for name, t in tensors.items():
        expected = manifest[name]
        found = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        for key in ("dtype", "shape"):
            if expected.get(key) != found[key]:
                raise error(f"{where} is corrupted: tensor {name!r} has {key} {found[key]}, recorded "
                            f"{expected.get(key)}")
        if expected.get("sha256") != tensor_checksum(t):
            raise error(f"{where} is corrupted: tensor {name!r} does not match its checksum (a flipped bit or a "
                        "damaged copy)")


def model_signature(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def save(directory: str | os.PathLike, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         extra_tensors: dict[str, torch.Tensor], state: dict, keep_last: int = 3) -> Path:
    """Write checkpoint ``step`` under ``directory`` atomically; delete all but the newest ``keep_last``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    tensors.update({k: v.detach().contiguous().cpu() for k, v in extra_tensors.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    tensors = _dedupe_storage(tensors)
    full_state = {
        "format_version": FORMAT_VERSION, "step": step, "optimizer": opt_meta,
        "rng_python": _python_rng(), "rng_numpy": _numpy_rng(), "signature": model_signature(model), **state,
        "tensors": tensor_manifest(tensors),
    }
    state_bytes = json.dumps(full_state).encode()
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=".tmp-"))
    try:
        (tmp / "tensors.safetensors").write_bytes(
            save_bytes(tensors, metadata={STATE_CHECKSUM_KEY: hashlib.sha256(state_bytes).hexdigest()}))
        (tmp / "state.json").write_bytes(state_bytes)
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        final = directory / f"{PREFIX}{step:08d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _dedupe_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): store a copy of each repeat."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        out[name] = t.clone() if key in seen else t
        seen.add(key)
    return out


def _python_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 - the global state users rely on
    return {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached": float(cached)}


def restore_rng(state: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = state["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    r = state["rng_numpy"]
    np.random.set_state(  # noqa: NPY002 - the global state users rely on
        (r["kind"], np.array(r["keys"], dtype=np.uint32), r["pos"], r["has_gauss"], r["cached"]))
    torch.set_rng_state(tensors["rng.torch"])


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``directory``, oldest first (temporary folders are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def load(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read one checkpoint folder and verify it (module docstring, "Integrity"); a missing, truncated or corrupted
    file raises :class:`CheckpointError` naming it."""
    path = Path(path)
    try:
        state_bytes = (path / "state.json").read_bytes()
        state = json.loads(state_bytes)
        tensors = load_bytes((path / "tensors.safetensors").read_bytes())
        with safe_open(path / "tensors.safetensors", "pt") as f:
            metadata = f.metadata() or {}
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {path} is incomplete: {error.filename} is missing") from None
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({type(error).__name__}: {error}); "
                              "resume from an earlier one") from None
    version = state.get("format_version") if isinstance(state, dict) else None
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"checkpoint {path} has format version {version!r}; this fewbit reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    if version == 1:
        warnings.warn(f"checkpoint {path} has no checksums (format version 1); it is loaded unverified",
                      UserWarning, stacklevel=2)
    else:
        if metadata.get(STATE_CHECKSUM_KEY) != hashlib.sha256(state_bytes).hexdigest():
            raise CheckpointError(f"checkpoint {path} is corrupted: {path / 'state.json'} does not match the checksum "
                                  "recorded with its tensors (a flipped bit, an edit or a damaged copy)")
        verify_tensors(tensors, state.get("tensors"), f"checkpoint {path / 'tensors.safetensors'}", CheckpointError)
    missing = [key for key in ("step", "optimizer", "rng_python", "rng_numpy", "signature") if key not in state]
    if missing or "rng.torch" not in tensors:
        raise CheckpointError(f"checkpoint {path} is incomplete: no {(missing or ['rng.torch'])[0]!r}")
    return tensors, state


def load_latest_valid(directory: str | os.PathLike) -> tuple[Path, dict[str, torch.Tensor], dict] | None:
    """The newest checkpoint that loads; broken newer ones are reported with a warning and skipped."""
    for path in reversed(list_checkpoints(directory)):
        try:
            tensors, state = load(path)
        except CheckpointError as error:
            warnings.warn(f"skipping unusable checkpoint: {error}", RuntimeWarning, stacklevel=2)
            continue
        return path, tensors, state
    return None


def check_compatible(state: dict, model: torch.nn.Module, config: dict) -> None:
    """Raise :class:`CheckpointError` naming the first difference between the checkpoint and this run."""
    signature = model_signature(model)
    saved = state["signature"]
    for name in sorted(set(saved) | set(signature)):
        if saved.get(name) != signature.get(name):
            raise CheckpointError(f"the checkpoint's model differs at {name!r}: saved {saved.get(name)}, this "
                                  f"model {signature.get(name)}")
    saved_config = state.get("config", {})
    for key in sorted(set(saved_config) | set(config)):
        if key in ("steps", "checkpoint_dir", "progress", "log_path", "mllog_path", "resume"):
            continue  # a run may be extended or logged elsewhere
        if saved_config.get(key) != config.get(key):
            raise CheckpointError(f"the checkpoint's config differs at {key!r}: saved {saved_config.get(key)!r}, "
                                  f"this run {config.get(key)!r}")


def save_training(directory: str | os.PathLike, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  schedule, scaler, extra_tensors: dict[str, torch.Tensor], config: dict,
                  keep_last: int = 3) -> Path:
    """One checkpoint of a training run: :func:`save` with the loss scaler's and LR schedule's state and the run's
    config. ``extra_tensors``: e.g. the master weights."""
    state = {"config": config, "scaler": scaler.state_dict() if scaler is not None else None,
             "scaler_kind": type(scaler).__name__ if scaler is not None else None,
             "schedule": _plain_schedule(schedule)}
    return save(directory, step, model, optimizer, extra_tensors, state, keep_last)


def restore_training(tensors: dict[str, torch.Tensor], state: dict, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, schedule, scaler) -> int:
    """Load a checkpoint read by :func:`load` into a run's objects (RNG states last); return its step. Extra
    tensors (master weights) are the caller's to load."""
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    if schedule is not None and state.get("schedule") is not None:
        schedule.load_state_dict(state["schedule"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    restore_rng(state, tensors)
    return int(state["step"])


def _plain_schedule(schedule) -> dict | None:
    if schedule is None:
        return None
    state = schedule.state_dict()
    try:
        json.dumps(state)
    except TypeError as error:
        raise ValueError(f"the LR schedule's state is not JSON-serializable ({error}); use a schedule built from "
                         "numbers (LambdaLR lambdas are not stored, only their counters)") from None
    return state
