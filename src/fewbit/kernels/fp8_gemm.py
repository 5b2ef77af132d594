"""The real FP8 GEMM (``torch._scaled_mm`` on FP8 tensor cores) beside the emulation it must match.

``Y = (A * scale_a) (B * scale_b)^T + bias`` for FP8 codes A (M, K) and B (N, K), one float32 scale per operand
(per-tensor scaling), accumulated in float32. :func:`fp8_gemm` runs it on the hardware; :func:`fp8_gemm_reference`
is the emulation: the same codes decoded exactly to float32, scaled, and multiplied by an ordinary float32 GEMM.
The two agree up to the order of accumulation (the products of FP8 values are exact in float32; only the sums
are rounded, in an order the hardware chooses).

Eligibility (:func:`fp8_gemm_eligible`): a CUDA device of compute capability 8.9 or newer (Ada, Hopper, ...),
a torch with ``torch._scaled_mm``, both operands in fp8_e4m3 or fp8_e5m2, and K and N multiples of 16 (the
tensor-core tile). ``FEWBIT_SCALED_MM=0`` turns the real GEMM off, so every GEMM is emulated.
"""

from __future__ import annotations

import os

import torch

# fewbit element format name -> torch's FP8 dtype with the same codes (OCP layout: fp8_e4m3 is the "fn" variant,
# no inf, NaN only S.1111.111).
FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
ALIGNMENT = 16  # K and N must be multiples of this for torch._scaled_mm


def fp8_gemm_enabled() -> bool:
    """Whether real FP8 GEMMs may be used (set ``FEWBIT_SCALED_MM=0`` to emulate every GEMM)."""
    return os.environ.get("FEWBIT_SCALED_MM", "1") != "0"


def fp8_gemm_available(device: torch.device | str) -> bool:
    """Whether :func:`fp8_gemm` can run on ``device``: CUDA sm89+, ``torch._scaled_mm`` present, not disabled."""
    device = torch.device(device)
    if device.type != "cuda" or not fp8_gemm_enabled() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_gemm_eligible(device: torch.device | str, a_format: str, b_format: str, k: int, n: int) -> bool:
    """Whether ``A (M, K) @ B (N, K)^T`` with elements in ``a_format`` / ``b_format`` (fewbit format names) can run
    as a real FP8 GEMM on ``device``: both formats FP8, K and N multiples of 16, and :func:`fp8_gemm_available`."""
    if a_format not in FP8_DTYPES or b_format not in FP8_DTYPES or k % ALIGNMENT or n % ALIGNMENT:
        return False
    return fp8_gemm_available(device)


def fp8_gemm(a_codes: torch.Tensor, a_scale: torch.Tensor, a_format: str, b_codes: torch.Tensor,
             b_scale: torch.Tensor, b_format: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(A * a_scale) @ (B * b_scale)^T + bias`` in float32 on FP8 tensor cores.

    ``a_codes`` (M, K) and ``b_codes`` (N, K): uint8 codes (OCP layout) of ``a_format`` / ``b_format``; the scales
    hold one float32 value each. Check :func:`fp8_gemm_eligible` first. :func:`fp8_gemm_reference` is the emulation.
    """
    a = a_codes.view(FP8_DTYPES[a_format])
    b = b_codes.view(FP8_DTYPES[b_format]).t()  # column-major (K, N), as _scaled_mm wants
    return torch._scaled_mm(a, b, scale_a=a_scale.float().reshape(()), scale_b=b_scale.float().reshape(()),
                            bias=bias, out_dtype=torch.float32)


def fp8_gemm_reference(a_codes: torch.Tensor, a_scale: torch.Tensor, a_format: str, b_codes: torch.Tensor,
                       b_scale: torch.Tensor, b_format: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The emulation of :func:`fp8_gemm` on any device: the codes decoded exactly, scaled, a float32 GEMM.

    Equal, bit for bit, to a float32 GEMM of the dequantized operands (``QTensor.dequantize()``).
    """
    a = a_codes.view(FP8_DTYPES[a_format]).float() * a_scale.float().reshape(())
    b = b_codes.view(FP8_DTYPES[b_format]).float() * b_scale.float().reshape(())
    return torch.nn.functional.linear(a, b, bias)
