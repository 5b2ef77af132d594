"""The native CPU kernel for MX quantization (``mx_native.cpp``): built once with the system C++ compiler, cached,
loaded through ctypes.

Why native: MX fake quantization is one read and one write per element, but the compiled torch path needs two passes
(block codes, then the elements) and a transposed copy for blocks along a leading axis. The C++ kernel does the
block maximum, the E8M0 code, the rounding and the dequantization (or the encoding) in one pass over a block held in
registers, on all threads, for blocks along any axis, and equals the torch reference bit for bit (it transcribes the
same integer arithmetic; the tests compare them at ``atol=0``).

Build: ``$CXX`` or ``g++`` (or ``c++``) with ``-O3 -fopenmp -ffp-contract=off`` (no fast-math: every float operation
is the reference's IEEE operation), plus ``-mavx2`` where torch reports an AVX2 (or AVX-512) CPU, so a cached
binary never runs on a CPU without the instructions it was built for. The library is cached under
``$FEWBIT_CACHE/kernels`` (default ``~/.cache/fewbit/kernels``), named by a hash of the source, the compiler's
version and the flags; a changed source or compiler builds a new one. Its OpenMP runtime is torch's own (the
dynamic loader reuses the ``libgomp.so.1`` torch loaded), so the kernel shares torch's threads.

Fallback: without a working compiler the MX paths run on the exact torch.compile (or eager) path, after one
RuntimeWarning saying why. ``FEWBIT_NATIVE=0`` disables the kernel silently; ``FEWBIT_COMPILE=0`` (everything
eager) disables it too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from fewbit.choices import Rounding, ScaleMode
from fewbit.kernels.cast import compile_enabled

SOURCE = Path(__file__).with_name("mx_native.cpp")
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off")
# The kernel's numbering of the modes (mx_native.cpp's constants).
ROUNDINGS = {Rounding.NEAREST_EVEN: 0, Rounding.NEAREST_AWAY: 1, Rounding.TOWARD_ZERO: 2, Rounding.STOCHASTIC: 3}
SCALE_MODES = {ScaleMode.FLOOR: 0, ScaleMode.CEIL: 1, ScaleMode.EVEN: 2, ScaleMode.RCEIL: 3}
N_PARAMS = 20
SMALL = 1 << 15  # below this many elements one thread is faster than waking the others


def cache_root() -> Path:
    """Where built kernels are kept: ``$FEWBIT_CACHE/kernels``, else ``$XDG_CACHE_HOME/fewbit/kernels``, else
    ``~/.cache/fewbit/kernels``."""
    if "FEWBIT_CACHE" in os.environ:
        return Path(os.environ["FEWBIT_CACHE"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fewbit" / "kernels"


def enabled() -> bool:
    """Whether MX passes may use the native kernel (``FEWBIT_NATIVE=0`` or ``FEWBIT_COMPILE=0`` turn it off)."""
    return os.environ.get("FEWBIT_NATIVE", "1") != "0" and compile_enabled()


def compiler() -> str | None:
    """The C++ compiler to build with: ``$CXX`` if set, else ``g++`` or ``c++`` on the PATH; None if none exists."""
    name = os.environ.get("CXX")
    if name:
        return shutil.which(name)
    return shutil.which("g++") or shutil.which("c++")


def build_flags() -> tuple[str, ...]:
    """Compiler flags for this CPU: AVX2 code only where torch detected AVX2 or AVX-512."""
    capability = torch.backends.cpu.get_cpu_capability()
    return FLAGS + (("-mavx2",) if capability in ("AVX2", "AVX512") else ())


def _build(cxx: str, flags: tuple[str, ...]) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + version.encode() + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_root() / f"mx_native-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed over it: concurrent builds never load a half-written library.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        result = subprocess.run([cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{cxx} exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, built on first use; None (after one RuntimeWarning) when it cannot be built or loaded."""
    cxx = compiler()
    try:
        if cxx is None:
            raise RuntimeError(f"no C++ compiler found (CXX={os.environ.get('CXX')!r}, no g++ or c++ on the PATH)")
        lib = ctypes.CDLL(str(_build(cxx, build_flags())))
        if lib.fewbit_mx_n_params() != N_PARAMS:
            raise RuntimeError(f"the library expects {lib.fewbit_mx_n_params()} parameters, fewbit passes {N_PARAMS}")
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(f"fewbit: the native MX kernel is unavailable ({error}); MX quantization runs on the exact "
                      "torch path instead (slower). Install a C++ compiler (Debian: apt-get install g++) or set "
                      "FEWBIT_NATIVE=0 to silence this.", RuntimeWarning, stacklevel=3)
        return None
    lib.fewbit_mx_pass.restype = ctypes.c_int
    lib.fewbit_mx_pass.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                   ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.fewbit_same_bytes.restype = ctypes.c_int
    lib.fewbit_same_bytes.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    return lib


