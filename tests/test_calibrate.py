"""Calibration (histograms, max / percentile / entropy / MSE), static scales, PTQ, QAT and BatchNorm folding."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

import fewbit
from fewbit.calibrate import METHODS, Histogram, kl_divergences, ptq_methods
from fewbit.nn.modules import QLinear


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    # Small tensors: eager kernels are faster than compiling them (the compiled ones are tested against eager).
    monkeypatch.setenv("FEWBIT_COMPILE", "0")


def _samples(kind: str, n: int = 50_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal(n)
    if kind == "laplace":
        return rng.laplace(size=n)
    if kind == "student_t3":  # heavy tails
        return rng.standard_t(3, size=n)
    if kind == "gaussian_outliers":
        x = rng.standard_normal(n)
        x[rng.choice(n, 20, replace=False)] = rng.uniform(20, 40, 20) * rng.choice([-1, 1], 20)
        return x
    raise AssertionError(kind)


DISTRIBUTIONS = ["gaussian", "laplace", "student_t3", "gaussian_outliers"]


# ---- entropy: against a slow reference written from the definition ----------------------------------------------


def reference_kl(hist: np.ndarray, levels: int, start_bin: int = 128) -> np.ndarray:
    """KL(P || Q) per candidate i = start..n, straight from the definition, bin by bin and chunk by chunk:
    P = hist[:i] with the outliers added to its last bin; the i bins split into `levels` chunks of i // levels
    bins (the last one takes the rest); Q spreads each chunk's unclipped count evenly over the chunk's non-empty
    bins of P; KL with both normalised, +inf where P > 0 and Q = 0."""
    hist = hist.astype(np.float64)
    n = len(hist)
    out = []
    for i in range(max(start_bin, levels), n + 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        m = i // levels
        q = np.zeros(i)
        for j in range(levels):
            lo, hi = j * m, (i if j == levels - 1 else (j + 1) * m)
            nonempty = [k for k in range(lo, hi) if p[k] > 0]
            mass = hist[lo:hi].sum()
            for k in nonempty:
                q[k] = mass / len(nonempty)
        p_sum, q_sum = p.sum(), q.sum()
        kl = 0.0
        for k in range(i):
            if p[k] > 0:
                if q[k] == 0:
                    kl = math.inf
                    break
                kl += p[k] / p_sum * math.log((p[k] / p_sum) / (q[k] / q_sum))
        out.append(kl)
    return np.array(out)


@pytest.mark.parametrize("kind", DISTRIBUTIONS)
def test_entropy_matches_reference(kind):
    hist = Histogram()
    hist.update(torch.from_numpy(_samples(kind)).float())
    n = hist.used_bins()
    counts = hist.counts[:n].numpy()
    reference = reference_kl(counts, 128)
    ours = kl_divergences(torch.from_numpy(counts), 128).numpy()
    assert ours.shape == reference.shape
    assert np.array_equal(np.isinf(ours), np.isinf(reference))
    finite = np.isfinite(reference)
    np.testing.assert_allclose(ours[finite], reference[finite], rtol=1e-9, atol=1e-12)
    # The chosen threshold minimises the reference divergence (to rounding: near-ties may pick a neighbour).
    threshold = hist.entropy(128)
    chosen = n if threshold == hist.amax else round(threshold / hist.bin_width)
    assert threshold == min(chosen * hist.bin_width, hist.amax)
    assert reference[chosen - 128] <= reference.min() + 1e-9 * abs(reference.min())
    spec = fewbit.get_spec("int8_tensor")
    assert hist.amax_for("entropy", spec) == hist.entropy(128)


def test_entropy_int4_levels_match_reference():
    hist = Histogram()
    hist.update(torch.from_numpy(_samples("laplace", 20_000)).float())
    counts = hist.counts[: hist.used_bins()].numpy()
    reference = reference_kl(counts, 8)
    ours = kl_divergences(torch.from_numpy(counts), 8).numpy()
    finite = np.isfinite(reference)
    np.testing.assert_allclose(ours[finite], reference[finite], rtol=1e-9, atol=1e-12)
    int4 = fewbit.QuantSpec("int4", fewbit.PerTensor())
    threshold = hist.amax_for("entropy", int4)
    chosen = hist.used_bins() if threshold == hist.amax else round(threshold / hist.bin_width)
    assert reference[chosen - 128] <= reference.min() + 1e-9 * abs(reference.min())


def test_entropy_clips_outliers_and_keeps_dense_tails():
    outliers, dense = Histogram(), Histogram()
    outliers.update(torch.from_numpy(_samples("gaussian_outliers")).float())
    dense.update(torch.from_numpy(_samples("gaussian")).float())
    assert outliers.entropy(128) < 0.25 * outliers.amax  # a few huge values are not worth the resolution
    assert dense.entropy(128) > 0.5 * dense.amax


def test_entropy_leaves_out_the_zeros_of_a_relu():
    # ReLU6 outputs: half exact zeros, a spike at 6. Counted, the zeros' spike in bin 0 would pull the threshold down
    # to about 1.0; left out, the threshold is that of the nonzero values alone, and it keeps the spike.
    x = torch.from_numpy(_samples("gaussian", 200_000)).float() * 3
    relu6, positive = Histogram(), Histogram()
    for chunk in x.chunk(4):  # in several batches, the range growing: the zeros stay in bin 0
        relu6.update(chunk.clamp(0, 6))
        positive.update(chunk.clamp(0, 6)[chunk > 0])
    assert relu6.zeros == int((x <= 0).sum()) and positive.zeros == 0
    assert relu6.entropy(128) == positive.entropy(128) > 4.0
    counts = positive.counts[: positive.used_bins()].numpy()  # and it is the reference's choice on those counts
    reference = reference_kl(counts, 128)
    threshold = positive.entropy(128)
    chosen = len(counts) if threshold == positive.amax else round(threshold / positive.bin_width)
    assert reference[chosen - 128] <= reference.min() + 1e-9 * abs(reference.min())


# ---- the histogram ----------------------------------------------------------------------------------------------


def test_histogram_counts_match_numpy():
    x = _samples("laplace", 10_000).astype(np.float32)
    hist = Histogram()
    hist.update(torch.from_numpy(x))
    a = np.abs(x).astype(np.float64)
    exponent = math.frexp(a.max())[1]
    assert hist.range == 2.0**exponent > a.max() >= 2.0 ** (exponent - 1)
    expected = np.bincount(np.floor(a * 2048 / 2.0**exponent).astype(np.int64), minlength=2048)
    np.testing.assert_array_equal(hist.counts.numpy(), expected)
    assert hist.amax == float(np.abs(x).max())


def test_histogram_extension_equals_one_shot():
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal(4000).astype(np.float32) * scale for scale in (0.01, 0.3, 1.0, 7.0, 2.0, 300.0)]
    batches.insert(0, np.zeros(100, dtype=np.float32))  # all zeros first: no range yet
    incremental, one_shot = Histogram(), Histogram()
    for batch in batches:
        incremental.update(torch.from_numpy(batch))
    one_shot.update(torch.from_numpy(np.concatenate(batches)))
    np.testing.assert_array_equal(incremental.counts.numpy(), one_shot.counts.numpy())
    assert incremental.range == one_shot.range and incremental.amax == one_shot.amax
    assert incremental.total == sum(b.size for b in batches)
    spec = fewbit.get_spec("int8_tensor")
    for method in METHODS:
        assert incremental.amax_for(method, spec) == one_shot.amax_for(method, spec)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_histogram_rejects_non_finite(bad):
    x = torch.randn(100)
    x[3] = bad
    with pytest.raises(ValueError, match=r"NaN|inf"):
        Histogram().update(x, "the input of layer 'fc'")


# ---- max, percentile, MSE against numpy -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DISTRIBUTIONS)
def test_max_and_percentiles_against_numpy(kind):
    x = _samples(kind).astype(np.float32)
    hist = Histogram()
    hist.update(torch.from_numpy(x))
    spec = fewbit.get_spec("int8_tensor")
    assert hist.amax_for("max", spec) == float(np.abs(x).max())
    for p in ("99.9", "99.99", "99.999", "99.9999"):
        ours = hist.amax_for(f"percentile_{p}", spec)
        # The smallest value with at least p% of the values at or below it (exact rational arithmetic).
        rank = math.ceil(Fraction(p) / 100 * x.size)
        exact = np.sort(np.abs(x))[rank - 1]
        assert exact - 1e-6 <= ours <= exact + hist.bin_width + 1e-6, (p, ours, exact)


def _bin_mse(hist: Histogram, threshold: float, spec) -> float:
    """Squared error of the bin centres quantized with a static amax, in numpy (round half to even)."""
    n = hist.used_bins()
    centres = (np.arange(n) + 0.5) * hist.bin_width
    fmt_max = spec.format.max
    scale = np.float32(threshold) / np.float32(fmt_max)
    q = np.clip(np.rint(centres / scale), -fmt_max, fmt_max) * scale
    return float((hist.counts[:n].numpy() * (centres - q) ** 2).sum())


@pytest.mark.parametrize("kind", DISTRIBUTIONS)
def test_mse_is_near_the_exhaustive_optimum(kind):
    hist = Histogram()
    hist.update(torch.from_numpy(_samples(kind)).float())
    spec = fewbit.get_spec("int8_tensor")
    ours = hist.amax_for("mse", spec)
    candidates = [min(k * hist.bin_width, hist.amax) for k in range(1, hist.used_bins() + 1)]
    best = min(_bin_mse(hist, t, spec) for t in candidates)
    assert _bin_mse(hist, ours, spec) <= 1.01 * best


def test_mse_uses_the_format_grid():
    hist = Histogram()
    hist.update(torch.from_numpy(_samples("student_t3")).float())
    fp8 = hist.amax_for("mse", fewbit.get_spec("fp8_e4m3_tensor"))
    int4 = hist.amax_for("mse", fewbit.QuantSpec("int4", fewbit.PerTensor()))
    int8 = hist.amax_for("mse", fewbit.get_spec("int8_tensor"))
    assert 0 < int4 < int8 <= hist.amax  # fewer levels: clip harder
    assert 0 < fp8 <= hist.amax
    with pytest.raises(ValueError, match=r"entropy.*fp8_e4m3.*'max', a percentile or 'mse'"):
        hist.amax_for("entropy", fewbit.get_spec("fp8_e4m3_tensor"))


# ---- static scales ------------------------------------------------------------------------------------------------


def test_static_amax_fixes_the_scale_and_saturates():
    spec = fewbit.get_spec("int8_tensor", amax=2.0)
    x = torch.tensor([0.0, 1.0, -1.0, 1.99, 2.5, -100.0])
    q = fewbit.quantize(x, spec)
    assert q.scale.item() == np.float32(2.0) / np.float32(127)
    expected = torch.clamp(torch.round(x / q.scale), -127, 127) * q.scale
    torch.testing.assert_close(fewbit.fake_quantize(x, spec), expected, rtol=0, atol=0)
    assert str(spec) == "int8_tensor@amax=2"
    assert fewbit.QuantSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="amax=-1"):
        fewbit.get_spec("int8_tensor", amax=-1.0)


def test_clipped_ste_zeroes_the_gradient_outside_the_range():
    layer = QLinear(3, 2, recipe="int8")
    recipe = layer.recipe
    layer.set_recipe(recipe.replace(input=recipe.input.replace(amax=1.0), input_backward=recipe.input.replace(
        amax=1.0)))
    x = torch.tensor([[0.5, -2.0, 0.9], [3.0, 0.1, -0.2]], requires_grad=True)
    layer(x).sum().backward()
    assert (x.grad[x.detach().abs() > 1.0] == 0).all()
    assert (x.grad[x.detach().abs() <= 1.0] != 0).all()


# ---- calibrate ----------------------------------------------------------------------------------------------------


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def test_calibrate_sets_static_input_ranges_from_one_pass():
    model = _mlp()
    batches = [torch.randn(32, 16) for _ in range(4)]
    fewbit.quantize_(model, "int8")
    calls = []
    model[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    model.train()
    calibration = fewbit.calibrate(model, batches, "max")
    assert model.training  # mode restored
    assert len(calls) == 4 and calibration.batches == 4
    assert calibration.amax("max")["0"] == max(float(b.abs().max()) for b in batches)
    for name in ("0", "2", "4"):
        spec = model.get_submodule(name).recipe.input
        assert spec.scaling.amax == calibration.amax("max")[name]
        assert model.get_submodule(name).recipe.input_backward == spec
    for method in METHODS:  # every method from the same histograms, no further forward
        calibration.apply(model, method)
    assert len(calls) == 4
    assert model[2].recipe.input.scaling.amax == calibration.amax("mse")["2"]


@pytest.mark.parametrize("spec", ["int8_tensor", "fp8_e4m3_tensor", "int4_tensor"])
def test_calibrate_int8_int4_fp8(spec):
    input_spec = fewbit.QuantSpec("int4", fewbit.PerTensor()) if spec == "int4_tensor" else spec
    recipe = fewbit.Recipe(name="test", weight="int8_channel", input=input_spec)
    model = _mlp()
    method = "percentile_99.99" if spec.startswith("fp8") else "entropy"
    fewbit.calibrate(model, [torch.randn(32, 16) for _ in range(2)], method, recipe=recipe)
    assert all(model.get_submodule(n).recipe.input.scaling.amax > 0 for n in ("0", "2", "4"))
    assert torch.isfinite(model(torch.randn(4, 16))).all()


def test_calibrate_bad_input():
    with pytest.raises(ValueError, match=r"'median'.*valid: max, percentile_99.9"):
        fewbit.calibrate(_mlp(), [torch.randn(2, 16)], "median", recipe="int8")
    with pytest.raises(ValueError, match="no batches"):
        fewbit.calibrate(_mlp(), [], recipe="int8")
    with pytest.raises(ValueError, match="MX needs no calibration"):
        fewbit.calibrate(_mlp(), [torch.randn(2, 16)], recipe="mxfp8")
    with pytest.raises(ValueError, match="no quantized layer"):
        fewbit.calibrate(_mlp(), [torch.randn(2, 16)])
    with pytest.raises(ValueError, match=r"layer '0'.*NaN"):
        fewbit.calibrate(_mlp(), [torch.full((2, 16), float("nan"))], recipe="int8")



def test_calibrate_runs_a_training_model_in_eval_mode_and_restores_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 4))
    model[1].running_mean.fill_(3.0)  # eval-mode BatchNorm shifts the second layer's input by -3
    x = torch.randn(64, 16)
    with torch.no_grad():
        expected = model.eval()(x)  # the float eval-mode pass: no dropout, running statistics
        second_input = model[2](model[1](model[0](x)))
    model.train()
    fewbit.calibrate(model, [x], "max", recipe="int8")
    assert model.training and model[1].training  # the mode is restored
    assert model[3].recipe.input.scaling.amax == float(second_input.abs().max())
    model.eval()
    with torch.no_grad():
        assert (model(x) - expected).abs().max() < 0.05 * expected.abs().max()

# ---- PTQ ----------------------------------------------------------------------------------------------------------


def _task(seed: int = 0):
    """A 4-class synthetic classification task (Gaussian clusters, one feature on a 20x larger scale) and an MLP
    trained on it for 300 steps."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 16, generator=g) * 2

    def sample(n):
        labels = torch.randint(0, 4, (n,), generator=g)
        x = centres[labels] + torch.randn(n, 16, generator=g) * 1.5
        x[:, 0] *= 20  # one feature on a much larger scale: per-tensor input scales hurt the first layer
        return x, labels

    train_x, train_y = sample(2048)
    test_x, test_y = sample(1024)
    torch.manual_seed(seed)
    model = _mlp(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        i = torch.randint(0, 2048, (128,), generator=g)
        loss = nn.functional.cross_entropy(model(train_x[i]), train_y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, (train_x, train_y), (test_x, test_y)


W4A4 = fewbit.Recipe(name="w4a4", weight=fewbit.QuantSpec("int4", fewbit.PerAxis(0)),
                     input=fewbit.QuantSpec("int4", fewbit.PerTensor()))


def _within_loss(metric, reference, tolerance):
    return metric <= reference * (1 + tolerance)


@pytest.fixture(scope="module")
def task():
    return _task()


def _loss(model, data):
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(data[0]), data[1]))


