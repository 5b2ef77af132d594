"""Calibration of static activation ranges, and post-training quantization the INT8 paper's way.

A static per-tensor quantizer fixes the scale of a layer's input at ``s = amax / fmt_max`` (INT8: ``amax / 127``):
values beyond ``amax`` saturate. Choosing ``amax`` trades clipping error (too small) against rounding error (too
large). :func:`calibrate` runs the float model once over calibration batches, records for every quantized layer's
input a histogram of ``|x|``, and picks ``amax`` from it by one of these methods:

==========================  ========================================================================================
method                      amax
==========================  ========================================================================================
``max``                     the largest ``|x|`` seen (exact, not a bin edge)
``percentile_99.9`` ...     the upper edge of the first bin where the cumulative count reaches p% of all values
``entropy``                 the threshold of least KL divergence between the clipped distribution and its quantized
                            version (below)
``mse``                     the threshold of least ``sum_b count_b * (c_b - Q(c_b))^2`` over bin centres ``c_b``,
                            with ``Q`` fewbit's own quantizer for the layer's format (so it holds for INT8, INT4 and
                            per-tensor FP8 alike)
==========================  ========================================================================================

Every method reads only the histograms, so trying them all costs one pass over the data; no method returns more
than the largest ``|x|`` seen.

**Histogram.** ``NUM_BINS = 2048`` equal bins over ``[0, R)`` where ``R`` is the smallest power of two *above* the
largest ``|x|`` seen. A value ``a`` falls in bin ``floor(a * 2048 / R)``; the product is exact (a power of two). When
a later batch holds a larger value, ``R`` doubles (``d`` times) and bin ``k`` merges into bin ``k >> d``: with power
of two ranges the coarse bins are unions of fine ones, so the extended histogram is *exactly* the one a single pass
over all batches would have built (no clipping, no re-binning approximation). The price: between 1024 and 2048 bins
cover ``[0, amax]``.

**Entropy (KL) calibration** (TensorRT's method, generalised by bit width). For ``L = 2^(bits-1)`` quantized levels
(INT8: 128, INT4: 8) and ``n`` the number of bins up to the last non-empty one, every candidate ``i`` from
``ENTROPY_START_BIN = 128`` to ``n`` (threshold ``i * bin_width``):

0. exact zeros are left out of ``h``: zero is exact at every scale, and after a ReLU zeros are often half of all
   values; counted, their spike in bin 0 dominates the divergence (it grows with the log of the chunk width) and
   drives the threshold down to the first candidates, clipping ReLU6 outputs at 1.0 instead of about 6;
1. ``P = h[0:i]`` with the outliers ``sum(h[i:])`` added to its last bin (what clipping at the threshold does);
2. the ``i`` bins split into ``L`` chunks of ``m = i // L`` bins, the last chunk taking the remainder;
   ``Q`` gives each non-empty bin of ``P`` in a chunk the chunk's count of the *unclipped* slice ``h[0:i]``
   divided by the number of non-empty bins of ``P`` in it (empty bins of ``P`` get 0);
3. ``KL(P || Q) = sum_{P_k > 0} p_k log(p_k / q_k)`` with ``p, q`` normalised to sum 1; ``+inf`` where some
   ``P_k > 0`` has ``q_k = 0`` (the outliers land in a chunk with no unclipped mass; that candidate is never chosen).

The candidate with the least KL wins (the smallest on ties). Entropy needs a uniform integer grid: it is defined for
integer formats; for FP8 use ``max``, a percentile or ``mse``.

**What is calibrated.** Every quantized layer (QLinear, QConv1d/2d, and the two input quantizers ``a`` and ``b``
of each :class:`~fewbit.nn.QAdd`, the residual adds) whose recipe has a per-tensor ``input`` spec: its input gets
the static ``amax`` (``PerTensor(amax=...)``). Weights need no calibration data: the ``int8`` recipe
scales them per output channel by their own max at run time (the paper's choice for weights). MX formats (per-block
E8M0 scales from each block's own max) need no calibration either; calibrating a model whose inputs use MX or
per-axis scaling is an error. ``QMatmul`` (attention's activation-times-activation products) is left on dynamic
per-tensor scaling and listed in :attr:`Calibration.skipped`.

**The pass.** The model runs in eval mode (BatchNorm on running statistics, dropout off), whatever mode it was
in (a model in train mode is put back in train mode afterwards), without gradients, with every quantized layer
computing in float (the paper calibrates on the float network). A NaN or infinite activation is an error naming the
layer.

**PTQ metrics.** :func:`ptq` compares metrics relative to the float one: a metric is within ``tolerance`` when it is
at most ``tolerance * |float metric|`` worse (below it when higher is better, above it otherwise). A NaN metric
counts as the worst possible (a calibrator or layer that makes the model produce NaN is never chosen and ranks as
the most sensitive); a non-finite float metric is an error, since nothing can be compared with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from fewbit import recipes as _recipes
from fewbit.nn import QMatmul, mark_skipped, quantize_, quantized_layers, replace_module
from fewbit.qtensor import QuantSpec, fake_quantize
from fewbit.recipes import Recipe
from fewbit.scaling import Block, PerAxis, PerTensor

__all__ = ["METHODS", "Calibration", "Histogram", "PTQReport", "calibrate", "collect", "ptq", "ptq_methods"]

NUM_BINS = 2048
ENTROPY_START_BIN = 128
PERCENTILES = ("99.9", "99.99", "99.999", "99.9999")
METHODS = ("max", *(f"percentile_{p}" for p in PERCENTILES), "entropy", "mse")


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; valid: {', '.join(METHODS)}")
    return method


# ---- the histogram ---------------------------------------------------------------------------------------------


class Histogram:
    """Counts of ``|x|`` in ``num_bins`` equal bins over ``[0, range)``, ``range`` the smallest power of two above
    the largest ``|x|`` seen (see the module docstring); ``amax`` is that largest value, exactly."""

    def __init__(self, num_bins: int = NUM_BINS) -> None:
        if num_bins < 2 or num_bins & (num_bins - 1):
            raise ValueError(f"num_bins={num_bins}; it must be a power of two >= 2 (default {NUM_BINS})")
        self.num_bins = num_bins
        self.counts = torch.zeros(num_bins, dtype=torch.int64)
        self.range_exponent: int | None = None  # range = 2^range_exponent; None until a nonzero value is seen
        self.amax = 0.0
        self.zeros = 0  # exact zeros among the counts (all in bin 0), left out by the entropy method

    @property
    def range(self) -> float:
        return 0.0 if self.range_exponent is None else math.ldexp(1.0, self.range_exponent)

    @property
    def bin_width(self) -> float:
        return self.range / self.num_bins

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def update(self, x: torch.Tensor, name: str = "tensor") -> None:
        """Add the values of ``x``; a larger max extends the range (merging bins exactly). NaN/inf: ValueError."""
        a = x.detach().reshape(-1).abs().float().cpu()
        if a.numel() == 0:
            return
        amax = float(a.max())
        if not math.isfinite(amax):  # max propagates NaN; inf is its own max
            raise ValueError(f"calibration: {name} holds {'NaN' if math.isnan(amax) else 'inf'} values; a range "
                             "cannot be calibrated from non-finite activations (check the model and the data)")
        if amax > 0:
            _, exponent = math.frexp(amax)  # amax = m * 2^exponent, 0.5 <= m < 1, so amax < 2^exponent
            if self.range_exponent is None:
                self.range_exponent = exponent
            elif exponent > self.range_exponent:
                shift = min(exponent - self.range_exponent, 62)
                merged = torch.arange(self.num_bins) >> shift
                self.counts = torch.zeros_like(self.counts).index_add_(0, merged, self.counts)
                self.range_exponent = exponent
        self.amax = max(self.amax, amax)
        self.zeros += int((a == 0).sum())
        if self.range_exponent is None:  # all zeros so far: bin 0 at any range
            self.counts[0] += a.numel()
            return
        # a * 2^(log2(num_bins) - range_exponent) is exact (a power of two); truncation is floor for a >= 0.
        index = (a * math.ldexp(1.0, int(math.log2(self.num_bins)) - self.range_exponent)).long()
        self.counts += torch.bincount(index.clamp_(max=self.num_bins - 1), minlength=self.num_bins)

    def used_bins(self) -> int:
        """Bins up to the last non-empty one."""
        nonzero = torch.nonzero(self.counts).reshape(-1)
        return int(nonzero[-1]) + 1 if nonzero.numel() else 0

    # -- methods --------------------------------------------------------------------------------------------------

    def percentile(self, percent: float) -> float:
        """Upper edge of the first bin where the cumulative count reaches ``percent`` % of all values (<= amax)."""
        if not 0 < percent <= 100:
            raise ValueError(f"percent={percent}; it must be in (0, 100]")
        cdf = torch.cumsum(self.counts, 0).double()
        # The relative nudge keeps 99.9 / 100 * 50000 (= 49950.000000000004 in binary) from asking for one more value.
        k = int(torch.searchsorted(cdf, percent / 100 * cdf[-1] * (1 - 1e-12)))
        return min((k + 1) * self.bin_width, self.amax)

    def entropy(self, levels: int, start_bin: int = ENTROPY_START_BIN) -> float:
        """The threshold of least KL divergence for ``levels`` quantized levels (module docstring)."""
        n = self.used_bins()
        if n == 0:
            return 0.0
        counts = self.counts[:n].clone()
        counts[0] -= self.zeros  # step 0 of the module docstring
        divergence = kl_divergences(counts, levels, start_bin)
        if divergence.numel() == 0 or not torch.isfinite(divergence).any():  # too few bins to choose from
            return self.amax
        i = int(torch.argmin(divergence)) + max(start_bin, levels)
        return min(i * self.bin_width, self.amax)

    def mse(self, spec: QuantSpec, coarse_candidates: int = 128, refine_bins: int = 32) -> float:
        """The threshold of least squared quantization error of the bin centres under ``spec``'s format.

        Thresholds are bin edges (the last one capped at amax), searched on ``coarse_candidates`` evenly spaced
        edges, then edge by edge within ``refine_bins`` of the best (the error is smooth in the threshold)."""
        n = self.used_bins()
        if n == 0:
            return 0.0
        width = self.bin_width
        # Every bin, empty or not, so that the grid below always has num_bins + 1 columns (one compiled kernel).
        centres = (torch.arange(self.num_bins, dtype=torch.float64) + 0.5) * width
        counts = self.counts.double()
        # One row per candidate threshold t: the centres clipped to t, then t itself, so that the row's max is t
        # and per-row scaling gives exactly the static scale t / fmt_max. Saturation equals clipping at t.
        per_row = QuantSpec(spec.format, PerAxis(0), overflow="saturate", symmetric=spec.symmetric)

        def errors(edges: torch.Tensor) -> torch.Tensor:
            thresholds = torch.clamp(edges.double() * width, max=self.amax)
            grid = torch.cat([torch.minimum(centres[None, :], thresholds[:, None]), thresholds[:, None]], 1)
            quantized = fake_quantize(grid.float(), per_row)[:, :-1].double()
            return ((centres[None, :] - quantized) ** 2 * counts[None, :]).sum(1)

        coarse = torch.unique(torch.linspace(1, n, min(coarse_candidates, n)).round().long())
        best = int(coarse[int(torch.argmin(errors(coarse)))])
        fine = torch.arange(max(1, best - refine_bins), min(n, best + refine_bins) + 1)
        best = int(fine[int(torch.argmin(errors(fine)))])
        return min(best * width, self.amax)

    def amax_for(self, method: str, spec: QuantSpec) -> float:
        """The calibrated amax of ``method`` for a tensor quantized by ``spec``."""
        _check_method(method)
        if method == "max":
            return self.amax
        if method.startswith("percentile_"):
            return self.percentile(float(method.removeprefix("percentile_")))
        if method == "entropy":
            if not spec.format.is_int:
                raise ValueError(f"entropy calibration needs a uniform integer grid; {spec.format.name} is a float "
                                 "format: use 'max', a percentile or 'mse'")
            return self.entropy(2 ** (spec.format.bits - 1))
        return self.mse(spec)


def kl_divergences(counts: torch.Tensor, levels: int, start_bin: int = ENTROPY_START_BIN) -> torch.Tensor:
    """KL(P || Q) for every candidate ``i = max(start_bin, levels) .. len(counts)`` (module docstring), float64.

    ``Q`` is constant over the non-empty bins of a chunk, so the divergence needs only per-chunk sums:
    with ``T`` the total count, ``P_j`` the count of ``P`` in chunk ``j``, ``S_j`` that of the unclipped slice and
    ``z_j`` the non-empty bins of ``P`` in it, ``p_k = P_k / T`` and ``q_k = S_j / (z_j * sum_j S_j)``::

        KL = sum_k p_k log p_k - sum_j (P_j / T) log(S_j / (z_j * sum_j S_j))

    Both sums come from prefix sums, O(levels) per candidate instead of O(bins)."""
    h = counts.double()
    n = h.numel()
    first = max(start_bin, levels)
    if first > n:
        return torch.empty(0, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    prefix = torch.cat([zero, torch.cumsum(h, 0)])  # prefix[k] = sum h[:k]
    prefix_nonempty = torch.cat([zero, torch.cumsum((h > 0).double(), 0)])
    prefix_hlogh = torch.cat([zero, torch.cumsum(torch.special.xlogy(h, h), 0)])
    total = prefix[-1]
    i = torch.arange(first, n + 1)  # (C,) candidates: bins kept
    per_chunk = i // levels  # m
    j = torch.arange(levels)
    lo = j[None, :] * per_chunk[:, None]  # (C, L) chunk bounds [lo, hi)
    hi = torch.where(j[None, :] == levels - 1, i[:, None], lo + per_chunk[:, None])
    sliced = prefix[hi] - prefix[lo]  # S_j
    outliers = total - prefix[i]
    last = h[i - 1]
    clipped_last = last + outliers  # P's last bin
    chunk_p = sliced.clone()
    chunk_p[:, -1] += outliers  # P_j
    nonempty = prefix_nonempty[hi] - prefix_nonempty[lo]
    nonempty[:, -1] += ((last == 0) & (outliers > 0)).double()  # the last bin is non-empty in P, not in h
    # sum_k P_k log P_k: the unclipped bins below i - 1, then P's last bin.
    plogp = prefix_hlogh[i - 1] + torch.special.xlogy(clipped_last, clipped_last)
    entropy_term = plogp / total - torch.log(total)  # sum p log p with p = P / T
    slice_total = prefix[i]
    q_level = sliced / (nonempty.clamp(min=1) * slice_total[:, None])  # q_k for the non-empty bins of chunk j
    cross = torch.where(chunk_p > 0, chunk_p / total * torch.log(q_level), 0.0).sum(1)
    kl = entropy_term - cross
    impossible = ((chunk_p > 0) & (sliced == 0)).any(1)  # P has mass where Q has none
    return torch.where(impossible, math.inf, kl)


# ---- collecting and applying -----------------------------------------------------------------------------------

_FLOAT = Recipe(name="fp32")


def _calibratable_layers(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Layers whose input gets a static amax, and the quantized layers that are not calibrated (with why)."""
    layers, skipped = {}, {}
    for name, module in quantized_layers(model):
        if module.recipe.is_identity:
            continue
        spec = module.recipe.input
        if spec is None:
            skipped[name] = "input not quantized by its recipe (nothing to calibrate)"
        elif isinstance(module, QMatmul):
            skipped[name] = "QMatmul (activation x activation) keeps dynamic per-tensor scaling"
        elif isinstance(spec.scaling, Block):
            raise ValueError(f"layer {name!r}: input spec {spec} uses MX block scaling, which takes each block's "
                             "scale from its own max at run time; MX needs no calibration (calibrate per-tensor "
                             "INT8, INT4 or FP8 inputs)")
        elif not isinstance(spec.scaling, PerTensor):
            raise ValueError(f"layer {name!r}: input spec {spec} uses {type(spec.scaling).__name__} scaling; "
                             "calibration sets one per-tensor amax, so the input spec must use PerTensor scaling")
        else:
            layers[name] = module
    return layers, skipped


