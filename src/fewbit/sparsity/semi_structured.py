"""2:4 sparse GEMMs on NVIDIA Sparse Tensor Cores through ``torch.sparse.to_sparse_semi_structured``.

Ampere and later GPUs (compute capability 8.0+) multiply a 2:4 sparse first operand at up to twice the dense rate
(cuSPARSELt or CUTLASS kernels behind torch's ``SparseSemiStructuredTensor``), for float16, bfloat16 and int8.
:func:`accelerate_` swaps the weight of every 2:4-pruned ``nn.Linear`` of a model for its compressed semi-structured
form, for inference: ``F.linear`` then runs the sparse kernel. The dense masked GEMM is the reference it must match
(``tests/test_sparsity_kernels.py``, run on a GPU).

There is no 2:4 hardware on CPUs and no CPU path in torch: on a CPU, :func:`accelerate_` refuses with that reason,
and the saving is storage only (:mod:`fewbit.sparsity.storage`). Layers the kernels cannot take (another pattern,
a dtype other than float16/bfloat16/int8, shapes below the kernels' minimum tiles) are left as they are and
reported with the reason.
"""

from __future__ import annotations

import torch
from torch import nn

from fewbit.sparsity.model import masks, patterns

__all__ = ["DTYPES", "accelerate_", "semi_structured_available"]

DTYPES = (torch.float16, torch.bfloat16, torch.int8)
# The smallest (rows, columns) the kernels accept per dtype (torch's SparseSemiStructuredTensor tile constraints).
MIN_SHAPE = {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.int8: (32, 128)}


def semi_structured_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(True, "") when 2:4 sparse kernels can run on ``device`` (default: the current CUDA device), else (False,
    why)."""
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False, f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    if not torch.cuda.is_available():
        return False, "no CUDA device: 2:4 sparse tensor cores are a GPU feature (no CPU has them)"
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return False, f"device {device}: 2:4 sparse kernels run on CUDA devices only"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"compute capability {major}.{minor}: 2:4 sparse tensor cores need 8.0 (Ampere) or later"
    return True, ""


def _reason(module: nn.Module, pattern: str | None) -> str | None:
    if pattern != "2:4":
        return f"pattern {pattern}: the kernels are 2:4 only"
    w = module.weight
    if w.dtype not in DTYPES:
        return f"dtype {w.dtype}: the kernels take float16, bfloat16 or int8 (convert the model first)"
    rows, cols = MIN_SHAPE[w.dtype]
    if w.shape[0] < rows or w.shape[1] < cols or w.shape[0] % rows or w.shape[1] % cols:
        return f"shape {tuple(w.shape)}: the {w.dtype} kernels need multiples of {rows} x {cols}"
    if w.device.type != "cuda":
        return f"on {w.device}: move the model to the GPU first"
    return None


def accelerate_(model: nn.Module) -> dict[str, str]:
    """Give every 2:4-pruned ``nn.Linear`` of ``model`` (its masks from :func:`fewbit.sparsify_`) a
    semi-structured sparse weight, in place, for inference (the weight no longer trains). Returns ``{layer: "2:4
    sparse kernel"}`` or ``{layer: why it was left dense}`` for every pruned layer. Raises when this machine has
    no 2:4 kernels at all (on a CPU, for instance)."""
    ok, why = semi_structured_available()
    if not ok:
        raise RuntimeError(f"accelerate_: {why}. On this machine 2:4 sparsity saves storage only "
                           "(fewbit.sparsity.compress)")
    from torch.sparse import to_sparse_semi_structured

    done: dict[str, str] = {}
    layer_patterns = patterns(model)
    for name in masks(model):
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            done[name] = f"{type(module).__name__}: the kernels cover Linear layers only"
            continue
        reason = _reason(module, layer_patterns.get(name))
        if reason is not None:
            done[name] = reason
            continue
        module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
        done[name] = "2:4 sparse kernel"
    return done