def _accuracy(model, data):
    with torch.no_grad():
        return float((model(data[0]).argmax(1) == data[1]).float().mean())


def test_ptq_within_tolerance_reports_every_calibrator(task):
    model, train, test = task
    model = _copy(model)
    calib = [train[0][i:i + 256] for i in range(0, 1024, 256)]
    model, report = fewbit.ptq(model, "int8", calib, lambda m: _accuracy(m, test), tolerance=0.01)
    assert set(report.calibrator_metrics) == set(METHODS)
    assert report.chosen_calibrator == max(METHODS, key=lambda m: report.calibrator_metrics[m])
    assert report.float_metric > 0.9
    assert report.within_tolerance and report.final_metric >= report.float_metric * 0.99
    assert report.float_layers == [] and report.sensitivity == {}
    d = report.to_dict()
    assert d["steps"][0]["step"] == "float" and len(d["steps"]) == 1 + len(METHODS)
    assert set(d["layer_amax"]) == {"0", "2", "4"}
    assert all(isinstance(m, QLinear) for m in (model[0], model[2], model[4]))


def test_ptq_leaves_sensitive_layers_in_float_when_tolerance_is_tight(task):
    model, train, test = task
    model = _copy(model)
    calib = [train[0][:512]]
    # 4-bit weights and inputs: no calibrator alone gets within 1% of the float loss.
    model, report = fewbit.ptq(model, W4A4, calib, lambda m: _loss(m, test), tolerance=0.01,
                               higher_is_better=False, methods=["max", "entropy"])
    assert not _within_loss(report.calibrated_metric, report.float_metric, 0.01)
    assert report.chosen_calibrator == min(["max", "entropy"], key=lambda m: report.calibrator_metrics[m])
    assert list(report.sensitivity) and set(report.sensitivity) == {"0", "2", "4"}
    losses = list(report.sensitivity.values())
    assert losses == sorted(losses, reverse=True)  # most sensitive (largest loss alone) first
    assert report.float_layers == list(report.sensitivity)[: len(report.float_layers)]
    assert len(report.float_layers) >= 1 and report.within_tolerance
    for name in report.float_layers:
        assert type(model.get_submodule(name)) is nn.Linear
    assert abs(report.final_metric - report.float_metric) <= abs(report.calibrated_metric - report.float_metric)
    assert report.final_metric == pytest.approx(_loss(model, test), rel=1e-6)
    assert report.steps[-1]["float_layers"] == report.float_layers
    summary = fewbit.summary(model)
    assert any("left in float by ptq" in reason for reason in summary["skipped"].values())


