"""Hugging Face ``transformers`` layers: GPT-2's ``Conv1D`` (``y = x W + b`` with ``W`` stored ``(in, out)``).

Imported by :func:`fewbit.nn.conversion_for` the first time ``quantize_`` meets a module of a ``transformers``
type, so that importing fewbit never imports transformers; importing this module registers the conversion.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fewbit.nn import functional as QF
from fewbit.nn.convert import register_conversion
from fewbit.nn.modules import QLinear
from fewbit.recipes import Recipe

__all__ = ["QHFConv1D"]


class QHFConv1D(QLinear):
    """transformers' ``Conv1D`` as a QLinear. It keeps the ``(in, out)`` weight parameter (same ``state_dict`` key
    and shape) and quantizes its transpose, the ``(out, in)`` matrix of :meth:`weight_matrix`, blocks along
    ``in``."""

    @classmethod
    def from_float(cls, conv: Conv1D, recipe: Recipe | str) -> QHFConv1D:
        """A QHFConv1D sharing ``conv``'s parameters."""
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = conv.weight.shape
        q.weight, q.bias = conv.weight, conv.bias
        q.train(conv.training)
        q.set_recipe(recipe)
        return q

    def weight_matrix(self) -> torch.Tensor:
        return self.weight.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cached = self._cached_weight(lambda w: self.quantized_weight(w.t()))
        return QF.qlinear(x, self.weight.t(), self.bias, self.recipe, self._state, cached)

    def to_float(self) -> Conv1D:
        conv = Conv1D.__new__(Conv1D)
        nn.Module.__init__(conv)
        conv.nf = self.out_features
        conv.nx = self.in_features
        conv.weight, conv.bias = self.weight, self.bias
        conv.train(self.training)
        return conv


register_conversion(Conv1D, QHFConv1D.from_float)
