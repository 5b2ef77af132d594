"""Masks fixed during training: :class:`KeepMasks`, a callback of :func:`fewbit.train.train`.

Retraining a pruned model the 2:4 paper's way keeps every pruned weight at exactly zero. Two hooks do it:

- ``on_gradients`` (after the gradients are unscaled, before clipping and the optimizer step) zeroes the gradient
  of every pruned weight, on the tensors the optimizer updates: the master weights when the run has them
  (``fp16_pure``), the model's parameters otherwise. Clipping then sees only the kept weights' gradients, and
  AdamW's moments of a pruned weight stay at zero;
- ``on_step_end`` multiplies the weights by their masks again, the model's and the master copy's, so that nothing
  the optimizer does (weight decay, momentum from an optimizer state built before pruning) revives a pruned weight.

It holds under every recipe: the quantized layers the loop makes (``quantize_``) keep the model's parameters and
layer names, and every number format maps zero to zero. Under DDP each rank masks its own replica after the
all-reduce, identically. With ``directory`` (the run's checkpoint folder) the masks are saved there at the start
of a run and, when a run resumes, put back on a model that has none, or checked against the model's own.

This module is below the training loop (DESIGN.md's layering), so the class follows the loop's callback protocol
(all five hooks) without importing it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fewbit.sparsity.model import apply_masks_, load_masks, masks, read_masks, save_masks

__all__ = ["MASKS_FILE", "KeepMasks"]

MASKS_FILE = "masks.safetensors"


class KeepMasks:
    """Keep a sparsified model's pruned weights at zero while it trains (see the module docstring). Pass it in
    ``train(..., callbacks=[KeepMasks()])``; the model must hold masks (:func:`fewbit.sparsify_`,
    :func:`fewbit.sparsity.load_masks`) or find them in ``directory``."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._weights: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor the optimizer updates, mask)
        self._model_weights: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_start(self, state) -> None:
        model = state.model
        saved = self.directory / MASKS_FILE if self.directory is not None else None
        if saved is not None and saved.is_file():
            if not masks(model):
                load_masks(model, saved)
            else:
                mine = masks(model)
                other, _ = read_masks(saved)
                different = [n for n in sorted(set(mine) | set(other))
                             if n not in mine or n not in other or not torch.equal(mine[n].cpu(), other[n].cpu())]
                if different:
                    raise ValueError(f"KeepMasks: the masks saved in {saved} differ from the model's at layer "
                                     f"{different[0]!r}; resume with the masks the run started with")
        if not masks(model):
            raise ValueError(f"KeepMasks: {type(model).__name__} has no masks; call fewbit.sparsify_(model) before "
                             "training (or give the checkpoint folder that holds them)")
        if saved is not None and state.rank == 0 and not saved.is_file():
            save_masks(model, saved)
        apply_masks_(model)
        index = {id(p): i for i, p in enumerate(state.master.model_params)} if state.master is not None else {}
        self._weights, self._model_weights = [], []
        for name, mask in masks(model).items():
            w = model.get_submodule(name).weight
            self._model_weights.append((w, mask.to(device=w.device, dtype=w.dtype)))
            target = state.master.params[index[id(w)]] if state.master is not None else w
            self._weights.append((target, mask.to(device=target.device, dtype=target.dtype)))
        if state.master is not None:
            with torch.no_grad():
                for target, mask in self._weights:
                    target.mul_(mask)

    def on_gradients(self, state, found_inf: bool) -> None:
        for target, mask in self._weights:
            if target.grad is not None:
                target.grad.mul_(mask)

    @torch.no_grad()
    def on_step_end(self, state, record: dict) -> None:
        for target, mask in self._weights:
            target.mul_(mask)
        for w, mask in self._model_weights:
            w.mul_(mask)

    def on_eval(self, state, metrics: dict[str, float]) -> None:
        pass

    def on_train_end(self, state, error: BaseException | None) -> None:
        pass