def test_ptq_rejects_bad_input(task):
    model, train, _ = task
    with pytest.raises(ValueError, match="tolerance"):
        fewbit.ptq(_copy(model), "int8", [train[0][:8]], lambda m: 0.0, tolerance=-1)
    with pytest.raises(ValueError, match="'kl'"):
        fewbit.ptq(_copy(model), "int8", [train[0][:8]], lambda m: 0.0, methods=["kl"])
    quantized = fewbit.quantize_(_copy(model), "int8")
    with pytest.raises(ValueError, match="float model"):
        fewbit.ptq(quantized, "int8", [train[0][:8]], lambda m: 0.0)
    # Recipes without a static range to calibrate fail before any evaluation.
    never = lambda m: pytest.fail("evaluated")  # noqa: E731
    with pytest.raises(ValueError, match=r"recipe 'mxfp8'.*Use one of: fp8, fp8_current, int8"):
        fewbit.ptq(_copy(model), "mxfp8", [train[0][:8]], never)
    with pytest.raises(ValueError, match="leave 'entropy' out"):
        fewbit.ptq(_copy(model), "fp8_current", [train[0][:8]], never, methods=["max", "entropy"])
    assert ptq_methods("fp8_current") == [m for m in METHODS if m != "entropy"]  # the default: what applies
    assert ptq_methods("int8") == list(METHODS)
    with pytest.raises(ValueError, match="evaluate returned nan for the float model"):
        fewbit.ptq(_copy(model), "int8", [train[0][:8]], lambda m: math.nan)


