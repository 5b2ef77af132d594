"""BatchNorm folding for inference: ``conv -> BatchNorm`` becomes one convolution.

In eval mode BatchNorm is the per-channel affine map ``y = (x - mean) / sqrt(var + eps) * gamma + beta``. After a
convolution ``x = W * u + b`` it folds into the convolution's weight and bias, with ``k = gamma / sqrt(var + eps)``
per output channel::

    W' = W * k        (output channel o scaled by k_o)
    b' = (b - mean) * k + beta      (b = 0 for a convolution without bias)

Folding before quantization matters for INT8: a runtime executes the folded convolution, so its per-channel weight
scales must be computed from ``W'``, not ``W``. The fold is exact in real arithmetic; in float32 the folded model
agrees with the unfolded eval-mode model to rounding (relative ~1e-6).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

__all__ = ["fold_batchnorm_"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def _fold(conv: nn.Module, bn: nn.Module) -> None:
    if conv.out_channels != bn.num_features:
        raise ValueError(f"cannot fold {type(bn).__name__}({bn.num_features}) into a convolution with "
                         f"{conv.out_channels} output channels")
    k = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new_weight = conv.weight * k.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    new_bias = (bias - bn.running_mean) * k + shift
    conv.weight.copy_(new_weight)  # in place: an optimizer or a quantized layer holding the parameter follows
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)


def fold_batchnorm_(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a convolution inside an ``nn.Sequential`` (Conv1d/2d/3d and
    fewbit's QConv, which subclass them) into that convolution, in place; the BatchNorm becomes ``nn.Identity``.
    Returns the folded ``(conv, batchnorm)`` name pairs.

    Uses the running statistics (eval-mode semantics): afterwards the model is for inference (or for QAT with
    frozen statistics). A BatchNorm without running statistics (``track_running_stats=False``) or after anything
    else is left alone; a model in train mode is an error (folding would change what it computes)."""
    if model.training:
        raise ValueError("fold_batchnorm_ folds the running statistics (eval semantics); call model.eval() first")
    folded = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in itertools.pairwise(children):
            if isinstance(conv, _CONVS) and type(bn) in _NORMS and bn.track_running_stats \
                    and bn.running_mean is not None:
                _fold(conv, bn)
                setattr(parent, bn_name, nn.Identity())
                prefix = f"{parent_name}." if parent_name else ""
                folded.append((prefix + conv_name, prefix + bn_name))
    return folded