@functools.cache
def _memcmp():
    """The C library's ``memcmp`` through ctypes, or None where the process exposes no C library (ctypes' CDLL(None)
    is the running program and the libraries it loaded: glibc on Linux, libSystem on macOS)."""
    try:
        fn = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` have the same dtype, shape and bits: exact (a NaN equals only the same NaN pattern,
    -0 differs from +0). Two contiguous CPU tensors are compared by C ``memcmp`` over their bytes, at memory speed:
    on all threads by the native library when an MX pass has loaded it (large tensors), else by one call to the C
    library's. ``torch.equal`` on the integer views, the fallback elsewhere, was measured 8x slower than one
    ``memcmp`` on a 4 MiB float32 weight."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.device.type == "cpu" and a.is_contiguous() and b.is_contiguous():
        nbytes = a.numel() * a.element_size()
        if nbytes == 0 or a.data_ptr() == b.data_ptr():
            return True
        # The native library only where it is already loaded (an MX pass ran): never built, nor warned about, for
        # a comparison. Either way the answer is the same.
        lib = library() if nbytes >= 4 * SMALL and library.cache_info().currsize and enabled() else None
        if lib is not None:
            return lib.fewbit_same_bytes(a.data_ptr(), b.data_ptr(), nbytes, torch.get_num_threads()) == 1
        memcmp = _memcmp()
        if memcmp is not None:
            return memcmp(a.data_ptr(), b.data_ptr(), nbytes) == 0
    if a.is_floating_point() or a.is_complex():
        a, b = a.view(_INTS[a.element_size()]), b.view(_INTS[b.element_size()])
    return torch.equal(a, b)


def available() -> bool:
    """Whether the native kernel is enabled and loads (building it on first call)."""
    return enabled() and library() is not None


@functools.cache
def mx_params(scale_mode: ScaleMode, emax: int, elem_max: float, elem_mbits: int, fixed_point: int,
              elem_params: tuple[int, ...], enc_params: tuple[int, ...]) -> torch.Tensor:
    """The kernel's parameter vector (int32): the scale rule, then ``ElementParams.as_tensor(FLOAT32)`` and
    ``EncodingParams.as_tensor()`` in their field order. Shared, cached: do not modify it in place."""
    elem_max_bits = int(torch.tensor(elem_max, dtype=torch.float32).view(torch.int32).item())
    params = [SCALE_MODES[scale_mode], emax, elem_mbits, fixed_point, elem_max_bits, *elem_params, *enc_params]
    if len(params) != N_PARAMS:
        raise ValueError(f"native MX parameters: expected {N_PARAMS} values, got {len(params)}")
    return torch.tensor(params, dtype=torch.int32)


def mx_pass(x: torch.Tensor, axis: int, block: int, params: torch.Tensor, rounding: Rounding, fake: bool,
            random_bits: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One MX pass over float32 ``x`` (CPU, contiguous, at least one element) with blocks of ``block`` along
    ``axis`` (the last block zero-padded). ``fake``: the dequantized float32 values in ``x``'s shape; else the uint8
    element codes in ``x``'s shape and the uint8 E8M0 codes, shaped like ``x`` with ``axis`` of length
    ``ceil(n / block)``. ``random_bits`` (stochastic rounding): int32 in ``x``'s shape, uniform in ``[0, 2^23)``.
    Call only when :func:`available`."""
    lib = library()
    shape = x.shape
    outer = 1
    for n in shape[:axis]:
        outer *= n
    inner = 1
    for n in shape[axis + 1:]:
        inner *= n
    length = shape[axis]
    nblocks = -(-length // block)
    if fake:
        out = torch.empty(shape, dtype=torch.float32)
        codes = scales = None
    else:
        out = None
        codes = torch.empty(shape, dtype=torch.uint8)
        scales = torch.empty((*shape[:axis], nblocks, *shape[axis + 1:]), dtype=torch.uint8)
    threads = 1 if x.numel() < SMALL else torch.get_num_threads()

    def ptr(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    status = lib.fewbit_mx_pass(ptr(x), outer, length, inner, block, ptr(params), ROUNDINGS[rounding], int(fake),
                                ptr(random_bits), ptr(out), ptr(codes), ptr(scales), threads)
    if status != 0:
        raise RuntimeError(f"fewbit's native MX kernel returned status {status} for shape {tuple(shape)}, "
                           f"axis {axis}, block {block}, rounding {rounding.value}")
    return out if fake else (codes, scales)
