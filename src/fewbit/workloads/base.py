"""What a workload is: data + model + metric + configs, behind one small interface.

A :class:`Workload` subclass names its metric and its data sources, and declares its settings as a frozen
dataclass (its ``Config``, which extends :class:`TrainSettings`). Configs are flat YAML files shipped in
``fewbit/workloads/configs/<workload>-<name>.yaml``; each opens with the command that runs it. A config file and
``key=value`` overrides may only name fields of the workload's ``Config``: anything else is an error that lists
the valid keys.

An instance is built from one config, prepares its data once (:meth:`Workload.setup`, cached on disk), and then
serves the training loop (:meth:`build_model`, :meth:`batch`, :meth:`loss`) and evaluation.

**Evaluation** is three pieces, the same three an inference harness needs (MLPerf LoadGen's query sample library,
system under test and accuracy script):

- :meth:`Workload.samples` — the examples of a split as :class:`Samples`: loadable by index, with references;
- :meth:`Workload.predict` — a batch of inputs through a model to one output per example;
- :meth:`Workload.score` — the outputs against the references: the metrics.

:meth:`Workload.evaluate` is the one template over them (split check, ``limit``, batching, eval mode and no-grad
restored afterwards). The model may be an ``nn.Module`` or any callable from inputs to outputs (an onnxruntime
session wrapped by :func:`fewbit.export.onnx_runner`): nothing needs to pretend to be a module.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fewbit.nn import frozen_weights


class DataError(RuntimeError):
    """A data source is missing, broken or cannot be produced here; the message names the fix."""


@dataclass(frozen=True)
class Source:
    """One place a workload's data can come from, and whether it is usable on this machine."""

    name: str
    description: str
    available: bool
    install: str  # what to run when it is missing

    def require(self) -> None:
        if not self.available:
            raise DataError(f"data source {self.name!r} ({self.description}) is not available here; "
                                    f"install it with: {self.install}")


