"""The training loop's precision policy (one vocabulary with the recipes) and its callbacks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import fewbit
from fewbit import recipes
from fewbit.recipes import Recipe
from fewbit.train import Callback, CheckpointError, Precision, StopAtTarget, train
from fewbit.train import checkpoint as ckpt
from fewbit.train import loop as loop_module
from tests.test_train import adam, data, make_model, mse


def _docstring_table() -> dict[str, dict[str, str]]:
    """The precision table of fewbit.train.loop's docstring: {name: {column: value}} ("any other recipe" under
    the key "*")."""
    lines = [line for line in loop_module.__doc__.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows["*" if cells[0].startswith("any other") else cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return rows


TABLE = _docstring_table()
COLUMNS = {"layers (quantize_)": "layers", "autocast": "autocast", "param_dtype": "param_dtype",
           "master copy": "master_weight_dtype", "loss_scaling": "loss_scaling"}


@pytest.mark.parametrize("name", recipes.names(include_training=True))
def test_precision_table_is_each_names_effective_policy(name):
    row = TABLE.get(name, TABLE["*"])
    described = Precision.of(name).describe()
    assert {column: described[key] for column, key in COLUMNS.items()} == row


def test_one_name_one_recipe():
    for name in recipes.names(include_training=True):
        assert Precision.of(name).recipe is recipes.get(name)
    assert Precision.of("bf16").recipe.compute_format == "bf16" and Precision.of("bf16").autocast_dtype is None
    assert Precision.of("bf16_mixed").autocast_dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"unknown precision 'fp12'; valid: bf16_mixed, fp16_mixed, fp16_pure"):
        Precision.of("fp12")


class _Spy(nn.Module):
    """Records the dtype a Linear's output has in the forward pass (autocast shows there)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.dtypes = model, []

    def forward(self, x):
        y = self.model[0](x)
        self.dtypes.append(y.dtype)
        return self.model[2](self.model[1](y))


@pytest.mark.parametrize("name, layer, forward_dtype, param_dtype, master_dtype", [
    ("fp32", nn.Linear, torch.float32, torch.float32, None),
    ("bf16", fewbit.QLinear, torch.float32, torch.float32, None),  # emulated: bf16 operands, float32 results
    ("bf16_mixed", nn.Linear, torch.bfloat16, torch.float32, None),
    ("fp16_mixed", nn.Linear, torch.float16, torch.float32, None),
    ("fp16_pure", nn.Linear, torch.float16, torch.float16, torch.float32),
    ("mxfp8", fewbit.QLinear, torch.float32, torch.float32, None),
])
def test_train_runs_each_policy_as_the_table_says(name, layer, forward_dtype, param_dtype, master_dtype):
    spy = _Spy(make_model())
    seen = {}

    def optimizer_fn(params):
        seen["dtypes"] = {p.dtype for p in params}
        seen["own"] = all(any(p is q for q in spy.parameters()) for p in params)
        return adam(params)

    result = train(spy, optimizer_fn, data, mse, steps=2, precision=name, progress=False)
    assert type(spy.model[0]) is layer
    assert set(spy.dtypes) == {forward_dtype}
    assert {p.dtype for p in spy.parameters()} == {param_dtype}
    assert seen["dtypes"] == {master_dtype or param_dtype} and seen["own"] == (master_dtype is None)
    assert (result.final_scale is not None) == (recipes.get(name).loss_scaling == "dynamic")


