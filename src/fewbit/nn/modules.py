"""Quantized modules: drop-in subclasses of ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, and ``QMatmul``.

Each keeps its float parameters (same names, same ``state_dict`` keys) and quantizes on the fly by its recipe. In
eval mode without autograd the quantized weight is cached and recomputed when the weight changes (its version
counter or storage moves).
"""

from __future__ import annotations

import torch
from torch import nn

from fewbit import recipes as _recipes
from fewbit.nn import functional as QF
from fewbit.recipes import Recipe


class _Quantized:
    """Shared behaviour: the recipe, the per-module state, and the eval-mode weight cache."""

    recipe: Recipe

    def _init_quant(self, recipe: Recipe | str) -> None:
        self.recipe = _recipes.get(recipe)
        self._state = QF._State(self.recipe)
        self._weight_cache: tuple[tuple, torch.Tensor] | None = None

    def _cached_weight(self, quantize) -> torch.Tensor | None:
        if self.training or torch.is_grad_enabled() or self.recipe.is_identity:
            return None
        w = self.weight
        key = (w._version, w.data_ptr(), w.dtype, w.device)
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = (key, quantize(w.detach()))
        return self._weight_cache[1]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}"

    def __getstate__(self):  # deepcopy / pickle: the cache is derived, drop it
        state = self.__dict__.copy()
        state["_weight_cache"] = None
        return state


class QLinear(_Quantized, nn.Linear):
    """``nn.Linear`` whose GEMMs run in the recipe's formats (forward and backward)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipe: Recipe | str = "fp32",
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quant(recipe)

    @classmethod
    def from_float(cls, linear: nn.Linear, recipe: Recipe | str) -> QLinear:
        """A QLinear sharing ``linear``'s parameters (an optimizer holding them keeps working)."""
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = linear.in_features, linear.out_features
        q.weight, q.bias = linear.weight, linear.bias
        q.train(linear.training)
        q._init_quant(recipe)
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


class _QConvNd(_Quantized):
    _float_cls: type[nn.modules.conv._ConvNd]

    @classmethod
    def from_float(cls, conv, recipe: Recipe | str):
        if conv.padding_mode != "zeros":
            raise ValueError(f"{type(conv).__name__} with padding_mode={conv.padding_mode!r} is not supported; "
                             "only 'zeros'")
        q = cls.__new__(cls)
        q.__dict__.update(conv.__dict__)  # parameters, buffers, hyper-parameters, hooks: shared, not copied
        q._init_quant(recipe)
        return q

    def to_float(self):
        conv = self._float_cls.__new__(self._float_cls)
        conv.__dict__.update({k: v for k, v in self.__dict__.items()
                              if k not in ("recipe", "_state", "_weight_cache")})
        return conv

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


class QMatmul(_Quantized, nn.Module):
    """``a @ b`` for two activations (attention's QK^T and PV) in the recipe's formats. fewbit's models call
    it instead of ``@`` so that ``quantize_`` can reach those products; with the fp32 recipe it is ``a @ b``."""

    weight = None

    def __init__(self, recipe: Recipe | str = "fp32") -> None:
        super().__init__()
        self._init_quant(recipe)

    def set_recipe(self, recipe: Recipe | str) -> None:
        self._init_quant(recipe)

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