@dataclass(frozen=True)
class TrainSettings:
    """Settings every workload shares: the optimizer (``adamw`` with betas (0.9, ``beta2``); or ``sgd`` with
    Nesterov momentum 0.9), its schedule (linear warmup, cosine decay to
    ``min_lr_ratio * lr``) and evaluation. ``eval_limit`` caps the examples an evaluation reads (0: all).
    ``device``: where training runs, "cpu", "cuda", "cuda:N" or "auto" (cuda when there is one, else cpu);
    evaluation runs wherever the model is. ``seed`` seeds the model's initialization and the order of the training
    batches; ``data_seed`` the data set itself (its generation and its train/valid/test split), so runs with
    different seeds are scored on the same test examples."""

    seed: int = 0
    data_seed: int = 0
    optimizer: str = "adamw"
    beta2: float = 0.98
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 0
    eval_limit: int = 0
    threads: int = 0  # torch threads; 0 leaves torch's default
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer={self.optimizer!r}; valid: adamw, sgd")
        if self.device not in ("cpu", "cuda", "auto") and not (self.device.startswith("cuda:")
                                                               and self.device[5:].isdigit()):
            raise ValueError(f"device={self.device!r}; valid: cpu, cuda, cuda:N, auto")
        for name in ("steps", "batch_size", "warmup", "eval_every", "eval_limit", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.batch_size == 0:
            raise ValueError("batch_size=0; need at least 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")


Model = nn.Module | Callable[[Any], Any]
"""What evaluation runs: a module, or any callable from a batch of inputs to a batch of outputs."""


class Samples(abc.ABC):
    """The evaluation examples of one split, loadable by index (positions ``0 .. len - 1``).

    :meth:`inputs` collates the chosen examples into one batch of model inputs (CPU tensors); :meth:`references`
    gives what :meth:`Workload.score` compares the outputs with; :meth:`batches` is the order evaluation reads them
    in (sequence workloads group similar lengths, so less padding)."""

    split: str

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def inputs(self, indices: Sequence[int]) -> Any:
        """One batch of model inputs for the examples at ``indices``."""

    @abc.abstractmethod
    def references(self, indices: Sequence[int]) -> list[Any]:
        """The reference of each example at ``indices``, in order."""

    def batches(self, batch_size: int) -> list[list[int]]:
        """Every index once, in batches of at most ``batch_size``; consecutive unless a workload says otherwise."""
        return [list(range(i, min(i + batch_size, len(self)))) for i in range(0, len(self), batch_size)]

    def collate(self, items: Sequence[Any]) -> Any:
        """One batch from the inputs of single examples (each ``inputs([i])``), as ``inputs`` of their indices
        would give it (:func:`collate`); an inference harness keeps examples loaded one by one and batches them
        as queries arrive."""
        return collate(items)

    def groups(self, indices: Sequence[int]) -> list[list[int]]:
        """The positions in ``indices`` split into groups whose examples may share one batch (default: all in one);
        e.g. a short last window of a token stream is never padded into a batch of full ones."""
        return [list(range(len(indices)))]


def collate(items: Sequence[Any], pad: float | dict[str, float] = 0.0) -> Any:
    """One batch from per-sample inputs (each ``samples.inputs([i])``): tensors concatenated along dimension 0,
    those of two or more dimensions first padded at the end of every other dimension to the largest with ``pad``
    (0: token ids whose padding id is 0, log-mel features past an utterance's end); tuples and lists position by
    position; dicts key by key, each key's tensors padded with ``pad[key]`` (0 for a key it does not name). It is
    what ``samples.inputs(indices)`` gives for fewbit's workloads (:meth:`Samples.collate`)."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        if first.dim() <= 1:
            return torch.cat(list(items))
        value = float(pad) if not isinstance(pad, dict) else 0.0
        shape = [max(t.shape[d] for t in items) for d in range(1, first.dim())]
        padded = []
        for t in items:
            widths = [p for d in reversed(range(1, t.dim())) for p in (0, shape[d - 1] - t.shape[d])]
            padded.append(F.pad(t, widths, value=value) if any(widths) else t)
        return torch.cat(padded)
    if isinstance(first, tuple | list):
        return type(first)(collate([item[k] for item in items], pad) for k in range(len(first)))
    if isinstance(first, dict):
        pads = pad if isinstance(pad, dict) else {}
        return {k: collate([item[k] for item in items], pads.get(k, 0.0)) for k in first}
    raise TypeError(f"cannot collate inputs of type {type(first).__name__}; expected tensors, tuples or dicts of "
                    "them")


def evaluate_samples(model: Model, samples: Samples, predict: Callable[[Model, Any], Sequence[Any]],
                     score: Callable[[Sequence[Any], Sequence[Any]], dict[str, float]],
                     batch_size: int) -> dict[str, float]:
    """``score`` of ``predict``'s outputs on every example of ``samples``, read in ``samples.batches(batch_size)``,
    under :func:`evaluating` (eval mode and no autograd; the module's mode restored)."""
    if len(samples) == 0:
        raise ValueError(f"the {samples.split} split has no examples to evaluate")
    outputs: list[Any] = [None] * len(samples)
    with evaluating(model):
        for indices in samples.batches(batch_size):
            batch = predict(model, samples.inputs(indices))
            if len(batch) != len(indices):
                raise RuntimeError(f"predict returned {len(batch)} outputs for {len(indices)} inputs")
            for i, output in zip(indices, batch, strict=True):
                outputs[i] = output
    return score(outputs, samples.references(range(len(samples))))


def limited(split: str, count: int, limit: int) -> int:
    """How many of a split's ``count`` examples an evaluation reads: all for ``limit`` 0, else the first ``limit``
    (a negative limit is an error rather than a count from the end)."""
    if limit < 0:
        raise ValueError(f"limit={limit}; use 0 for the whole {split} split or N > 0 for its first N examples")
    return min(limit, count) if limit else count


class Workload(abc.ABC):
    """A reference task. Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]
    description: ClassVar[str]
    metric: ClassVar[str]  # the key of evaluate()'s result that a study reports
    higher_is_better: ClassVar[bool]
    secondary: ClassVar[str | None] = None  # a finer-grained metric a study shows beside the main one (a loss)
    Config: ClassVar[type[TrainSettings]]

    def __init__(self, config: TrainSettings, artifacts: dict[str, bytes] | None = None) -> None:
        """``artifacts``: files a saved run kept (see :meth:`artifacts`), reused instead of rebuilt."""
        if not isinstance(config, self.Config):
            raise TypeError(f"{self.name} needs a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        self.saved_artifacts = dict(artifacts or {})
        self._ready = False

    # -- data sources ------------------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def sources(cls) -> list[Source]:
        """Every data source this workload can use, in order of preference, with its availability here."""

    @classmethod
    def require_source(cls, name: str) -> None:
        """A :class:`DataError` naming what to install unless source ``name`` is available here."""
        next(s for s in cls.sources() if s.name == name).require()

    # -- the task ----------------------------------------------------------------------------------------------
    def setup(self) -> Workload:
        """Prepare the data (generated or read, then cached); idempotent. Returns self."""
        if not self._ready:
            self._setup()
            self._ready = True
        return self

    @abc.abstractmethod
    def _setup(self) -> None: ...

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialized model for this config (seeded by ``config.seed``)."""

    @abc.abstractmethod
    def batch(self, step: int, micro: int = 0) -> Any:
        """The training batch at this position: a pure function of (seed, step, micro)."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Scalar training loss of ``model`` on ``batch``."""

    # -- evaluation --------------------------------------------------------------------------------------------
    splits: ClassVar[tuple[str, ...]] = ("valid", "test")  # the splits evaluation reads

    @abc.abstractmethod
    def samples(self, split: str, limit: int = 0) -> Samples:
        """The examples of ``split``, the first ``limit`` of them (0: all); an unknown split (:meth:`check_split`) or
        a negative limit (:func:`limited`) is a ValueError."""

    @abc.abstractmethod
    def predict(self, model: Model, inputs: Any) -> Sequence[Any]:
        """One output per example of a batch of ``inputs`` (from :meth:`Samples.inputs`). Runs as evaluation
        calls it: the module in eval mode, no autograd."""

    @abc.abstractmethod
    def score(self, outputs: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
        """The metrics of ``outputs`` against ``references`` (one each per example, in the same order); includes
        :attr:`metric`."""

    @property
    def eval_batch_size(self) -> int:
        """Examples per evaluation batch: the config's ``eval_batch_size`` where it has one."""
        return getattr(self.config, "eval_batch_size", self.config.batch_size)

    def check_split(self, split: str) -> None:
        """A ValueError naming the valid splits unless ``split`` is one of :attr:`splits`."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(self.splits)}")

    def evaluate(self, model: Model, split: str = "valid", limit: int | None = None) -> dict[str, float]:
        """Metrics of ``model`` on ``split`` ("valid" or "test"); includes :attr:`metric`. ``limit`` caps the
        examples read (None: ``config.eval_limit``; 0: all). A module is evaluated in eval mode without autograd
        and left in the mode it was in."""
        samples = self.samples(split, self.config.eval_limit if limit is None else limit)  # checks split and limit
        return evaluate_samples(model, samples, self.predict, self.score, self.eval_batch_size)

    def example_input(self) -> torch.Tensor | None:
        """One input batch for exporting the model as a single forward with only the batch dimension varying
        (``fewbit ptq --onnx``), or None where the model is not used that way (decoding loops, varying lengths)."""
        return None

    def data_key(self) -> dict[str, Any]:
        """What the config alone does not say about the data this machine will give (e.g. which source ``auto``
        picks), for cache keys; cheap, without loading the data."""
        return {}

    def artifacts(self) -> dict[str, bytes]:
        """Files a trained run keeps beside its weights so it can be evaluated later (e.g. a tokenizer)."""
        return {}

    def info(self) -> dict[str, Any]:
        """Facts about the prepared data (sizes, source) for logs and reports."""
        return {}

    # -- configs -----------------------------------------------------------------------------------------------
    @classmethod
    def config_names(cls) -> list[str]:
        prefix = f"{cls.name}-"
        return sorted(p.name[len(prefix):-5] for p in _config_dir().iterdir()
                      if p.name.startswith(prefix) and p.name.endswith(".yaml"))

    @classmethod
    def config_path(cls, config: str) -> Path:
        """The file of a named config (``quick``) or ``config`` itself when it is a path to a YAML file."""
        if config.endswith((".yaml", ".yml")) or "/" in config:
            path = Path(config)
            if not path.is_file():
                raise FileNotFoundError(f"config file {config!r} not found")
            return path
        path = Path(str(_config_dir() / f"{cls.name}-{config}.yaml"))
        if not path.is_file():
            raise ValueError(f"unknown config {config!r} for workload {cls.name!r}; valid: "
                             f"{', '.join(cls.config_names())} (or a path to a .yaml file)")
        return path

    @classmethod
    def load_config(cls, config: str | None = "quick", overrides: typing.Sequence[str] = (),
                    values: dict[str, Any] | None = None) -> TrainSettings:
        """The workload's Config from a named config or YAML file, then ``values`` (a dict, e.g. a saved run's),
        then ``key=value`` overrides (values parsed as YAML scalars: ``lr=3e-4``, ``target=de``)."""
        import yaml

        merged: dict[str, Any] = {}
        if config is not None:
            path = cls.config_path(config)
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: a config is a mapping of key: value, got {type(loaded).__name__}")
            merged.update(_checked(cls.Config, loaded, str(path)))
        merged.update(_checked(cls.Config, values or {}, "values"))
        parsed = {}
        for item in overrides:
            key, sep, text = item.partition("=")
            if not sep or not key:
                raise ValueError(f"override {item!r} is not key=value (e.g. steps=200)")
            parsed[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        merged.update(_checked(cls.Config, parsed, "overrides"))
        return cls.Config(**merged)


def _config_dir():
    return resources.files("fewbit.workloads") / "configs"


def config_dict(config: TrainSettings) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _checked(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` with each value coerced to the field's type; unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"unknown config key {key!r} in {where}; valid keys: {', '.join(sorted(fields))}")
        out[key] = _coerce(key, value, hints[key])
    return out


def _coerce(key: str, value: Any, hint: Any) -> Any:
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if kind is float and isinstance(value, str):  # YAML reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if kind is str and isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ValueError(f"config key {key!r}: expected {names}, got {value!r}")


def resolve_device(device: str) -> torch.device:
    """The torch device a config's ``device`` names; asking for CUDA where there is none is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device here; use device=cpu (or auto)")
    return torch.device(device)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or tuples, lists and dicts of them) on ``device``; anything else unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def model_device(model: Model) -> torch.device:
    """Where ``model``'s parameters (or buffers) are; CPU for a callable that is not a module, or has neither."""
    if isinstance(model, nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def evaluating(model: Model) -> Iterator[None]:
    """No autograd and, for a module, eval mode with its quantized weights frozen (:func:`fewbit.nn.frozen_weights`:
    their cached quantized forms are trusted while the evaluation runs); the module's own mode comes back afterwards
    (also on error)."""
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        with torch.no_grad(), frozen_weights(model):
            yield
    finally:
        if was_training:
            model.train()


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, out of a DistributedDataParallel wrapper (whose ``module`` it is)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def installed(module: str) -> bool:
    """Whether a Python package can be imported, without importing it (``fewbit workloads`` stays fast)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def batch_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, step, micro): batches are reproducible and a resumed run sees the
    same data."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + micro)
