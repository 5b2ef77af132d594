"""``sparsify_(model, pattern)``: prune a model's layers to N:M in place; ``summary``; masks saved and loaded.

**Which layers.** Linear, Conv1d and Conv2d layers (their quantized versions too) are pruned along their reduction
dimension (:mod:`fewbit.sparsity.masks`), and so is any layer type with a ``quantize_`` conversion whose weight is
stored transposed, ``(in, out)`` (transformers' GPT-2 ``Conv1D``): its mask is computed on the ``(out, in)`` matrix
the GEMM multiplies (:meth:`~fewbit.nn.QuantizedModule.weight_matrix`) and stored in the weight's own shape. Every
other layer with parameters stays dense with the reason recorded: an embedding, a layer that is not a GEMM (norms),
a layer whose weight is shared with another module (a tied embedding), a depthwise or grouped convolution with N or
fewer input channels per group (nothing to prune), a layer below ``min_weights``, the first prunable layer with
``skip_first=True``, or one excluded by ``filter_fn(module, name)`` or by ``layer_patterns`` (``{name pattern: "N:M"
or None}``, fnmatch, first match wins, as ``quantize_``'s ``layer_recipes``). :func:`summary` lists every layer:
pruned with its measured sparsity, or dense and why. Nothing is skipped silently, and a model with nothing to prune
is an error that lists why.

**Where the masks live.** On the model object (in its ``__dict__``, keyed by layer name, as ``quantize_`` keeps its
skipped layers), so ``deepcopy``, pickling and ``quantize_`` (which replaces layers under the same names and keeps
their parameters) carry them along; the weights themselves hold zeros at the pruned positions. The masks are not in
``state_dict``: :func:`save_masks` writes them to safetensors, :func:`load_masks` puts them on a model of the same
architecture, refusing any mask that does not fit (the first mismatch named). During training
:class:`~fewbit.sparsity.training.KeepMasks` keeps the zeros.

**Sparsifying twice** is refused: the model already has masks. :func:`densify_` forgets them (the weights stay as
they are, zeros included) so the model can be pruned again, e.g. to another pattern.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from fewbit.atomic import write_bytes
from fewbit.nn import QuantizedModule, conversion_for
from fewbit.sparsity import graph
from fewbit.sparsity.masks import (
    CRITERIA,
    Pattern,
    check_nm,
    magnitude_scores,
    nm_mask,
    parse_pattern,
    transposable_mask,
    wanda_scores,
)
from fewbit.sparsity.permute import kept_score, search_permutation

__all__ = ["LayerSparsity", "SparsitySummary", "apply_masks_", "densify_", "is_transposed", "load_masks", "masks",
           "matrix_of", "patterns", "prunable", "read_masks", "save_masks", "sparsify_", "summary"]

_STATE = "_fewbit_sparsity"
MASKS_FORMAT = "fewbit.masks.v1"
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def is_transposed(module: nn.Module) -> bool:
    """True for a layer whose 2-D weight is stored ``(in, out)``: its GEMM matrix (``weight_matrix``, of the module
    or of its ``quantize_`` conversion) is the weight's transpose, a view of the same storage."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or (isinstance(module, PRUNABLE)
                                                           and not isinstance(module, QuantizedModule)):
        return False
    if isinstance(module, QuantizedModule):
        matrix = module.weight_matrix()
    else:
        convert = conversion_for(type(module))
        if convert is None:
            return False
        matrix = convert(module, "fp32").weight_matrix()
    return (isinstance(matrix, torch.Tensor) and matrix.data_ptr() == w.data_ptr()
            and tuple(matrix.shape) == tuple(w.shape)[::-1] and tuple(matrix.stride()) == tuple(w.stride())[::-1])


def prunable(module: nn.Module) -> bool:
    """A Linear, Conv1d or Conv2d layer (quantized or not), or a 2-D layer stored transposed (:func:`is_transposed`)."""
    return isinstance(module, PRUNABLE) or is_transposed(module)


def matrix_of(module: nn.Module) -> torch.Tensor:
    """The layer's weight in the ``(out, in, *kernel)`` layout masks are computed in (a view)."""
    return module.weight.t() if is_transposed(module) else module.weight


