"""The runtimes a benchmark runs a model on: one :class:`Backend` record each.

| backend | what runs | recipe |
|---|---|---|
| ``torch`` | the model converted by the recipe (``runs.as_recipe``), PyTorch eager, under the recipe's autocast | any |
| ``compile`` | the same module through ``torch.compile(dynamic=True)`` (compiled during the warm-up) | any |
| ``ort`` | onnxruntime (CPU) on an FP32 ONNX export of the float model, or on the file given as ``onnx`` | fp32 |
| ``ort_int8`` | onnxruntime on the INT8 QDQ file ``fewbit ptq --onnx PATH`` writes (``onnx`` required) | the file's |
| ``fp8`` | PyTorch on CUDA, a per-tensor FP8 recipe: its linear layers run the real FP8 GEMM | fp8, fp8_current |
| ``noop`` | nothing: every query is answered at once with an empty response (measures the harness) | none |

A backend that cannot run here (``fp8`` without a CUDA GPU of compute capability 8.9 or newer) raises
:class:`BackendUnavailable`, a ValueError whose message says what is missing.

``context()`` is what every thread that runs the model must enter: autocast and autograd are thread-local in
PyTorch, so the harness's worker threads enter it themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fewbit import recipes as _recipes
from fewbit.nn import frozen_weights
from fewbit.recipes import Recipe
from fewbit.workloads.base import Model, Workload

BACKENDS = ("torch", "compile", "ort", "ort_int8", "fp8", "noop")
FP8_RECIPES = ("fp8", "fp8_current")


class BackendUnavailable(ValueError):
    """The backend cannot run on this machine; the message names what is missing."""


@dataclass
class Backend:
    """A model ready to serve: ``model`` (None for ``noop``), ``context`` (entered by each thread that runs it),
    the ``recipe`` name it runs, the ONNX file it reads (for the onnxruntime backends) and a one-line
    ``description``."""

    name: str
    model: Model | None
    recipe: str
    description: str
    context: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)
    onnx: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def is_noop(self) -> bool:
        return self.model is None

    @contextlib.contextmanager
    def running(self):
        """``context()`` plus no autograd and frozen quantized weights (:func:`fewbit.nn.frozen_weights`): what
        evaluation and the harness's workers run the model under."""
        with torch.no_grad(), self.context(), frozen_weights(self.model):
            yield


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}; valid: {', '.join(BACKENDS)}")
    return name


def build(name: str, workload: Workload, model: torch.nn.Module, recipe: str | Recipe = "fp32", *,
          onnx: str | Path | None = None, folder: str | Path | None = None, threads: int = 0,
          device: str = "cpu") -> Backend:
    """The backend ``name`` for ``model`` (the float model of ``workload``) under ``recipe``. ``onnx``: an ONNX
    file to run (``ort``, ``ort_int8``); ``folder``: where ``ort`` writes its FP32 export; ``threads``: intra-op
    threads of onnxruntime (0: its default); ``device``: where the PyTorch backends run. Mismatches (a quantized
    recipe on ``ort``, no file for ``ort_int8``) are ValueErrors naming the fix."""
    from fewbit.train import Precision
    from fewbit.workloads import runs

    check_backend(name)
    recipe = _recipes.get(recipe)
    if name == "noop":
        return Backend("noop", None, "none", "answers every query at once, empty")
    if name in ("ort", "ort_int8"):
        return _onnx_backend(name, workload, model, recipe, onnx, folder, threads)
    if onnx is not None:
        raise ValueError(f"onnx={str(onnx)!r} is read by the ort and ort_int8 backends, not by {name!r}")
    if name == "fp8":
        from fewbit.kernels.fp8_gemm import fp8_gemm_available

        if not torch.cuda.is_available() or not fp8_gemm_available("cuda"):
            why = "torch sees no CUDA device" if not torch.cuda.is_available() else \
                f"GPU compute capability {torch.cuda.get_device_capability()} < (8, 9), or FEWBIT_SCALED_MM=0"
            raise BackendUnavailable(f"backend fp8 runs the real FP8 GEMM (torch._scaled_mm), which needs a CUDA GPU "
                                     f"of compute capability 8.9 or newer; here {why}. Use --backend torch with "
                                     f"--recipe {recipe.name if recipe.name in FP8_RECIPES else 'fp8'} to emulate")
        if recipe.name not in FP8_RECIPES:
            raise ValueError(f"backend fp8 needs a per-tensor FP8 recipe ({', '.join(FP8_RECIPES)}), got "
                             f"{recipe.name!r}")
        device = "cuda"
    target = torch.device(device)
    converted = runs.as_recipe(model.to(target), recipe).to(target).eval()
    precision = Precision.of(recipe)

    def context():
        return precision.autocast(target)

    if name == "compile":
        compiled = torch.compile(converted, dynamic=True)
        return Backend("compile", compiled, recipe.name, f"torch.compile (inductor) on {target}, {recipe.name}",
                       context)
    return Backend(name, converted, recipe.name, f"PyTorch eager on {target}, {recipe.name}", context)


def _onnx_backend(name, workload, model, recipe, onnx, folder, threads) -> Backend:
    import onnx as onnx_lib

    from fewbit.export import export_onnx, onnx_runner

    if name == "ort_int8" and onnx is None:
        raise ValueError(f"backend ort_int8 runs an INT8 ONNX file: make one with `fewbit ptq {workload.name} "
                         "--recipe int8 --onnx PATH` and pass it as --onnx PATH")
    if onnx is None:
        if not recipe.is_identity:
            raise ValueError(f"backend ort exports the float model; recipe {recipe.name!r} cannot be exported "
                             "(use --backend ort_int8 with `fewbit ptq --onnx`, or --backend torch)")
        example = workload.example_input()
        if example is None:
            raise ValueError(f"backend ort: the {workload.name} model is not one forward pass with a fixed input "
                             "shape, so it has no ONNX export; use --backend torch")
        if folder is None:
            raise ValueError("backend ort needs a folder for its FP32 export")
        onnx = Path(folder) / f"{workload.name}-fp32.onnx"
        export_onnx(model.float().eval(), example, onnx)
    path = Path(onnx)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {str(path)!r} not found (make one with `fewbit ptq {workload.name} "
                                "--onnx PATH`)")
    ops = {node.op_type for node in onnx_lib.load(str(path), load_external_data=False).graph.node}
    quantized = "QuantizeLinear" in ops
    if name == "ort_int8" and not quantized:
        raise ValueError(f"{path} has no QuantizeLinear node: it is not an INT8 QDQ model; use --backend ort")
    if name == "ort" and quantized:
        raise ValueError(f"{path} is an INT8 QDQ model (it has QuantizeLinear nodes); use --backend ort_int8")
    runner = onnx_runner(path, threads)
    kind = "INT8 QDQ" if quantized else "FP32"
    return Backend(name, runner, "int8" if quantized else "fp32", f"onnxruntime CPU, {kind} ONNX {path.name}",
                   onnx=str(path), info={"providers": runner.session.get_providers()})


__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "build", "check_backend"]
