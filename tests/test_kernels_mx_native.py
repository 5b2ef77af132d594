"""The native one-pass MX kernel (fewbit/kernels/mx_native.cpp) against the eager torch reference, bit for bit.

The reference is the same public call with ``FEWBIT_COMPILE=0`` (every kernel eager; the native kernel off). Every
MX format, scale mode and rounding mode, on values that exercise NaN (both signs), +-inf, -0, float32 subnormals,
values near float32's max, all-zero blocks and blocks of the smallest scale, with blocks along the last axis, a
leading axis and a middle axis, lengths not divisible by the block size, non-contiguous and 16-/64-bit inputs.
"""

from __future__ import annotations

import pytest
import torch

import fewbit
from fewbit.choices import Rounding, ScaleMode
from fewbit.kernels import native

MX_SPECS = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8"]
SCALE_MODES = [m.value for m in ScaleMode]
ROUNDINGS = [r.value for r in Rounding]
# (shape, blocked axis): last axis with a partial block, a leading axis (columns), a middle axis, rows long enough
# for the kernel's eight-blocks-at-a-time path (18 full blocks and a partial one per row), and columns wide enough
# for its 64-columns-at-a-time path (and 36 more).
LAYOUTS = [((6, 70), -1), ((45, 9), 0), ((2, 37, 5), 1), ((3, 600), -1), ((70, 100), 0)]


@pytest.fixture(autouse=True)
def _needs_the_kernel():
    if native.compiler() is None:
        pytest.skip("no C++ compiler: the native kernel cannot be built here (the fallback is tested below)")
    assert native.available(), "a C++ compiler is present but the native MX kernel did not build"