def test_ptq_never_chooses_a_calibrator_whose_metric_is_nan(task):
    model, train, test = task
    calls = iter(range(100))

    def eval_fn(m):  # the float model, then max (NaN), then the other calibrators
        return math.nan if next(calls) == 1 else _accuracy(m, test)

    _, report = fewbit.ptq(_copy(model), "int8", [train[0][:256]], eval_fn, methods=["max", "entropy", "mse"])
    assert math.isnan(report.calibrator_metrics["max"]) and report.chosen_calibrator != "max"
    assert report.within_tolerance


# ---- QAT ----------------------------------------------------------------------------------------------------------


def test_qat_keeps_or_improves_the_calibrated_metric(task):
    model, train, test = task
    model = _copy(model)
    fewbit.calibrate(model, [train[0][:512]], "entropy", recipe=W4A4)
    before = _loss(model, test)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 2048, (128,), generator=g) for _ in range(30)]

    def data(step, micro):
        i = batches[step]
        return train[0][i], train[1][i]

    amax = model[2].recipe.input.scaling.amax
    result = fewbit.qat(model, data, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), original_steps=300,
                        original_lr=1e-1, optimizer_fn=lambda p, lr: torch.optim.Adam(p, lr=lr), progress=False)
    assert result.step == 30  # 10% of the original steps
    assert model[2].recipe.input.scaling.amax == amax  # ranges stay fixed
    after = _loss(model.eval(), test)
    assert after <= before + 1e-4
    with pytest.raises(ValueError, match="original_steps"):
        fewbit.qat(model, data, lambda m, b: m(b[0]).sum(), original_lr=1.0)


