"""Loss scalers: multiply the loss by S before backward so small gradients survive a narrow gradient format, then
unscale before clipping and the optimizer step.

- :class:`StaticScaler`: a fixed S.
- :class:`DynamicScaler` ("backoff", the mixed precision paper's method): start at 2^16; on a non-finite gradient
  skip the step and halve S; after ``growth_interval`` clean steps double S; S stays within bounds, and hitting the
  minimum ``max_min_hits`` times in a row raises :class:`LossScaleCollapse` (a run that keeps overflowing at the
  floor is broken, not unlucky).
- :class:`LogMaxScaler` (OpenSeq2Seq): moving averages (0.99 of the mean, 0.999 of the second moment) of
  ``log2(max|g|)``; ``S = 2^(log_max_target - (mu + 3.09 sigma))`` clipped to ``[1, 2^14]``; a non-finite
  gradient skips the step.

The scalers do not care which format the gradients are in (fp16, e5m2, MX): they see the float32 gradients and a
``found_inf`` flag. Each keeps its state in ``state_dict()`` for checkpoints.
"""

from __future__ import annotations

import math

import torch


class LossScaleCollapse(RuntimeError):
    """The dynamic loss scale sat at its minimum for too many overflowing steps in a row."""


def _check_scale(what: str, value) -> float:
    """``value`` as a float when it is a finite number > 0, else ValueError naming it (an infinite scale turns
    every gradient into inf or NaN, so every step would be skipped)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} {value!r}; a loss scale must be a finite positive number (e.g. 1024, or 'dynamic')")
    return float(value)


class StaticScaler:
    def __init__(self, scale: float = 1.0) -> None:
        self.scale = _check_scale("loss scale", scale)
        self.skipped = 0

    def update(self, found_inf: bool, grad_max: float | None = None) -> bool:
        """Record a step; return True when the optimizer step must be skipped."""
        if found_inf:
            self.skipped += 1
        return found_inf

    def state_dict(self) -> dict:
        return {"scale": self.scale, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.skipped = float(state["scale"]), int(state["skipped"])


class DynamicScaler(StaticScaler):
    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 2000, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, min_scale: float = 1.0, max_scale: float = 2.0**24,
                 max_min_hits: int = 10) -> None:
        super().__init__(init_scale)
        _check_scale("min_scale", min_scale)
        _check_scale("max_scale", max_scale)
        if not (0 < backoff_factor < 1 < growth_factor):
            raise ValueError(f"need 0 < backoff_factor < 1 < growth_factor, got {backoff_factor}, {growth_factor}")
        if not 0 < min_scale <= init_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= init_scale <= max_scale, got {min_scale}, {init_scale}, "
                             f"{max_scale}")
        self.growth_interval, self.growth_factor, self.backoff_factor = growth_interval, growth_factor, backoff_factor
        self.min_scale, self.max_scale, self.max_min_hits = min_scale, max_scale, max_min_hits
        self.clean_steps = 0
        self.min_hits = 0

    def update(self, found_inf: bool, grad_max: float | None = None) -> bool:
        if found_inf:
            self.skipped += 1
            self.clean_steps = 0
            if self.scale <= self.min_scale:
                self.min_hits += 1
                if self.min_hits >= self.max_min_hits:
                    raise LossScaleCollapse(
                        f"gradients overflowed {self.min_hits} steps in a row at the minimum loss scale "
                        f"{self.min_scale}; the model produces inf/NaN gradients regardless of scaling (check the "
                        "learning rate, the data, or train in bf16/fp32)")
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            return True
        self.min_hits = 0
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale = min(self.scale * self.growth_factor, self.max_scale)
            self.clean_steps = 0
        return False

    def state_dict(self) -> dict:
        return {**super().state_dict(), "clean_steps": self.clean_steps, "min_hits": self.min_hits}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.clean_steps, self.min_hits = int(state["clean_steps"]), int(state["min_hits"])


class LogMaxScaler(StaticScaler):
    def __init__(self, log_max_target: float = 16.0, beta1: float = 0.99, beta2: float = 0.999,
                 sigma_factor: float = 3.09, min_scale: float = 1.0, max_scale: float = 2.0**14) -> None:
        super().__init__(1.0)
        self.log_max_target, self.beta1, self.beta2, self.sigma_factor = log_max_target, beta1, beta2, sigma_factor
        self.min_scale, self.max_scale = min_scale, max_scale
        self.mean = 0.0
        self.second = 0.0
        self.steps = 0

    def update(self, found_inf: bool, grad_max: float | None = None) -> bool:
        if found_inf or grad_max is None or not math.isfinite(grad_max):
            self.skipped += 1
            return True
        # grad_max is of the *scaled* gradients; track the unscaled log2 max.
        x = math.log2(max(grad_max / self.scale, 2.0**-149))
        self.mean = self.beta1 * self.mean + (1 - self.beta1) * x
        self.second = self.beta2 * self.second + (1 - self.beta2) * x * x
        self.steps += 1
        # Bias-corrected moments (the averages start at 0).
        mu = self.mean / (1 - self.beta1**self.steps)
        var = max(self.second / (1 - self.beta2**self.steps) - mu * mu, 0.0)
        log_scale = self.log_max_target - (mu + self.sigma_factor * math.sqrt(var))
        self.scale = float(min(max(2.0**log_scale, self.min_scale), self.max_scale))
        return False

    def state_dict(self) -> dict:
        return {**super().state_dict(), "mean": self.mean, "second": self.second, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.mean, self.second, self.steps = float(state["mean"]), float(state["second"]), int(state["steps"])


def make_scaler(kind: str | float | None) -> StaticScaler | None:
    """``None``/"none" -> no scaling; a number -> static; "dynamic"/"backoff" -> DynamicScaler; "logmax"."""
    if kind is None or kind == "none":
        return None
    if isinstance(kind, int | float) and not isinstance(kind, bool):
        return StaticScaler(kind)
    kinds = {"dynamic": DynamicScaler, "backoff": DynamicScaler, "logmax": LogMaxScaler}
    if not isinstance(kind, str) or kind not in kinds:
        raise ValueError(f"unknown loss scaling {kind!r}; valid: none, a number, {', '.join(kinds)}")
    return kinds[kind]()


def unscale_and_check(parameters, scale: float) -> tuple[bool, float]:
    """Divide every gradient by ``scale`` in place; return (found a non-finite gradient, max |g| before
    unscaling)."""
    # Sharded (FSDP) gradients are checked on this rank's shard; the caller combines the ranks' verdicts.
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in parameters if p.grad is not None]
    if not grads:
        return False, 0.0
    norms = [g.detach().abs().max().float() for g in grads if g.numel()]  # a shard may be empty
    if not norms:
        return False, 0.0
    norms = torch.stack(norms)
    found_inf = not bool(torch.isfinite(norms).all())
    grad_max = float(norms.max()) if not found_inf else math.inf
    if scale != 1.0:
        inv = 1.0 / scale
        for g in grads:
            g.mul_(inv)
    return found_inf, grad_max
