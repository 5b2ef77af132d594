"""Hardening of training, checkpoints, runs, conversion and calibration: bad arguments are refused with the value
named, non-finite values never poison what outlives a step, damaged files are reported (never loaded silently), and
nothing is silently replaced or left half-changed."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from fewbit.nn import quantized_layers
from fewbit.train import AllStepsSkipped, CheckpointError, train
from fewbit.train import checkpoint as ckpt
from tests.test_train import adam, data, make_model, mse


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    # Small tensors: eager kernels are faster than compiling them (the compiled ones are tested against eager).
    monkeypatch.setenv("FEWBIT_COMPILE", "0")


def _with_inf_at(step_with_inf: int):
    def batches(step, micro):
        x, y = data(step, micro)
        if step == step_with_inf:
            x = x.clone()
            x[0, 0] = math.inf
        return x, y

    return batches


def _histories(model):
    return [h for _, m in quantized_layers(model) for h in m._state.histories.values()]


# ---- 1. one bad batch under delayed scaling ----------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp8", "fp8_current", "mxfp8"])
def test_one_batch_with_inf_is_skipped_counted_and_the_run_recovers(precision):
    clean = train(make_model(), adam, data, mse, steps=8, precision=precision, progress=False)
    model = make_model()
    with pytest.warns(RuntimeWarning, match=r"1 of 8 step\(s\) skipped for non-finite values .*step\(s\) 3\b"):
        result = train(model, adam, _with_inf_at(2), mse, steps=8, precision=precision, progress=False)
    assert result.skipped_steps == 1 and result.skipped_at == [3]
    assert all(math.isfinite(loss) for i, loss in enumerate(result.losses) if i != 2)
    assert result.losses[-1] == pytest.approx(clean.losses[-1], rel=0.1)  # recovered, not NaN for 1024 steps
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for history in _histories(model):
        assert torch.isfinite(history.history).all()


@pytest.mark.parametrize("precision", ["fp32", "fp8"])
def test_a_skipped_step_leaves_batchnorm_running_statistics_finite(precision):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))
    with pytest.warns(RuntimeWarning, match=r"step\(s\) 2\b"):
        result = train(model, adam, _with_inf_at(1), mse, steps=3, precision=precision, progress=False)
    assert result.skipped_at == [2]
    for buffer in model[1].buffers():
        assert torch.isfinite(buffer.float()).all()
    assert int(model[1].num_batches_tracked) == 2  # the skipped batch is not counted either


def test_non_finite_dy_is_seen_before_a_saturating_quantizer_hides_it():
    class InfGradient(torch.autograd.Function):  # identity forward, inf gradient: the loss stays finite
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * math.inf

    state = {"step": 0}

    def loss_fn(model, batch):
        out = model(batch[0])
        if state["step"] == 1:
            out = InfGradient.apply(out)
        return nn.functional.mse_loss(out, batch[1])

    def on_step(step, model):
        state["step"] = step

    model = make_model()
    with pytest.warns(RuntimeWarning, match="1 of 4 step"):
        result = train(model, adam, data, loss_fn, steps=4, precision="fp8", progress=False, on_step=on_step)
    assert result.skipped_at == [2] and all(math.isfinite(v) for v in result.losses)


def test_metrics_log_marks_the_skipped_step(tmp_path):
    with pytest.warns(RuntimeWarning):
        train(make_model(), adam, _with_inf_at(1), mse, steps=3, precision="fp8", log_path=tmp_path / "m.jsonl",
              progress=False)
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False, True, False]


# ---- 2. arguments and runs that never take a step ------------------------------------------------------------


@pytest.mark.parametrize("grad_clip", [-1.0, math.inf, math.nan, "1", True])
def test_bad_grad_clip_is_refused(grad_clip):
    with pytest.raises(ValueError, match=r"grad_clip=.*finite max-norm > 0, or 0/None for no clipping"):
        train(make_model(), adam, data, mse, steps=1, grad_clip=grad_clip, progress=False)


def test_grad_clip_zero_means_no_clipping():
    runs = [train(make_model(), adam, data, mse, steps=3, grad_clip=clip, progress=False).losses
            for clip in (None, 0, 0.0)]
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("lr", [math.inf, math.nan, -1e-3])
def test_bad_learning_rate_is_refused(lr):
    with pytest.raises(ValueError, match=r"parameter group 0 has lr=.*finite number >= 0"):
        train(make_model(), lambda p: _sgd(p, lr), data, mse, steps=1, progress=False)


def _sgd(params, lr):
    optimizer = torch.optim.SGD(params, lr=0.1)
    for group in optimizer.param_groups:
        group["lr"] = lr  # torch itself refuses a negative lr at construction, not inf or NaN, nor a later change
    return optimizer


@pytest.mark.parametrize("scale", [math.inf, math.nan, 0.0, -2.0, True])
def test_bad_loss_scale_is_refused(scale):
    with pytest.raises(ValueError, match=r"finite positive number|unknown loss scaling"):
        train(make_model(), adam, data, mse, steps=1, loss_scaling=scale, progress=False)


def test_a_run_that_never_takes_a_step_is_an_error():
    def nan_loss(model, batch):
        return mse(model, batch) * math.nan

    with pytest.raises(AllStepsSkipped, match="all 3 step"):
        train(make_model(), adam, data, nan_loss, steps=3, progress=False)
    with pytest.raises(AllStepsSkipped):
        train(make_model(), adam, data, nan_loss, steps=3, precision="fp8", progress=False)


def test_skips_of_a_dynamic_scaler_finding_its_scale_only_warn():
    with pytest.warns(RuntimeWarning, match="finding its scale"):
        result = train(make_model(), adam, data, mse, steps=2, precision="fp16_pure", progress=False)
    assert result.skipped_steps == 2


# ---- 6. checkpoints carry checksums; damage is reported and the previous checkpoint used ------------------------


def _flip_bit_in_tensor(path, name):
    """Flip one bit inside tensor ``name``'s bytes of a safetensors file (the header says where they are)."""
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + size])[name]["data_offsets"]
    data[8 + size + (start + end) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _rewrite_tensors(path, change):
    """Re-save a safetensors file with its metadata, its tensors passed through ``change`` (a bad copy tool)."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + size]).get("__metadata__")
    path.write_bytes(st_save(change(dict(st_load(data))), metadata=metadata))


def _corrupt(kind, folder):
    tensors, state = folder / "tensors.safetensors", folder / "state.json"
    if kind == "flipped bit in a weight":
        _flip_bit_in_tensor(tensors, "model.0.weight")
    elif kind == "flipped bit in state.json":
        state.write_text(state.read_text().replace('"step": 6', '"step": 7'))
    elif kind == "truncated tensors":
        tensors.write_bytes(tensors.read_bytes()[: len(tensors.read_bytes()) // 2])
    elif kind == "truncated state.json":
        state.write_bytes(state.read_bytes()[:-40])
    elif kind == "missing key":
        _rewrite_tensors(tensors, lambda t: {k: v for k, v in t.items() if k != "model.2.bias"})
    elif kind == "edited shape":
        _rewrite_tensors(tensors, lambda t: {**t, "model.0.weight": t["model.0.weight"].reshape(16, 32)})
    elif kind == "missing file":
        tensors.unlink()
    return {"flipped bit in a weight": "'model.0.weight' does not match its checksum",
            "flipped bit in state.json": "state.json does not match the checksum",
            "truncated tensors": "truncated or corrupted", "truncated state.json": "truncated or corrupted",
            "missing key": "'model.2.bias' is missing", "edited shape": r"'model.0.weight' has shape \[16, 32\]",
            "missing file": "tensors.safetensors is missing"}[kind]


CORRUPTIONS = ["flipped bit in a weight", "flipped bit in state.json", "truncated tensors", "truncated state.json",
               "missing key", "edited shape", "missing file"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, kind):
    train(make_model(), adam, data, mse, steps=6, checkpoint_dir=tmp_path / "a", checkpoint_every=2, progress=False)
    newest = ckpt.list_checkpoints(tmp_path / "a")[-1]
    message = _corrupt(kind, newest)
    with pytest.raises(CheckpointError, match=message):
        ckpt.load(newest)
    model = make_model()
    with pytest.warns(RuntimeWarning, match=f"skipping unusable checkpoint.*{message}"):
        result = train(model, adam, data, mse, steps=8, checkpoint_dir=tmp_path / "a", checkpoint_every=2,
                       progress=False)
    assert len(result.losses) == 4  # resumed from step 4
    # The same as resuming from step 4 with no step-6 checkpoint at all.
    train(make_model(), adam, data, mse, steps=4, checkpoint_dir=tmp_path / "b", checkpoint_every=2, progress=False)
    reference = make_model()
    train(reference, adam, data, mse, steps=8, checkpoint_dir=tmp_path / "b", checkpoint_every=2, progress=False)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_version_1_checkpoint_loads_with_a_warning(tmp_path):
    train(make_model(), adam, data, mse, steps=2, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    folder = ckpt.list_checkpoints(tmp_path)[-1]
    state = json.loads((folder / "state.json").read_text())
    state["format_version"] = 1
    del state["tensors"]
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="no checksums"):
        ckpt.load(folder)


# ---- 7. resuming never returns or mixes another run silently ---------------------------------------------------


def test_resume_beyond_steps_is_refused(tmp_path):
    train(make_model(), adam, data, mse, steps=6, checkpoint_dir=tmp_path, checkpoint_every=6, progress=False)
    with pytest.raises(CheckpointError, match=r"step-00000006 is at step 6, beyond steps=4.*steps >= 6"):
        train(make_model(), adam, data, mse, steps=4, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)


def test_a_fresh_run_into_a_folder_of_checkpoints_is_refused(tmp_path):
    train(make_model(), adam, data, mse, steps=2, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    with pytest.raises(CheckpointError, match=r"already holds checkpoints .*resume=False"):
        train(make_model(), adam, data, mse, steps=2, checkpoint_dir=tmp_path, checkpoint_every=2, resume=False,
              progress=False)


def test_a_resumed_runs_metrics_do_not_repeat_steps(tmp_path):
    log = tmp_path / "metrics.jsonl"
    train(make_model(), adam, data, mse, steps=6, checkpoint_dir=tmp_path / "ck", checkpoint_every=4, log_path=log,
          progress=False)  # killed after step 6, say: the newest checkpoint is step 4
    with open(log, "a") as f:
        f.write('{"step": 7, "lo')  # and a line cut short
    train(make_model(), adam, data, mse, steps=8, checkpoint_dir=tmp_path / "ck", checkpoint_every=4, log_path=log,
          progress=False)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, 9))


@pytest.mark.parametrize("schedule", [None, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))])
def test_a_changed_learning_rate_on_resume_is_refused(tmp_path, schedule):
    train(make_model(), adam, data, mse, steps=2, lr_schedule=schedule, checkpoint_dir=tmp_path, checkpoint_every=2,
          progress=False)
    key = "initial_lr" if schedule else "lr"
    with pytest.raises(CheckpointError, match=f"optimizer differs at parameter group 0 '{key}': saved 0.01, this "
                                              "run 0.02"):
        train(make_model(), lambda p: torch.optim.Adam(p, lr=0.02), data, mse, steps=4, lr_schedule=schedule,
              checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    # The same settings resume.
    result = train(make_model(), adam, data, mse, steps=4, lr_schedule=schedule, checkpoint_dir=tmp_path,
                   checkpoint_every=2, progress=False)
    assert len(result.losses) == 2


# ---- 3. the eval-mode weight cache sees edits through .data -----------------------------------------------------


@pytest.mark.parametrize("recipe", ["int8", "mxfp8", "fp8"])
def test_eval_weight_cache_sees_an_edit_through_data(recipe):
    import fewbit

    torch.manual_seed(0)
    model = fewbit.quantize_(nn.Sequential(nn.Linear(16, 8)), recipe).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        before = model(x)
        model[0].weight.data.mul_(0)
        after = model(x)
        assert not torch.equal(before, after)
        assert torch.equal(after, model[0].bias.expand_as(after))  # a zero weight: the output is the bias
        model[0].weight.data.copy_(torch.randn(8, 16))
        fresh = fewbit.quantize_(nn.Sequential(nn.Linear(16, 8)), recipe).eval()
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(model(x), fresh(x))


@pytest.mark.parametrize("recipe", ["int8", "mxfp8"])
def test_eval_weight_cache_sees_a_one_bit_edit_anywhere(recipe):
    import fewbit

    torch.manual_seed(0)
    model = fewbit.quantize_(nn.Sequential(nn.Linear(64, 32)), recipe).eval()
    layer, x = model[0], torch.randn(4, 64)

    def served_from_current_bits():
        cache = layer._weight_cache
        return cache is not None and torch.equal(cache[1].view(torch.int32), layer.weight.detach().view(torch.int32))

    with torch.no_grad():
        model(x)
        for index in (0, layer.weight.numel() - 1):  # the first and the last element of the weight
            layer.weight.data.view(-1).view(torch.int32)[index] ^= 1  # its lowest mantissa bit; no version bump
            model(x)
            assert served_from_current_bits()
        layer.weight.data[3, 5] = 0.0
        model(x)
        layer.weight.data[3, 5] = -0.0  # equal values, different bits
        model(x)
        assert served_from_current_bits()
        fresh = fewbit.quantize_(nn.Sequential(nn.Linear(64, 32)), recipe).eval()
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(model(x).view(torch.int32), fresh(x).view(torch.int32))


@pytest.mark.parametrize("recipe", ["mxfp8", "int8"])
def test_frozen_weights_trusts_the_cache_sees_tracked_writes_and_checks_the_bits_again_after(recipe):
    import fewbit
    from fewbit.nn import frozen_weights

    torch.manual_seed(0)
    model = fewbit.quantize_(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)), recipe).eval()
    layer, x = model[0], torch.randn(4, 64)
    calls = []
    quantized_weight = layer.quantized_weight
    layer.quantized_weight = lambda w: calls.append(1) or quantized_weight(w)
    with torch.no_grad():
        exact = model(x)
        calls.clear()
        with frozen_weights(model):
            for _ in range(3):
                assert torch.equal(model(x).view(torch.int32), exact.view(torch.int32))
            assert calls == []  # the cache made before the block is served, its bits not compared
            layer.weight.mul_(0.5)  # a tracked in-place write bumps the version counter: seen
            halved = model(x)
            assert len(calls) == 1 and not torch.equal(halved, exact)
            layer.weight.data.mul_(2.0)  # untracked: not seen inside the block, as documented
            assert torch.equal(model(x), halved) and len(calls) == 1
        # After the block: a cache made inside it (no copy of the weight to compare with) is made again.
        assert torch.equal(model(x).view(torch.int32), exact.view(torch.int32))
        assert len(calls) == 2
        layer.weight.data.mul_(0.5)  # and the bits are compared again
        assert torch.equal(model(x), halved) and len(calls) == 3
        with pytest.raises(KeyError), frozen_weights(model), frozen_weights(model):
            raise KeyError("inside")
        assert not any(m.__dict__.get("_weights_frozen") for m in model)  # restored through nesting and the error


def test_evaluations_run_with_frozen_weights():
    import fewbit
    from fewbit.workloads.base import evaluating

    model = fewbit.quantize_(nn.Sequential(nn.Linear(16, 8)), "mxfp8").train()
    with evaluating(model):
        assert model[0].__dict__["_weights_frozen"] and not model.training and not torch.is_grad_enabled()
    assert not model[0].__dict__["_weights_frozen"] and model.training
    with evaluating(abs):  # a callable that is not a module: no mode, no cache, nothing to freeze
        assert not torch.is_grad_enabled()
    from fewbit.mlperf.backends import Backend

    backend = Backend("torch", model.eval(), "mxfp8", "a LoadGen worker's model")
    with backend.running():  # what each SUT worker thread runs the model under
        assert model[0].__dict__["_weights_frozen"] and not torch.is_grad_enabled()
    assert not model[0].__dict__["_weights_frozen"]


# ---- 10. tied weights counted once; layer_recipes patterns that match nothing ----------------------------------


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(64, 32)
        self.a = nn.Linear(32, 32, bias=False)
        self.b = nn.Linear(32, 32, bias=False)
        self.b.weight = self.a.weight  # two layers, one weight
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.tokens.weight  # the output head tied to the embedding

    def forward(self, ids):
        return self.head(self.b(self.a(self.tokens(ids))))


def test_summary_and_weight_bytes_count_tied_weights_once():
    import fewbit
    from fewbit.nn import weight_bytes

    model = fewbit.quantize_(_Tied(), "int8")
    record = fewbit.summary(model)
    assert record["weights"] == 32 * 32 + 64 * 32 and record["layers"] == 3
    assert record["float_bytes"] == 4 * (32 * 32 + 64 * 32)
    assert [r.tied_to for r in record.rows] == [None, "a", None]
    int8 = lambda rows, cols: rows * cols + 4 * rows  # noqa: E731 - codes and one float32 scale per row
    assert record["quantized_bytes"] == int8(32, 32) + int8(64, 32)
    assert weight_bytes(model)["total"] == int8(32, 32) + int8(64, 32)  # the embedding is the head's weight


def test_a_layer_recipes_pattern_that_matches_nothing_warns():
    import fewbit

    with pytest.warns(UserWarning, match=r"pattern 'blocks\.\*' matches no layer of _Tied.*'tokens', 'a'"):
        fewbit.quantize_(_Tied(), "int8", layer_recipes={"head": None, "blocks.*": None})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fewbit.quantize_(_Tied(), "int8", layer_recipes={"head": None, "?": "bf16"})


# ---- 8. a failed ptq leaves the model as it was ----------------------------------------------------------------


def _ptq_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).train()


def _accuracy(model):
    return float((model(torch.randn(64, 16, generator=torch.Generator().manual_seed(0))).argmax(1) == 0)
                 .float().mean())


@pytest.mark.parametrize("failure", ["no batches", "eval_fn raises"])
def test_a_failed_ptq_restores_the_model_and_a_retry_works(failure):
    import fewbit

    model = _ptq_model()
    layers = list(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(8, 16) for _ in range(2)]
    calls = {"n": 0}

    def flaky(m):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("evaluation server went away")
        return _accuracy(m)

    with pytest.raises((ValueError, RuntimeError), match=r"no batches|went away"):
        if failure == "no batches":
            fewbit.ptq(model, "int8", [], _accuracy)
        else:
            fewbit.ptq(model, "int8", batches, flaky)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear] and list(model) == layers
    assert model.training and not fewbit.nn.skipped_layers(model) and not list(quantized_layers(model))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    model, report = fewbit.ptq(model, "int8", batches, _accuracy, methods=["max"])
    assert report.chosen_calibrator == "max" and list(quantized_layers(model))