@pytest.mark.parametrize("name", ["fp16_pure", "mxfp8", "bf16"])
def test_recipe_file_or_dict_trains_as_the_preset(name, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipes.get(name).to_yaml())
    runs = {}
    for key, precision in (("name", name), ("file", str(path)), ("dict", recipes.get(name).to_dict())):
        model = make_model()
        runs[key] = train(model, adam, data, mse, steps=5, precision=precision, progress=False).losses, model
    for key in ("file", "dict"):
        assert runs[key][0] == runs["name"][0]
        for a, b in zip(runs[key][1].state_dict().values(), runs["name"][1].state_dict().values(), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("param_dtype, master_dtype", [("bfloat16", "bfloat16"), ("float16", "float16"),
                                                        ("bfloat16", "float32")])
def test_master_weight_dtype_is_honoured(param_dtype, master_dtype, tmp_path):
    recipe = Recipe(name="custom", param_dtype=param_dtype, master_weight_dtype=master_dtype)
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer_params = []

    def optimizer_fn(params):
        optimizer_params.extend(params)
        return torch.optim.SGD(params, lr=0.05)

    result = train(model, optimizer_fn, data, mse, steps=4, precision=recipe, checkpoint_dir=tmp_path,
                   checkpoint_every=4, progress=False)
    assert all(p.dtype == getattr(torch, param_dtype) for p in model.parameters())
    assert all(m.dtype == getattr(torch, master_dtype) for m in optimizer_params)
    assert result.losses[-1] < result.losses[0]  # it learns
    assert all(not torch.equal(p.float(), b) for p, b in zip(model.parameters(), before, strict=True))
    tensors, _ = ckpt.load(ckpt.list_checkpoints(tmp_path)[-1])
    masters = {k: v for k, v in tensors.items() if k.startswith("master.")}
    if master_dtype == param_dtype:  # the optimizer updates the parameters themselves: no copy is kept
        assert not masters
        assert all(p is q for p, q in zip(optimizer_params, model.parameters(), strict=True))
    else:
        assert len(masters) == 4 and all(v.dtype == torch.float32 for v in masters.values())
        # the parameters are the master copy rounded to their dtype
        for p, m in zip(model.parameters(), optimizer_params, strict=True):
            assert torch.equal(p, m.detach().to(p.dtype))


# ---- callbacks -------------------------------------------------------------------------------------------------


class Recorder(Callback):
    def __init__(self, log: list, tag: str = "") -> None:
        self.log, self.tag = log, tag

    def on_train_start(self, state):
        self.log.append((self.tag, "start", state.step))

    def on_gradients(self, state, found_inf):
        self.log.append((self.tag, "gradients", state.step))

    def on_step_end(self, state, record):
        self.log.append((self.tag, "step_end", state.step, "eval" in record))

    def on_eval(self, state, metrics):
        self.log.append((self.tag, "eval", state.step))

    def on_train_end(self, state, error):
        self.log.append((self.tag, "end", state.step, type(error).__name__ if error else None))


def _eval_fn(model):
    x, y = data(999)
    return {"loss": mse(model, (x, y)).item()}


def test_callbacks_run_in_order_after_the_builtins(tmp_path):
    log = []
    train(make_model(), adam, data, mse, steps=3, eval_fn=_eval_fn, eval_every=2, progress=False,
          log_path=tmp_path / "m.jsonl", on_step=lambda step, m: log.append(("on_step", step)),
          callbacks=[Recorder(log, "a"), Recorder(log, "b")])
    assert log == [
        ("a", "start", 0), ("b", "start", 0),
        ("a", "gradients", 0), ("b", "gradients", 0), ("on_step", 1), ("a", "step_end", 1, False),
        ("b", "step_end", 1, False),
        ("a", "gradients", 1), ("b", "gradients", 1),
        ("a", "eval", 2), ("b", "eval", 2),  # the evaluation (a built-in) reports before the later step_end hooks
        ("on_step", 2), ("a", "step_end", 2, True), ("b", "step_end", 2, True),
        ("a", "gradients", 2), ("b", "gradients", 2), ("on_step", 3), ("a", "step_end", 3, False),
        ("b", "step_end", 3, False),
        ("a", "end", 3, None), ("b", "end", 3, None),
    ]
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [("eval" in r) for r in records] == [False, True, False]


def test_train_end_sees_the_error():
    log = []

    def failing(model, batch):
        if len(log) > 3:
            raise RuntimeError("boom")
        return mse(model, batch)

    with pytest.raises(RuntimeError, match="boom"):
        train(make_model(), adam, data, failing, steps=5, progress=False, callbacks=[Recorder(log)])
    assert log[-1] == ("", "end", 2, "RuntimeError")


class Stopper(Callback):
    def on_step_end(self, state, record):
        if state.step == 2:
            state.request_stop("enough")


def test_a_callback_can_stop_training(tmp_path):
    result = train(make_model(), adam, data, mse, steps=10, progress=False, callbacks=[Stopper()],
                   log_path=tmp_path / "m.jsonl")
    assert result.step == 2 and len(result.losses) == 2 and result.stop_reason == "enough" and result.stopped_early
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2


def test_stop_at_target_stops_at_the_first_evaluation_that_reaches_it():
    full = train(make_model(), adam, data, mse, steps=30, eval_fn=_eval_fn, eval_every=3, progress=False)
    losses = [e["loss"] for e in full.evals]
    assert losses[0] > losses[-1]
    target = (losses[2] + losses[3]) / 2 if losses[3] < losses[2] else losses[3]
    first = next(e["step"] for e in full.evals if e["loss"] <= target)
    assert first < 30
    stop = StopAtTarget("loss", target, higher_is_better=False)
    result = train(make_model(), adam, data, mse, steps=30, eval_fn=_eval_fn, eval_every=3, progress=False,
                   callbacks=[stop])
    assert result.step == first and result.stopped_early and len(result.losses) == first
    assert result.losses == full.losses[:first] and result.evals == full.evals[:first // 3]
    assert f"reached the target {target:g} (<=) at step {first}" in result.stop_reason
    assert stop.reached["step"] == first and stop.reached["value"] <= target and stop.reached["seconds"] > 0
    # Never reached (higher is better): every step runs and the result says nothing stopped it.
    never = StopAtTarget("loss", 1e9)
    result = train(make_model(), adam, data, mse, steps=6, eval_fn=_eval_fn, eval_every=3, progress=False,
                   callbacks=[never])
    assert result.step == 6 and result.stop_reason is None and never.reached is None


def test_stop_at_target_errors():
    with pytest.raises(ValueError, match=r"StopAtTarget\('accuracy'\) needs evaluations: give train\(\) eval_fn="):
        train(make_model(), adam, data, mse, steps=2, progress=False, callbacks=[StopAtTarget("accuracy", 0.9)])
    with pytest.raises(ValueError, match="the evaluation has no metric 'accuracy'; it has loss"):
        train(make_model(), adam, data, mse, steps=2, eval_fn=_eval_fn, eval_every=1, progress=False,
              callbacks=[StopAtTarget("accuracy", 0.9)])
    with pytest.raises(ValueError, match="must be finite"):
        StopAtTarget("loss", math.nan)


# ---- checkpoints written before precision names were recipes ---------------------------------------------------


def _rewrite_config(directory, change) -> None:
    """Turn the checkpoints into ones an older fewbit wrote: format version 1 (no checksums), config changed."""
    for path in ckpt.list_checkpoints(directory):
        state = json.loads((path / "state.json").read_text())
        change(state["config"])
        state["format_version"] = 1
        del state["tensors"]
        (path / "state.json").write_text(json.dumps(state))


def test_resume_from_checkpoints_of_the_old_policies_and_recipe_fields(tmp_path):
    train(make_model(), adam, data, mse, steps=2, precision="fp16_mixed", checkpoint_dir=tmp_path / "a",
          checkpoint_every=2, progress=False)
    _rewrite_config(tmp_path / "a", lambda c: c.pop("recipe"))  # an old fp16_mixed policy run stored no recipe
    result = train(make_model(), adam, data, mse, steps=4, precision="fp16_mixed", checkpoint_dir=tmp_path / "a",
                   checkpoint_every=2, progress=False)
    assert len(result.losses) == 2  # resumed at step 2

    def old_recipe(config):  # a recipe stored before autocast and param_dtype existed
        del config["recipe"]["autocast"], config["recipe"]["param_dtype"]

    train(make_model(), adam, data, mse, steps=2, precision="mxfp8", checkpoint_dir=tmp_path / "b",
          checkpoint_every=2, progress=False)
    _rewrite_config(tmp_path / "b", old_recipe)
    result = train(make_model(), adam, data, mse, steps=4, precision="mxfp8", checkpoint_dir=tmp_path / "b",
                   checkpoint_every=2, progress=False)
    assert len(result.losses) == 2

    # An old "bf16" run was autocast (today's bf16_mixed): resuming it as the bf16 recipe is refused.
    train(make_model(), adam, data, mse, steps=2, precision="bf16_mixed", checkpoint_dir=tmp_path / "c",
          checkpoint_every=2, progress=False)
    _rewrite_config(tmp_path / "c", lambda c: (c.pop("recipe"), c.update(precision="bf16")))
    with pytest.raises(CheckpointError, match="config differs at 'recipe'"):
        train(make_model(), adam, data, mse, steps=4, precision="bf16", checkpoint_dir=tmp_path / "c",
              checkpoint_every=2, progress=False)