def finite_values(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """N(0, 1) values over 60 binades: blocks of finite values whose small elements fall below the element format's
    subnormals (the kernel's fast path for finite blocks)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-30, 30, shape, generator=gen).float())


def hard_values(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """:func:`finite_values` with the special values at fixed strides (so most blocks hold some)."""
    x = finite_values(shape, seed)
    flat = x.view(-1)
    flat[::97] = float("nan")
    flat[5::101] = -float("nan")
    flat[7::89] = float("inf")
    flat[9::83] = -float("inf")
    flat[11::79] = -0.0
    flat[13::73] = 1e-40  # float32 subnormal
    flat[15::71] = -3e-39
    flat[17::67] = 3e38  # scales near 2^127 (and the NaN code where the exponent overflows)
    flat[200:264] = 0.0  # all-zero blocks
    flat[300:332] = 2.0**-130  # the smallest scale
    return x


def both_ways(x: torch.Tensor, name: str, monkeypatch, **kw):
    """(fake_quantize, quantize) by the native kernel, then by the eager reference, with the same random stream."""
    def run():
        fq = fewbit.fake_quantize(x, name, generator=torch.Generator().manual_seed(3), **kw)
        q = fewbit.quantize(x, name, generator=torch.Generator().manual_seed(3), **kw)
        return fq, q

    native_result = run()
    with monkeypatch.context() as m:
        m.setenv("FEWBIT_COMPILE", "0")
        reference = run()
    return native_result, reference


def assert_same(native_result, reference) -> None:
    (fq, q), (fq_ref, q_ref) = native_result, reference
    assert fq.dtype == fq_ref.dtype and fq.shape == fq_ref.shape
    bits = torch.int16 if fq.element_size() == 2 else torch.int32 if fq.element_size() == 4 else torch.int64
    assert torch.equal(fq.view(bits), fq_ref.view(bits))
    assert torch.equal(q.qdata, q_ref.qdata)
    assert torch.equal(q.scale, q_ref.scale)
    assert q.scale.shape == q_ref.scale.shape and q.spec == q_ref.spec and q.dtype == q_ref.dtype


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("mode", SCALE_MODES)
@pytest.mark.parametrize("name", MX_SPECS)
def test_native_equals_reference(name, mode, rounding, monkeypatch):
    for shape, axis in LAYOUTS:
        for x in (hard_values(shape), finite_values(shape, seed=4), finite_values(shape, seed=5) * 2.0**-100):
            assert_same(*both_ways(x, name, monkeypatch, scale_mode=mode, rounding=rounding, axis=axis))


@pytest.mark.parametrize("name", MX_SPECS)
def test_native_equals_reference_on_other_inputs(name, monkeypatch):
    x = hard_values((40, 64), seed=1)
    cases = [
        x.t(),  # non-contiguous
        x[:, ::2],  # strided
        x.to(torch.bfloat16),
        x.to(torch.float16),
        x.double() * (1 + 2.0**-40),  # float64: rounded to float32 first, as the reference does
        x[:1, :5],  # fewer elements than one block
    ]
    for case in cases:
        assert_same(*both_ways(case, name, monkeypatch))
    # Long rows of finite blocks with a few non-finite ones between them: the kernel switches between eight blocks
    # at a time and one at a time.
    sparse = finite_values((4, 1100), seed=6)
    sparse.view(-1)[torch.tensor([300, 1500, 2999])] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for mode in SCALE_MODES:
        assert_same(*both_ways(sparse, name, monkeypatch, scale_mode=mode))
    for block in (16, 4, 96):  # other block sizes, one longer than the axis
        assert_same(*both_ways(x, name, monkeypatch, block_size=block))
        assert_same(*both_ways(x, name, monkeypatch, block_size=block, axis=0))
    assert_same(*both_ways(x, name, monkeypatch, symmetric=False))


def test_native_is_used_and_large_tensors_run_threaded(monkeypatch):
    calls = []
    original = native.mx_pass
    monkeypatch.setattr(native, "mx_pass", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    x = hard_values((64, 1024), seed=2)  # above native.SMALL: all threads
    finite = finite_values((64, 1024), seed=7)  # the fast paths (eight blocks, 64 columns at a time)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two threads even where the tests run with OMP_NUM_THREADS=1
    try:
        assert_same(*both_ways(x, "mxfp8_e4m3", monkeypatch, axis=0))
        assert calls == [x.shape, x.shape]  # native for both calls; the reference did not go through it
        for axis in (0, 1):
            assert_same(*both_ways(finite, "mxfp6_e2m3", monkeypatch, axis=axis))
    finally:
        torch.set_num_threads(threads)


def test_compiled_mx_path_still_equals_eager(monkeypatch):
    """With the native kernel off, MX runs on the torch.compile path (as on GPUs); it stays exact."""
    monkeypatch.setenv("FEWBIT_NATIVE", "0")
    monkeypatch.setattr(native, "mx_pass", lambda *a, **k: pytest.fail("FEWBIT_NATIVE=0 must not run the kernel"))
    for name in ("mxfp8_e4m3", "mxfp4_e2m1", "mxint8"):  # one compile each; the formats with the most edge cases
        assert_same(*both_ways(hard_values((6, 70)), name, monkeypatch))


def test_missing_compiler_falls_back_loudly_once(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("FEWBIT_CACHE", str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        x = hard_values((6, 70))
        with pytest.warns(RuntimeWarning, match="native MX kernel is unavailable .*no C.. compiler"):
            out = fewbit.fake_quantize(x, "mxfp6_e2m3")
        assert not native.available()
        with monkeypatch.context() as m:
            m.setenv("FEWBIT_COMPILE", "0")
            ref = fewbit.fake_quantize(x, "mxfp6_e2m3")
        assert torch.equal(out.view(torch.int32), ref.view(torch.int32))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one warning only: later calls stay quiet
            fewbit.quantize(x, "mxfp6_e2m3")
    finally:
        native.library.cache_clear()


def test_build_is_cached_by_source_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("FEWBIT_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.available()
        built = list((tmp_path / "kernels").glob("mx_native-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        assert native.available()  # loaded from the cache, not rebuilt
        assert [p.stat().st_mtime_ns for p in (tmp_path / "kernels").glob("mx_native-*.so")] == [stamp]
        assert not list((tmp_path / "kernels").glob(".*.tmp"))
    finally:
        native.library.cache_clear()


def test_native_same_bytes_on_every_thread_count():
    """The eval weight cache's comparison: 1 MiB pieces over the threads, any difference found in any piece."""
    lib = native.library()
    x = torch.randn(3 << 18)  # 3 MiB: three pieces
    same = x.clone()  # held by a name: a temporary's memory would be freed before the call reads it
    for threads in (1, 2, 3):
        assert lib.fewbit_same_bytes(x.data_ptr(), same.data_ptr(), x.numel() * 4, threads) == 1
        for index in (0, (1 << 18) + 5, x.numel() - 1):
            y = x.clone()
            y.view(torch.int32)[index] ^= 1 << 31  # the sign bit
            assert lib.fewbit_same_bytes(x.data_ptr(), y.data_ptr(), x.numel() * 4, threads) == 0
    big = x.reshape(768, 1024)
    changed = big.clone()
    changed[-1, -1] = -changed[-1, -1]
    fewbit.fake_quantize(big[:1], "mxfp8_e4m3")  # an MX pass has loaded the library: same_bits uses it
    assert native.same_bits(big, big.clone()) and not native.same_bits(big, changed)
