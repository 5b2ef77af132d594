"""Quantization-aware fine-tuning of a calibrated model (the INT8 paper's last step).

Start from a model whose layers are quantized and whose input ranges are calibrated (:func:`fewbit.calibrate` or
:func:`fewbit.ptq`) and fine-tune it with quantization in the loop. The forward pass uses the static, calibrated
input scales and the per-channel weight scales recomputed from the current weights; the backward pass is the
straight-through estimator, with the gradient zeroed where an input was clipped by its calibrated range (clipped
STE, see :mod:`fewbit.nn.functional`). Ranges stay fixed (learned ranges are not implemented).

The paper's schedule is the default: about 10% of the original training steps, starting at about 1% of the
original learning rate, with cosine decay to zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fewbit.train.loop import TrainResult, train

__all__ = ["qat"]


def qat(model: torch.nn.Module, data: Callable[[int, int], object],
        loss_fn: Callable[[torch.nn.Module, object], torch.Tensor], *, original_steps: int | None = None,
        original_lr: float | None = None, steps: int | None = None, lr: float | None = None,
        optimizer_fn: Callable[[list[torch.nn.Parameter], float], torch.optim.Optimizer] | None = None,
        **train_options) -> TrainResult:
    """Fine-tune the calibrated quantized ``model`` in place with :func:`fewbit.train` (fp32 policy: the model's own
    quantized layers do the quantization). ``data(step, micro)`` and ``loss_fn(model, batch)`` as for ``train``.

    ``steps`` defaults to ``ceil(0.1 * original_steps)``, ``lr`` to ``0.01 * original_lr`` (one of each pair must be
    given); the learning rate decays to zero on a cosine. ``optimizer_fn(params, lr)`` builds the optimizer
    (default: SGD with momentum 0.9, the paper's). Other keyword arguments go to ``train`` (``eval_fn``,
    ``grad_clip``, ``progress``, ...). BatchNorm layers keep updating their statistics unless the caller freezes
    them (``module.eval()`` inside ``loss_fn``, or fold them first with :func:`fewbit.fold_batchnorm_`).
    """
    if steps is None:
        if original_steps is None:
            raise ValueError("qat: give steps=, or original_steps= (the default is 10% of them)")
        steps = max(1, math.ceil(0.1 * original_steps))
    if lr is None:
        if original_lr is None:
            raise ValueError("qat: give lr=, or original_lr= (the default is 1% of it)")
        lr = 0.01 * original_lr
    if steps < 1 or not lr > 0:
        raise ValueError(f"qat: steps={steps}, lr={lr}; need steps >= 1 and lr > 0")
    from fewbit.nn import quantized_layers

    if not any(not m.recipe.is_identity for _, m in quantized_layers(model)):
        raise ValueError("qat: the model has no quantized layer; quantize and calibrate it first (fewbit.ptq or "
                         "fewbit.calibrate(model, batches, recipe='int8'))")
    if optimizer_fn is None:
        def optimizer_fn(params, lr):
            return torch.optim.SGD(params, lr=lr, momentum=0.9)

    def schedule(optimizer):
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)

    model.train()
    return train(model, lambda params: optimizer_fn(params, lr), data, loss_fn, steps=steps, precision="fp32",
                 lr_schedule=schedule, **train_options)