def _state(model: nn.Module) -> dict | None:
    return model.__dict__.get(_STATE)


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer name: bool mask}`` (True = kept, the weight's shape) of a sparsified model; empty otherwise."""
    state = _state(model)
    return dict(state["masks"]) if state else {}


def patterns(model: nn.Module) -> dict[str, str]:
    """``{layer name: "N:M"}`` of a sparsified model's pruned layers; empty otherwise."""
    state = _state(model)
    return dict(state["patterns"]) if state else {}


def _dense_reason(name: str, module: nn.Module, owners: dict[int, list[str]]) -> str | None:
    """Why ``module`` cannot be pruned, or None when it can (before the user's choices)."""
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return "embedding (a lookup table, not a GEMM)"
    if not prunable(module):
        if isinstance(module, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm):
            return f"{type(module).__name__}: a normalization, not a GEMM"
        return (f"{type(module).__name__}: only Linear, Conv1d and Conv2d layers (and layers stored transposed, "
                "such as GPT-2's Conv1D) are pruned")
    others = [o for o in owners.get(id(module.weight), []) if o != name]
    if others:
        return f"weight shared with {', '.join(others)} (tied); pruning it would prune them too"
    return None


def _owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    return owners


def _calibrate(model: nn.Module, names: list[str], batches: Iterable, forward_fn) -> dict[str, torch.Tensor]:
    """L2 norm of each input channel of each layer in ``names`` over the calibration batches."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        module = model.get_submodule(name)
        channels_last = isinstance(module, nn.Linear) or is_transposed(module)  # once, not on every forward

        def record(module, inputs):
            x = inputs[0].detach().float()
            channels = x.dim() - 1 if channels_last else 1
            dims = [d for d in range(x.dim()) if d != channels]
            s = x.square().sum(dims)
            sums[name] = sums[name] + s if name in sums else s
        return record

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    was_training = model.training
    model.eval()
    count = 0
    try:
        with torch.no_grad():
            for batch in batches:
                forward_fn(model, batch)
                count += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("criterion='wanda' needs calibration batches; the iterable given was empty")
    missing = [n for n in names if n not in sums]
    if missing:
        raise ValueError(f"criterion='wanda': the calibration forward pass never ran layer(s) {missing[:5]}; "
                         "pass a forward_fn that runs the whole model, or exclude them")
    return {n: s.sqrt() for n, s in sums.items()}


def sparsify_(model: nn.Module, pattern: str | Pattern = "2:4", criterion: str = "magnitude", *,
              filter_fn: Callable[[nn.Module, str], bool] | None = None,
              layer_patterns: dict[str, str | Pattern | None] | None = None,
              calibration: Iterable | None = None, forward_fn: Callable[[nn.Module, object], object] | None = None,
              transposable: bool = False, permute: bool = False, permute_time: float = 1.0,
              min_weights: int = 0, skip_first: bool = False) -> nn.Module:
    """Prune ``model``'s Linear and convolution layers to ``pattern`` (``"2:4"``, ``"1:2"``, ``"4:8"``) in place;
    see the module docstring. Returns ``model``.

    ``criterion``: ``"magnitude"`` (|W|) or ``"wanda"`` (|W| times each input channel's L2 norm over
    ``calibration``, an iterable of batches run as ``forward_fn(model, batch)``, default ``model(batch)``, in eval
    mode without gradients). ``transposable``: masks N:M along both dimensions of each weight matrix (M <= 4).
    ``permute``: before pruning, search a permutation of each layer's input channels that keeps more of the score
    (:func:`~fewbit.sparsity.search_permutation`, ``permute_time`` seconds per layer) and apply it with its
    producer wherever the model's data flow allows (:mod:`fewbit.sparsity.graph`); the dense model computes the
    same function. ``min_weights``: smaller layers stay dense. ``skip_first``: the first prunable layer (in
    ``named_modules`` order) stays dense.
    """
    default = parse_pattern(pattern)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r}; valid: {', '.join(CRITERIA)}")
    if criterion == "wanda" and calibration is None:
        raise ValueError("criterion='wanda' needs calibration= (batches to measure the input norms on) and, unless "
                         "model(batch) runs the model, forward_fn=")
    if transposable and permute:
        raise ValueError("transposable=True with permute=True: a channel permutation is searched for the "
                         "row-wise mask; choose one of the two")
    if _state(model):
        raise ValueError(f"sparsify_: {type(model).__name__} is already sparsified ({len(_state(model)['masks'])} "
                         "layer(s) hold masks); call fewbit.sparsity.densify_(model) first to prune it again")
    overrides = {k: (parse_pattern(v) if v is not None else None) for k, v in (layer_patterns or {}).items()}
    owners = _owners(model)
    chosen: dict[str, Pattern] = {}
    dense: dict[str, str] = {}
    seen_prunable = False
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        reason = _dense_reason(name, module, owners)
        is_first = reason is None and not seen_prunable
        seen_prunable = seen_prunable or reason is None
        if reason is None:
            layer_pattern = default
            for key, value in overrides.items():
                if fnmatch.fnmatchcase(name, key):
                    layer_pattern = value
                    if value is None:
                        reason = f"kept dense by layer_patterns ({key!r})"
                    break
        if reason is None and filter_fn is not None and not filter_fn(module, name):
            reason = "excluded by filter_fn"
        if reason is None and matrix_of(module).shape[1] <= layer_pattern.n:
            groups = getattr(module, "groups", 1)
            reason = (f"{'depthwise/grouped convolution: ' if groups > 1 else ''}{matrix_of(module).shape[1]} input "
                      f"channel(s) per group, at most N={layer_pattern.n} of a group of {layer_pattern.m}: "
                      "nothing to prune")
        if reason is None and module.weight.numel() < min_weights:
            reason = f"too small: {module.weight.numel()} weights < min_weights={min_weights}"
        if reason is None and skip_first and is_first:
            reason = "first prunable layer, kept dense by choice (skip_first)"
        if reason is None:
            chosen[name] = layer_pattern
        else:
            dense[name] = reason
    if not chosen:
        listed = "; ".join(f"{n or '(model)'}: {r}" for n, r in dense.items()) or "no layer has parameters"
        raise ValueError(f"sparsify_: nothing to prune in {type(model).__name__}. {listed}")
    norms = _calibrate(model, list(chosen), calibration, forward_fn or (lambda m, b: m(b))) \
        if criterion == "wanda" else {}

    def scores_of(name: str) -> torch.Tensor:
        module = model.get_submodule(name)
        if criterion == "wanda":
            return wanda_scores(matrix_of(module), norms[name], getattr(module, "groups", 1))
        return magnitude_scores(matrix_of(module))

    permuted: dict[str, dict] = {}
    if permute:
        for name, p in chosen.items():
            chain = graph.find_chain(model, name)
            if isinstance(chain, str):
                permuted[name] = {"applied": False, "reason": chain}
                continue
            scores = scores_of(name)
            perm = search_permutation(scores, p, time_limit=permute_time, seed=0)
            before, after = kept_score(scores, p), kept_score(scores, p, perm)
            graph.permute_chain_(model, chain, perm)
            if name in norms:
                norms[name] = norms[name][perm]
            permuted[name] = {"applied": True, "producer": chain.producer, "kept_before": before,
                              "kept_after": after, "gain": after / before - 1 if before else 0.0}
    result: dict[str, torch.Tensor] = {}
    for name, p in chosen.items():
        scores = scores_of(name)
        mask = transposable_mask(scores, p) if transposable else nm_mask(scores, p)
        result[name] = mask.t().contiguous() if is_transposed(model.get_submodule(name)) else mask  # weight's shape
    model.__dict__[_STATE] = {"masks": result, "patterns": {n: str(p) for n, p in chosen.items()}, "dense": dense,
                              "criterion": criterion, "transposable": transposable, "permuted": permuted}
    apply_masks_(model)
    return model


def densify_(model: nn.Module) -> nn.Module:
    """Forget ``model``'s masks (the weights keep their values, zeros included); returns ``model``."""
    model.__dict__.pop(_STATE, None)
    return model


@torch.no_grad()
def apply_masks_(model: nn.Module) -> nn.Module:
    """Zero every pruned weight of ``model`` (its masks); returns ``model``."""
    for name, mask in masks(model).items():
        w = model.get_submodule(name).weight
        w.mul_(mask.to(device=w.device, dtype=w.dtype))
    return model


# ---- summary ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSparsity:
    """One layer with parameters in a :class:`SparsitySummary`. ``pruned``: it holds a mask; ``sparsity``: the
    measured fraction of zero weights (pruned or not); ``nm``: the weight is ``pattern`` along its reduction
    dimension, measured on the weight itself; ``reason``: why a dense layer is dense; ``permutation``: what the
    channel permutation did (kept-score gain) or why there was none (with ``permute=True``)."""

    name: str
    type: str
    shape: tuple[int, ...]
    weights: int
    pruned: bool
    pattern: str | None
    sparsity: float
    nm: bool | None
    reason: str | None = None
    permutation: dict | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "type": self.type, "shape": list(self.shape), "weights": self.weights,
                "pruned": self.pruned, "pattern": self.pattern, "sparsity": self.sparsity, "nm": self.nm,
                "reason": self.reason, "permutation": self.permutation}