# ---- BatchNorm folding ----------------------------------------------------------------------------------------------


def _cnn(conv_bias: bool, dims: int = 2) -> nn.Module:
    torch.manual_seed(3)
    conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
    model = nn.Sequential(conv(3, 8, 3, padding=1, bias=conv_bias), bn(8), nn.ReLU(),
                          nn.Sequential(conv(8, 8, 3, stride=2, groups=2, bias=conv_bias), bn(8)), nn.ReLU())
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.2, 3)
            nn.init.uniform_(m.weight, 0.5, 2.0)
            nn.init.uniform_(m.bias, -1, 1)
    return model.eval()


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("dims", [1, 2])
def test_fold_batchnorm_matches_unfolded_eval(conv_bias, dims):
    model = _cnn(conv_bias, dims)
    x = torch.randn(4, 3, *([10] * dims))
    with torch.no_grad():
        expected = model(x)
        folded = fewbit.fold_batchnorm_(model)
        got = model(x)
    assert folded == [("0", "1"), ("3.0", "3.1")]
    assert isinstance(model[1], nn.Identity) and isinstance(model[3][1], nn.Identity)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="eval"):
        fewbit.fold_batchnorm_(_cnn(conv_bias, dims).train())


# ---- helpers --------------------------------------------------------------------------------------------------------


def _copy(model):
    import copy

    return copy.deepcopy(model)