def _default_forward(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


@contextlib.contextmanager
def float_pass(model: nn.Module):
    """Run ``model`` with every quantized layer computing in float, in eval mode, without gradients; restores the
    recipes and the training mode on exit."""
    saved = {m: m.recipe for _, m in quantized_layers(model)}
    was_training = model.training
    try:
        for module in saved:
            module.set_recipe(_FLOAT)
        model.eval()
        with torch.no_grad():
            yield model
    finally:
        for module, recipe in saved.items():
            module.set_recipe(recipe)
        model.train(was_training)


def static_input_recipe(recipe: Recipe, amax: float | None) -> Recipe:
    """``recipe`` with its per-tensor ``input`` spec given the static ``amax`` (None: back to dynamic scaling);
    ``input_backward`` follows when it was the same spec, so the dW GEMM reuses the forward's quantized input."""
    spec = recipe.input
    if amax is None:
        new = spec.replace(amax=None)
    else:
        new = spec.replace(amax=float(amax), delayed=False)
    backward = new if recipe.input_backward == spec else recipe.input_backward
    return recipe.replace(input=new, input_backward=backward)


@dataclass
class Calibration:
    """What one calibration pass saw: a histogram of ``|input|`` per calibrated layer. :meth:`amax` evaluates
    any method on them and :meth:`apply` sets the result on the model, without running it again."""

    histograms: dict[str, Histogram]
    specs: dict[str, QuantSpec]  # the input spec of each calibrated layer (format, for entropy and MSE)
    skipped: dict[str, str] = field(default_factory=dict)
    batches: int = 0
    seconds: float = 0.0
    method: str | None = None  # the method last applied

    def amax(self, method: str) -> dict[str, float]:
        """Per layer, the amax ``method`` chooses (layers whose input was all zeros are left out)."""
        _check_method(method)
        return {name: hist.amax_for(method, self.specs[name]) for name, hist in self.histograms.items()
                if hist.amax > 0}

    def apply(self, model: nn.Module, method: str) -> dict[str, float]:
        """Set the static input amax of ``method`` on ``model``'s calibrated layers; returns the amaxes."""
        amaxes = self.amax(method)
        for name, amax in amaxes.items():
            module = model.get_submodule(name)
            module.set_recipe(static_input_recipe(module.recipe, amax))
        self.method = method
        return amaxes


def collect(model: nn.Module, batches: Iterable, *, forward_fn: Callable[[nn.Module, object], object] | None = None,
            num_bins: int = NUM_BINS) -> Calibration:
    """One float pass of ``model`` over ``batches``, recording the input histogram of every calibratable layer
    (see the module docstring). ``forward_fn(model, batch)`` runs one batch (default: ``model(batch)``,
    ``model(*batch)`` for a tuple/list, ``model(**batch)`` for a dict)."""
    layers, skipped = _calibratable_layers(model)
    if not layers:
        raise ValueError(f"calibrate: {type(model).__name__} has no quantized layer with a per-tensor input spec to "
                         "calibrate; convert it first (fewbit.quantize_(model, 'int8') or pass recipe=...)"
                         + (f"; not calibratable: {skipped}" if skipped else ""))
    forward_fn = forward_fn or _default_forward
    histograms = {name: Histogram(num_bins) for name in layers}

    def observer(name):
        def hook(module, args):
            histograms[name].update(args[0], f"the input of layer {name!r}")
        return hook

    started = time.perf_counter()
    handles = [module.register_forward_pre_hook(observer(name)) for name, module in layers.items()]
    count = 0
    try:
        with float_pass(model):
            for batch in batches:
                forward_fn(model, batch)
                count += 1
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("calibrate: the calibration data gave no batches; pass at least one (the INT8 paper "
                         "calibrates on about 1000 samples)")
    for name, hist in list(histograms.items()):
        if hist.total == 0:
            skipped[name] = "not called during calibration (keeps dynamic scaling)"
            del histograms[name]
        elif hist.amax == 0:
            skipped[name] = "input was all zeros during calibration (keeps dynamic scaling)"
    return Calibration(histograms, {name: layers[name].recipe.input for name in histograms}, skipped, count,
                       time.perf_counter() - started)


def calibrate(model: nn.Module, batches: Iterable, method: str = "entropy", *, recipe: Recipe | str | None = None,
              forward_fn: Callable[[nn.Module, object], object] | None = None,
              num_bins: int = NUM_BINS) -> Calibration:
    """Calibrate the static input ranges of ``model``'s quantized layers on ``batches`` with ``method`` (one of
    :data:`METHODS`), in place. Returns the :class:`Calibration` (histograms kept, so other methods can be
    applied later with ``calibration.apply(model, method)`` without running the model again).

    ``recipe``: convert a float model first (``quantize_(model, recipe)``); without it the model must already hold
    quantized layers. Zero batches, NaN/inf activations, MX or per-axis input specs: ValueError.
    """
    _check_method(method)
    if recipe is not None:
        quantize_(model, recipe)
    calibration = collect(model, batches, forward_fn=forward_fn, num_bins=num_bins)
    calibration.apply(model, method)
    return calibration


# ---- post-training quantization ----------------------------------------------------------------------------------


@dataclass
class PTQReport:
    """What :func:`ptq` did. Metrics are ``evaluate``'s; ``sensitivity[layer]`` is the metric with only that layer
    quantized (empty when the calibrated model was already within tolerance); ``steps`` lists each evaluation in
    order (``{"step", "metric", "float_layers"}``)."""

    recipe: str
    float_metric: float
    higher_is_better: bool
    tolerance: float
    calibrator_metrics: dict[str, float]
    chosen_calibrator: str
    calibrated_metric: float
    final_metric: float
    within_tolerance: bool
    float_layers: list[str] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    layer_amax: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    calibration_batches: int = 0
    calibration_seconds: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def within_tolerance(metric: float, reference: float, tolerance: float, higher_is_better: bool) -> bool:
    """Relative tolerance: at most ``tolerance * |reference|`` worse than ``reference`` (NaN: never within)."""
    margin = tolerance * abs(reference)
    return metric >= reference - margin if higher_is_better else metric <= reference + margin


def _badness(metric: float, higher_is_better: bool) -> float:
    """A sort key, smaller is better; NaN is the worst."""
    if math.isnan(metric):
        return math.inf
    return -metric if higher_is_better else metric


def ptq_methods(recipe: Recipe | str, methods: Iterable[str] | None = None) -> list[str]:
    """The calibration methods :func:`ptq` tries for ``recipe``: ``methods``, checked, or by default every method of
    :data:`METHODS` that applies to the recipe's input format (entropy needs an integer grid). A recipe without a
    per-tensor input spec has no static range to calibrate: ValueError naming the recipes that have one."""
    recipe = _recipes.get(recipe)
    spec = recipe.input
    if spec is None or not isinstance(spec.scaling, PerTensor):
        usable = [name for name in _recipes.names()
                  if (r := _recipes.get(name)).input is not None and isinstance(r.input.scaling, PerTensor)]
        raise ValueError(f"ptq calibrates static per-tensor input ranges; recipe {recipe.name!r} has input spec "
                         f"{spec}, which has none to calibrate. Use one of: {', '.join(usable)}")
    if methods is None:
        return [m for m in METHODS if m != "entropy" or spec.format.is_int]
    methods = [_check_method(m) for m in methods]
    if not methods:
        raise ValueError(f"ptq: no calibration methods given; valid: {', '.join(METHODS)}")
    if "entropy" in methods and not spec.format.is_int:
        raise ValueError(f"entropy calibration needs a uniform integer grid; recipe {recipe.name!r} quantizes inputs "
                         f"to {spec.format.name}: leave 'entropy' out of methods")
    return methods


def ptq(model: nn.Module, recipe: Recipe | str = "int8", calibration: Iterable | None = None,
        evaluate: Callable[[nn.Module], float] | None = None, *,
        tolerance: float = 0.01, higher_is_better: bool = True, methods: Iterable[str] | None = None,
        max_float_layers: int | None = None, forward_fn: Callable[[nn.Module, object], object] | None = None,
        progress: bool = False) -> tuple[nn.Module, PTQReport]:
    """Post-training quantization of a float ``model`` by ``recipe`` (e.g. ``"int8"``: per-channel weights,
    per-tensor activations), the INT8 paper's workflow, in place:

    1. ``evaluate(model)`` on the float model (a float; ``higher_is_better=False`` for losses, WER, perplexity);
    2. convert, collect the input histograms once over ``calibration`` (batches), then evaluate every calibrator in
       ``methods`` (default: every one that applies, :func:`ptq_methods`; no further pass over the calibration
       data) and keep the best;
    3. if the metric is more than ``tolerance`` (relative to ``|float metric|``) worse than float, rank the
       quantized layers by sensitivity (the metric with *only* that layer quantized) and leave the most sensitive
       in float, one more at a time, until within tolerance (or ``max_float_layers`` are float).

    Layers left in float become plain float modules (listed by :func:`fewbit.summary`). The model is left in eval
    mode. Returns ``(model, report)``; ``progress`` prints each evaluation (rich). When anything fails on the way
    (no calibration batches, an ``eval_fn`` that raises, an interrupt) the model is restored as it was (its
    layers, recipes and training modes) before the error propagates, so a retry starts from the float model.
    """
    started = time.perf_counter()
    if calibration is None or evaluate is None:
        raise TypeError("ptq needs calibration= (batches of model inputs) and evaluate= (model -> metric), e.g. "
                        "fewbit.ptq(model, 'int8', calibration=batches, evaluate=accuracy)")
    recipe = _recipes.get(recipe)
    methods = ptq_methods(recipe, methods)
    if not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance}; it must be a relative tolerance >= 0 (0.01 is 1%)")
    if any(not m.recipe.is_identity for _, m in quantized_layers(model)):
        raise ValueError("ptq takes a float model; this one already has quantized layers (fewbit.dequantize_ it "
                         "first, or use fewbit.calibrate on it)")
    with _restored_on_failure(model):
        return _ptq(model, recipe, calibration, evaluate, tolerance, higher_is_better, methods, max_float_layers,
                    forward_fn, progress, started)