@dataclass(frozen=True)
class SparsitySummary:
    """Every layer with parameters of a model: pruned or dense (and why). ``pruned_sparsity`` is the fraction of
    zeros over the pruned layers' weights."""

    model: str
    rows: tuple[LayerSparsity, ...] = ()
    criterion: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def pruned(self) -> list[str]:
        return [r.name for r in self.rows if r.pruned]

    @property
    def pruned_sparsity(self) -> float:
        rows = [r for r in self.rows if r.pruned]
        total = sum(r.weights for r in rows)
        return sum(r.sparsity * r.weights for r in rows) / total if total else 0.0

    def to_dict(self) -> dict:
        return {"model": self.model, "criterion": self.criterion, "pruned": self.pruned,
                "pruned_sparsity": self.pruned_sparsity, "layers": [r.to_dict() for r in self.rows]}


def summary(model: nn.Module) -> SparsitySummary:
    """Every layer of ``model`` with parameters, as a :class:`SparsitySummary` (a record; rendered by
    :mod:`fewbit.report.sparsity`). A model never sparsified lists every layer as dense."""
    state = _state(model) or {"masks": {}, "patterns": {}, "dense": {}, "criterion": None, "permuted": {}}
    rows = []
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        w = getattr(module, "weight", None)
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else ()
        count = w.numel() if isinstance(w, torch.Tensor) else 0
        zeros = float((w == 0).sum()) / count if count else 0.0
        pruned = name in state["masks"]
        pattern = state["patterns"].get(name)
        nm = (check_nm(matrix_of(module).detach(), pattern, state.get("transposable", False)) is None) if pruned \
            else None
        reason = None if pruned else state["dense"].get(name, "not sparsified (sparsify_ was not called)"
                                                        if not state["masks"] else "added after sparsify_")
        rows.append(LayerSparsity(name=name, type=type(module).__name__, shape=shape, weights=count, pruned=pruned,
                                  pattern=pattern, sparsity=zeros, nm=nm, reason=reason,
                                  permutation=state["permuted"].get(name)))
    return SparsitySummary(model=type(model).__name__, rows=tuple(rows), criterion=state["criterion"])


