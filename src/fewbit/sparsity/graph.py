"""Where a model's input channels can be permuted without changing what it computes.

A permutation of a consumer layer's input channels is harmless when the same permutation is applied to the
channels that feed it: the producer layer's output channels (weight rows and bias) and every layer in between that
acts on each channel separately. fewbit finds such chains where the data flow is certain: consecutive children of an
``nn.Sequential`` (nested Sequentials flattened; a subclass counts when it keeps ``Sequential.forward``), where each
child's output is the next child's only input. Walking back from the consumer, a chain may pass through

- elementwise activations and dropout (ReLU, ReLU6, GELU, SiLU, Tanh, Sigmoid, LeakyReLU, Hardswish, Dropout,
  Identity): nothing to permute;
- BatchNorm (weight, bias, running mean and variance permuted) and LayerNorm over the channel dimension (its mean
  and variance do not depend on the order; weight and bias permuted);
- a depthwise convolution (``groups == in_channels == out_channels``): each channel filtered alone, so its filters
  (weight dim 0) and bias are permuted, and the walk goes on to what feeds it;

and ends at a Linear or an ungrouped convolution, the producer (its output channels permuted). Anything else ends
the search with the reason: the first child of a Sequential (its input comes from outside, e.g. a residual
stream), a module's own ``forward`` (custom data flow), a grouped convolution, ... Those layers are pruned
without a permutation and :func:`fewbit.sparsity.summary` says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Chain", "find_chain", "permute_chain_"]

ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Hardswish, nn.Dropout,
               nn.Dropout1d, nn.Dropout2d, nn.Identity)
CONVS = (nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class Chain:
    """A permutable chain: ``producer`` (name) -> ``between`` (names, producer side first) -> ``consumer``."""

    producer: str
    between: tuple[str, ...]
    consumer: str


def _is_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _flat(prefix: str, seq: nn.Sequential) -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in seq.named_children():
        full = f"{prefix}.{name}" if prefix else name
        out.extend(_flat(full, child) if _is_sequential(child) else [(full, child)])
    return out


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, CONVS) and m.groups == m.in_channels == m.out_channels and m.groups > 1


def find_chain(model: nn.Module, consumer: str) -> Chain | str:
    """The :class:`Chain` that ends at layer ``consumer`` (a name in ``model.named_modules()``), or the reason
    there is none."""
    target = model.get_submodule(consumer)
    if isinstance(target, CONVS) and target.groups != 1:
        return f"grouped convolution (groups={target.groups}): its input channels are tied to its groups"
    for prefix, module in model.named_modules():
        if not _is_sequential(module):
            continue
        flat = _flat(prefix, module)
        names = [n for n, _ in flat]
        if consumer not in names:
            continue
        i = names.index(consumer)
        between: list[str] = []
        for j in range(i - 1, -1, -1):
            name, m = flat[j]
            if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d) and not _is_depthwise(m):
                if isinstance(m, CONVS) and m.groups != 1:
                    return f"fed by the grouped convolution {name} (groups={m.groups})"
                return Chain(name, tuple(reversed(between)), consumer)
            if isinstance(m, ELEMENTWISE) or _is_depthwise(m) or isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) \
                    or (isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1):
                between.append(name)
                continue
            return f"fed by {name} ({type(m).__name__}), which mixes or reshapes channels"
        return (f"first compute layer of the Sequential {prefix or '(model)'}: its input comes from outside it "
                "(e.g. a residual stream)")
    return "not inside an nn.Sequential: its input comes from a module's own forward (data flow not known)"


@torch.no_grad()
def _permute_param(p: torch.Tensor | None, perm: torch.Tensor, dim: int) -> None:
    if p is not None:
        p.copy_(p.index_select(dim, perm.to(p.device)))


@torch.no_grad()
def permute_chain_(model: nn.Module, chain: Chain, perm: torch.Tensor) -> None:
    """Apply ``perm`` (new channel i = old channel ``perm[i]``) to ``chain`` in place: the consumer's input
    channels, the producer's output channels and everything between, so the model computes the same function."""
    consumer = model.get_submodule(chain.consumer)
    producer = model.get_submodule(chain.producer)
    _permute_param(consumer.weight, perm, 1)
    _permute_param(producer.weight, perm, 0)
    _permute_param(producer.bias, perm, 0)
    for name in chain.between:
        m = model.get_submodule(name)
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                _permute_param(t, perm, 0)
        elif isinstance(m, nn.LayerNorm):
            _permute_param(m.weight, perm, 0)
            _permute_param(m.bias, perm, 0)
        elif _is_depthwise(m):
            _permute_param(m.weight, perm, 0)
            _permute_param(m.bias, perm, 0)
