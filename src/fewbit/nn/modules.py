"""Quantized modules: drop-in subclasses of ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``; ``QMatmul`` (activation x
activation products) and ``QAdd`` (residual adds).

Each keeps its float parameters (same names, same ``state_dict`` keys) and quantizes on the fly by its recipe. In
eval mode without autograd the quantized weight is cached and recomputed when the weight changes: its version
counter or storage moves, or its bits differ from the copy the cache was made from (an edit through ``.data``, as
in ``layer.weight.data.mul_(0)``, bumps no version counter). The bits are compared exactly on every forward, by one
C ``memcmp`` of the weight against the copy on the CPU (``fewbit.kernels.native.same_bits``). That comparison reads
the weight twice over, on every forward: on the 4 x 1024 MLP of ``benchmarks.bench_train_step`` it is two thirds
of what an MXFP8 eval forward costs beyond FP32. Inside :func:`frozen_weights` (fewbit's own evaluations run there:
``Workload.evaluate``, ``fewbit.study``, the LoadGen backends) the bits are not compared, only the version counter
and the storage: an evaluation loop that owns the model changes no weight behind autograd's back. ``QMatmul`` and
``QActivation`` (the two input quantizers of a ``QAdd``) have no weights: ``quantize_`` converts them by setting
their recipe in place.

:class:`QuantizedModule` is the protocol every quantized layer follows (a recipe, :meth:`~QuantizedModule.set_recipe`,
``from_float`` / ``to_float``, :meth:`~QuantizedModule.weight_matrix`); :func:`quantized_layers` finds them in a model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from fewbit import recipes as _recipes
from fewbit.kernels import native
from fewbit.nn import functional as QF
from fewbit.recipes import Recipe
from fewbit.scaling import PerTensor


class QuantizedModule:
    """The quantized-module protocol (a mixin in front of the float module class it replaces): a ``recipe``, the
    per-module state its autograd functions keep (delayed-scaling amax histories), and the eval-mode weight cache.

    A quantized layer type provides ``from_float(float_module, recipe)`` (a classmethod: the quantized module,
    sharing the float module's parameters) and ``to_float()`` (the float module back, same parameters); register
    the conversion with :func:`fewbit.nn.register_conversion`. Every quantized layer has a ``weight`` attribute
    (None for the weightless :class:`QMatmul` and :class:`QActivation`)."""

    recipe: Recipe
    weight: torch.Tensor | None

    def set_recipe(self, recipe: Recipe | str) -> None:
        """Quantize by ``recipe`` (a Recipe or a preset name) from now on. Resets what the old recipe left: the
        per-module state (delayed-scaling amax histories) and the cached quantized weight."""
        self.recipe = _recipes.get(recipe)
        self._state = QF._State(self.recipe)
        self._weight_cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def weight_matrix(self) -> torch.Tensor | None:
        """The weight as the ``(out_features, reduction)`` matrix the forward GEMM multiplies and the recipe's
        ``weight`` spec quantizes along its rows (dimension 1); None for a layer without weights."""
        return self.weight

    def _cached_weight(self, quantize) -> torch.Tensor | None:
        if self.training or torch.is_grad_enabled() or self.recipe.is_identity:
            return None
        w = self.weight.detach()
        key = (self.weight._version, w.data_ptr(), w.dtype, w.device, w.shape)
        cache = self._weight_cache
        frozen = self.__dict__.get("_weights_frozen", False)
        # A cache made inside frozen_weights keeps no copy of the weight, so outside it is remade once, then checked.
        if cache is None or cache[0] != key or not (frozen or (cache[1] is not None and native.same_bits(w, cache[1]))):
            self._weight_cache = cache = (key, None if frozen else w.clone(), quantize(w))
        return cache[2]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}"

    def __getstate__(self):  # deepcopy / pickle: the cache is derived, drop it
        state = self.__dict__.copy()
        state["_weight_cache"] = None
        state.pop("_weights_frozen", None)
        return state


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, QuantizedModule]]:
    """``(name, module)`` for every :class:`QuantizedModule` in ``model`` (``model`` itself included, named ``""``),
    in ``named_modules`` order; whatever their recipe, ``fp32`` included."""
    for name, module in model.named_modules():
        if isinstance(module, QuantizedModule):
            yield name, module


@contextlib.contextmanager
def frozen_weights(model: object) -> Iterator[object]:
    """Within the block, the eval-mode weight cache of every quantized layer in ``model`` trusts the weight's version
    counter and storage and skips the exact comparison of its bits: what an evaluation loop that owns the model
    wants (no weight changes while it runs, or only through tracked in-place ops such as ``load_state_dict`` and
    optimizer steps, which bump the version counter and are still seen). A write the version counter does not see
    (through ``.data``, numpy or the raw storage) made inside the block is not seen by the cache until the block
    ends; after it every layer checks its bits again. Nests; the previous state comes back on exit, also on error.
    A model that is not an ``nn.Module`` (a plain callable, an onnxruntime session) has no cache: nothing changes."""
    modules = quantized_layers(model) if isinstance(model, nn.Module) else ()
    layers = [m for _, m in modules if getattr(m, "weight", None) is not None]
    before = [m.__dict__.get("_weights_frozen", False) for m in layers]
    for m in layers:
        m.__dict__["_weights_frozen"] = True
    try:
        yield model
    finally:
        for m, was in zip(layers, before, strict=True):
            m.__dict__["_weights_frozen"] = was


class QLinear(QuantizedModule, nn.Linear):
    """``nn.Linear`` whose GEMMs run in the recipe's formats (forward and backward)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipe: Recipe | str = "fp32",
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.set_recipe(recipe)

    @classmethod
    def from_float(cls, linear: nn.Linear, recipe: Recipe | str) -> QLinear:
        """A QLinear sharing ``linear``'s parameters (an optimizer holding them keeps working)."""
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = linear.in_features, linear.out_features
        q.weight, q.bias = linear.weight, linear.bias
        q.train(linear.training)
        q.set_recipe(recipe)
        return q

    def to_float(self) -> nn.Linear:
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = self.weight, self.bias
        linear.train(self.training)
        return linear

    def quantized_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return QF.quantize_operand(weight, self.recipe.weight, 1, self.recipe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return QF.qlinear(x, self.weight, self.bias, self.recipe, self._state,
                          self._cached_weight(self.quantized_weight))


class _QConvNd(QuantizedModule):
    _float_cls: type[nn.modules.conv._ConvNd]

    @classmethod
    def from_float(cls, conv, recipe: Recipe | str):
        if conv.padding_mode != "zeros":
            raise ValueError(f"{type(conv).__name__} with padding_mode={conv.padding_mode!r} is not supported; "
                             "only 'zeros'")
        q = cls.__new__(cls)
        q.__dict__.update(conv.__dict__)  # parameters, buffers, hyper-parameters, hooks: shared, not copied
        q.set_recipe(recipe)
        return q

    def to_float(self):
        conv = self._float_cls.__new__(self._float_cls)
        conv.__dict__.update({k: v for k, v in self.__dict__.items()
                              if k not in ("recipe", "_state", "_weight_cache", "_weights_frozen")})
        return conv

    def weight_matrix(self) -> torch.Tensor:
        """The weight ``(O, C/g, *k)`` as the ``(O, C/g * prod(k))`` matrix of the im2col GEMM."""
        return QF._weight_as_gemm(self.weight)

    def quantized_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return QF.quantize_operand(QF._weight_as_gemm(weight), self.recipe.weight, 1, self.recipe).reshape(
            weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.padding, str):
            if self.padding != "valid":
                raise ValueError(f"padding={self.padding!r} is not supported by fewbit's quantized convolution; "
                                 "use numeric padding")
            padding = 0
        else:
            padding = self.padding
        return QF.qconv(x, self.weight, self.bias, self.recipe, self.stride, padding, self.dilation, self.groups,
                        self._state, self._cached_weight(self.quantized_weight))


class QConv1d(_QConvNd, nn.Conv1d):
    """``nn.Conv1d`` in the recipe's formats."""

    _float_cls = nn.Conv1d


class QConv2d(_QConvNd, nn.Conv2d):
    """``nn.Conv2d`` in the recipe's formats."""

    _float_cls = nn.Conv2d


class QMatmul(QuantizedModule, nn.Module):
    """``a @ b`` for two activations (attention's QK^T and PV) in the recipe's formats. fewbit's models call
    it instead of ``@`` so that ``quantize_`` can reach those products; with the fp32 recipe it is ``a @ b``."""

    weight = None

    def __init__(self, recipe: Recipe | str = "fp32") -> None:
        super().__init__()
        self.set_recipe(recipe)

    @classmethod
    def from_float(cls, module: QMatmul, recipe: Recipe | str) -> QMatmul:
        module.set_recipe(recipe)
        return module

    def to_float(self) -> QMatmul:
        self.set_recipe("fp32")
        return self

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return QF.qmatmul(a, b, self.recipe, self._state)

    def extra_repr(self) -> str:
        return f"recipe={self.recipe.name}"


def _integer_per_tensor(recipe: Recipe) -> bool:
    """Whether ``recipe`` quantizes inputs to an integer format with one scale per tensor (``int8``): the recipes
    under which :class:`QActivation` quantizes."""
    spec = recipe.input
    return spec is not None and spec.format.is_int and isinstance(spec.scaling, PerTensor)


class QActivation(QuantizedModule, nn.Module):
    """One activation quantized on its own, as an integer runtime stores it between two integer ops (each input of a
    :class:`QAdd`). Under a recipe whose ``input`` spec is an integer format with one scale per tensor (``int8``)
    it fake-quantizes its input by that spec, with a static range once calibrated (:func:`fewbit.calibrate` treats
    it like any layer's input), and passes the gradient straight through (zeroed where a static range clipped).
    Under every other recipe it is the identity and its recipe reads fp32: float formats (FP8, MX) are added in
    high precision by the hardware that uses them, and no runtime adds block-scaled tensors as integers."""

    weight = None

    def __init__(self, recipe: Recipe | str = "fp32") -> None:
        super().__init__()
        self.set_recipe(recipe)

    def set_recipe(self, recipe: Recipe | str) -> None:
        """As :meth:`QuantizedModule.set_recipe`; a recipe whose inputs are not per-tensor integers reads fp32."""
        recipe = _recipes.get(recipe)
        super().set_recipe(recipe if _integer_per_tensor(recipe) else "fp32")

    @classmethod
    def from_float(cls, module: QActivation, recipe: Recipe | str) -> QActivation:
        module.set_recipe(recipe)
        return module

    def to_float(self) -> QActivation:
        self.set_recipe("fp32")
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return QF.qactivation(x, self.recipe, self._state)

    def extra_repr(self) -> str:
        return f"recipe={self.recipe.name}"


class QAdd(nn.Module):
    """``a + b`` with each input quantized by its own :class:`QActivation` (``self.a``, ``self.b``), which
    ``quantize_`` converts and :func:`fewbit.calibrate` calibrates, each with its own range. This is what an INT8
    runtime needs to add on integer codes (onnxruntime's QLinearAdd, after :func:`fewbit.export_onnx`); fewbit's
    models use it for their residual adds. Under the fp32 recipe, and under every recipe whose inputs are not
    per-tensor integers, it is exactly ``a + b``. The sum itself stays in float: the next quantized layer
    quantizes it."""

    def __init__(self, recipe: Recipe | str = "fp32") -> None:
        super().__init__()
        self.a, self.b = QActivation(recipe), QActivation(recipe)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a(a) + self.b(b)


# Quantized modules without weights: quantize_ sets their recipe in place instead of swapping the module.
RECIPE_ONLY = (QMatmul, QActivation)