# ---- saving -------------------------------------------------------------------------------------------------------


def save_masks(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s masks (uint8, one tensor per layer name) and its sparsity record (patterns, dense layers
    and why, criterion, permutations) to a safetensors file, atomically."""
    from safetensors.torch import save

    state = _state(model)
    if not state:
        raise ValueError(f"save_masks: {type(model).__name__} has no masks (call fewbit.sparsify_ first)")
    tensors = {name: m.to(torch.uint8).cpu().contiguous() for name, m in state["masks"].items()}
    record = {k: v for k, v in state.items() if k != "masks"}
    write_bytes(path, save(tensors, metadata={"format": MASKS_FORMAT, "record": json.dumps(record)}))


def read_masks(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The masks (``{layer name: bool mask}``) and the sparsity record of a file written by :func:`save_masks`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != MASKS_FORMAT:
            raise ValueError(f"{path}: not a fewbit masks file (format {meta.get('format')!r}, expected "
                             f"{MASKS_FORMAT!r})")
        loaded = {name: f.get_tensor(name).to(torch.bool) for name in f.keys()}
    return loaded, json.loads(meta["record"])


def load_masks(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put the masks of ``path`` (written by :func:`save_masks`) on ``model`` and zero its pruned weights. Every
    mask must fit: a layer of that name with a prunable weight of the mask's shape; otherwise a ValueError names
    the first mismatch. Refused on a model that already has masks (:func:`densify_` first)."""
    if _state(model):
        raise ValueError(f"load_masks: {type(model).__name__} already has masks; call densify_(model) first")
    loaded, record = read_masks(path)
    modules = dict(model.named_modules())
    for name in sorted(loaded):
        mask = loaded[name]
        module = modules.get(name)
        if module is None:
            raise ValueError(f"{path}: a mask for layer {name!r}, which {type(model).__name__} does not have; these "
                             "masks belong to another model")
        w = getattr(module, "weight", None)
        if not prunable(module) or not isinstance(w, torch.Tensor):
            raise ValueError(f"{path}: a mask for {name!r}, a {type(module).__name__} here (not a Linear or "
                             "convolution); these masks belong to another model")
        if tuple(w.shape) != tuple(mask.shape):
            raise ValueError(f"{path}: the mask for {name!r} has shape {tuple(mask.shape)}, its weight here "
                             f"{tuple(w.shape)}; these masks belong to another model")
        problem = check_nm(mask.t() if is_transposed(module) else mask, record["patterns"][name],
                           record.get("transposable", False))
        if problem is not None:
            raise ValueError(f"{path}: the mask for {name!r} is not {record['patterns'][name]}: {problem}")
    model.__dict__[_STATE] = {"masks": {n: loaded[n].to(modules[n].weight.device) for n in loaded}, **record}
    apply_masks_(model)
    return model