@contextlib.contextmanager
def _restored_on_failure(model: nn.Module):
    """On an exception, put every module of ``model`` back as it was on entry: its attributes (recipe, training
    mode, the skipped-layer record...) and its children (the float layers a conversion replaced), then re-raise."""
    saved = [(module, dict(module.__dict__), dict(module._modules)) for module in model.modules()]
    try:
        yield
    except BaseException:
        for module, attributes, children in saved:
            module.__dict__.clear()
            module.__dict__.update(attributes)
            module.__dict__["_modules"] = children
        raise


def _ptq(model, recipe, calibration, evaluate, tolerance, higher_is_better, methods, max_float_layers, forward_fn,
         progress, started) -> tuple[nn.Module, PTQReport]:
    console = None
    if progress:
        from rich.console import Console

        console = Console(stderr=True)
    steps: list[dict] = []

    def scored(step: str, float_layers: list[str]) -> float:
        model.eval()
        with torch.no_grad():
            metric = float(evaluate(model))
        steps.append({"step": step, "metric": metric, "float_layers": list(float_layers)})
        if console is not None:
            console.log(f"ptq {step}: {metric:.6g}")
        return metric

    float_metric = scored("float", [])
    if not math.isfinite(float_metric):
        raise ValueError(f"ptq: evaluate returned {float_metric} for the float model; a tolerance relative to it "
                         "means nothing (check the model and evaluate)")
    quantize_(model, recipe)
    calibration = collect(model, calibration, forward_fn=forward_fn)
    metrics = {}
    for method in methods:
        calibration.apply(model, method)
        metrics[method] = scored(f"calibrator {method}", [])
    chosen = min(methods, key=lambda m: _badness(metrics[m], higher_is_better))
    layer_amax = calibration.apply(model, chosen)
    calibrated = metrics[chosen]

    quantized = {name: m.recipe for name, m in quantized_layers(model) if not m.recipe.is_identity}
    sensitivity: dict[str, float] = {}
    float_layers: list[str] = []
    final = calibrated
    if not within_tolerance(calibrated, float_metric, tolerance, higher_is_better):
        def set_quantized(names: set[str]) -> None:
            for name, layer_recipe in quantized.items():
                model.get_submodule(name).set_recipe(layer_recipe if name in names else _FLOAT)

        for name in quantized:
            set_quantized({name})
            sensitivity[name] = scored(f"sensitivity {name}", [n for n in quantized if n != name])
        worst_first = sorted(quantized, key=lambda n: _badness(sensitivity[n], higher_is_better), reverse=True)
        sensitivity = {name: sensitivity[name] for name in worst_first}
        limit = len(worst_first) if max_float_layers is None else min(max_float_layers, len(worst_first))
        set_quantized(set(quantized))
        for k in range(1, limit + 1):
            float_layers = worst_first[:k]
            set_quantized(set(quantized) - set(float_layers))
            final = scored(f"{k} layer(s) in float", float_layers)
            if within_tolerance(final, float_metric, tolerance, higher_is_better):
                break
        for rank, name in enumerate(float_layers, 1):
            module = model.get_submodule(name)
            module.set_recipe(quantized[name])
            if name:
                replace_module(model, name, module.to_float())
            mark_skipped(model, name, f"left in float by ptq (sensitivity rank {rank})")
    report = PTQReport(
        recipe=recipe.name, float_metric=float_metric, higher_is_better=higher_is_better, tolerance=tolerance,
        calibrator_metrics=metrics, chosen_calibrator=chosen, calibrated_metric=calibrated, final_metric=final,
        within_tolerance=within_tolerance(final, float_metric, tolerance, higher_is_better), float_layers=float_layers,
        sensitivity=sensitivity, steps=steps,
        layer_amax={k: v for k, v in layer_amax.items() if k not in float_layers},
        skipped=dict(calibration.skipped), calibration_batches=calibration.batches,
        calibration_seconds=calibration.seconds, seconds=time.perf_counter() - started)
    return model, report
