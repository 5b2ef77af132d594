"""The training loop: loss scalers, fp16 master weights, crash-safe resume, DDP under torchrun, outputs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from fewbit.train import (
    CheckpointError,
    DynamicScaler,
    LogMaxScaler,
    LossScaleCollapse,
    StaticScaler,
    train,
)
from fewbit.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]

# ---- a small regression task, addressed by position so that resumed runs see the same batches -----------------

X = torch.randn(1024, 16, generator=torch.Generator().manual_seed(0))
W_TRUE = torch.randn(16, 1, generator=torch.Generator().manual_seed(1))
Y = X @ W_TRUE


def data(step: int, micro: int = 0, target_scale: float = 1.0):
    g = torch.Generator().manual_seed(1000 * step + micro)
    i = torch.randint(0, len(X), (64,), generator=g)
    return X[i], Y[i] * target_scale


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x).float(), y.float())


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


# ---- scalers -------------------------------------------------------------------------------------------------


def test_injected_overflow_skips_the_step_and_halves_the_scale():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snapshots = {}

    def loss_fn(m, batch):
        loss = mse(m, batch)
        return loss * math.inf if state["step"] == 2 else loss

    state = {"step": 0}

    def on_step(step, m):
        state["step"] = step
        snapshots[step] = {k: v.clone() for k, v in m.state_dict().items()}

    result = train(model, adam, data, loss_fn, steps=4, loss_scaling="dynamic", progress=False, on_step=on_step)
    assert result.skipped_steps == 1
    # Step 3 (0-based 2) overflowed: weights after it equal weights after step 2.
    for k in before:
        assert torch.equal(snapshots[3][k], snapshots[2][k])
        assert not torch.equal(snapshots[4][k], snapshots[3][k])
    assert result.final_scale == 2.0**15


def test_skipped_step_leaves_optimizer_state_untouched():
    params = [nn.Parameter(torch.ones(4))]
    optimizer = torch.optim.Adam(params, lr=0.1)
    params[0].grad = torch.ones(4)
    optimizer.step()
    state_before = {k: v.clone() for k, v in optimizer.state[params[0]].items()}
    scaler = DynamicScaler(init_scale=8.0)
    params[0].grad = torch.tensor([1.0, math.nan, 1.0, 1.0])
    from fewbit.train.scaler import unscale_and_check

    found_inf, _ = unscale_and_check(params, scaler.scale)
    assert scaler.update(found_inf) is True and scaler.scale == 4.0
    for k, v in optimizer.state[params[0]].items():
        assert torch.equal(v, state_before[k])


def test_dynamic_scaler_growth_bounds_and_collapse():
    s = DynamicScaler(init_scale=2.0**10, growth_interval=3, max_scale=2.0**11, min_scale=1.0, max_min_hits=3)
    for _ in range(3):
        assert s.update(False) is False
    assert s.scale == 2.0**11
    for _ in range(3):
        s.update(False)
    assert s.scale == 2.0**11  # bounded
    for _ in range(11):
        s.update(True)
    assert s.scale == 1.0
    with pytest.raises(LossScaleCollapse, match="minimum loss scale"):
        for _ in range(5):
            s.update(True)
    with pytest.raises(ValueError, match="positive"):
        StaticScaler(0)


def test_logmax_follows_its_definition():
    """S = 2^(16 - (mu + 3.09 sigma)) over bias-corrected moving averages of log2 max|g|, clipped to [1, 2^14]."""
    s = LogMaxScaler()
    g = torch.Generator().manual_seed(0)
    stream = [2.0 ** float(torch.randn(1, generator=g) * 2 - 10) for _ in range(300)]
    mean = second = 0.0
    for t, grad_max in enumerate(stream, start=1):
        scaled_max = grad_max * s.scale
        s.update(False, scaled_max)
        x = math.log2(grad_max)
        mean = 0.99 * mean + 0.01 * x
        second = 0.999 * second + 0.001 * x * x
        mu = mean / (1 - 0.99**t)
        var = max(second / (1 - 0.999**t) - mu * mu, 0)
        expected = min(max(2 ** (16 - (mu + 3.09 * math.sqrt(var))), 1.0), 2.0**14)
        assert s.scale == pytest.approx(expected, rel=1e-9)
    assert s.update(True, math.inf) is True and s.skipped == 1


def test_clipping_sees_unscaled_gradients(monkeypatch):
    seen = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        seen.append(torch.norm(torch.stack([p.grad.norm() for p in params])).item())
        return original(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    for loss_scaling in (None, 2.0**12):
        train(make_model(), adam, data, mse, steps=1, loss_scaling=loss_scaling, grad_clip=1e9, progress=False)
    assert seen[0] == pytest.approx(seen[1], rel=1e-5)


# ---- why loss scaling exists ---------------------------------------------------------------------------------

TINY = 2.0**-30  # a loss this small makes every gradient fall below fp16's smallest subnormal (2^-24)
FP16_TOLERANCE = 0.05  # fp16 pure with master weights ends within 5% of the fp32 loss (measured: under 1%)


def test_fp16_pure_with_loss_scaling_matches_fp32_and_without_it_fails():
    def tiny_mse(model, batch):  # the gradients are TINY times ordinary ones; the learning rate makes up for it
        return mse(model, batch) * TINY

    def run(precision, loss_scaling):
        return train(make_model(3), lambda p: torch.optim.SGD(p, lr=0.02 / TINY), data, tiny_mse, steps=150,
                     precision=precision, loss_scaling=loss_scaling, progress=False)

    fp32 = run("fp32", None)
    fp16 = run("fp16_pure", "dynamic")
    unscaled = run("fp16_pure", None)
    initial = fp32.losses[0]
    final = {k: sum(r.losses[-10:]) / 10 for k, r in (("fp32", fp32), ("fp16", fp16), ("none", unscaled))}
    assert final["fp32"] < 0.1 * initial  # the task is learnable
    assert abs(final["fp16"] - final["fp32"]) <= FP16_TOLERANCE * final["fp32"] + 1e-3 * initial
    assert final["none"] > 0.95 * initial  # every gradient flushed to zero in fp16: nothing learned


def test_fp16_pure_keeps_half_precision_weights_and_float_master():
    model = make_model()
    train(model, adam, data, mse, steps=3, precision="fp16_pure", progress=False)
    assert all(p.dtype == torch.float16 for p in model.parameters())


# ---- crash safety --------------------------------------------------------------------------------------------

TRAIN_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_train import make_model, data, mse, adam
    from fewbit.train import train
    out, ckdir, slow = sys.argv[1], sys.argv[2], float(sys.argv[3])
    torch.manual_seed(0)
    model = make_model(0)
    def on_step(step, m):
        print("step", step, flush=True)
        time.sleep(slow)
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    train(model, adam, data, mse, steps=30, precision="fp16_mixed", checkpoint_dir=ckdir, checkpoint_every=5,
          lr_schedule=sched, progress=False, on_step=on_step)
    torch.save(model.state_dict(), out)
""")


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(TRAIN_SCRIPT.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, str(script), str(tmp_path / "ref.pt"), str(tmp_path / "ref_ck"), "0"],
                   check=True, env=env, timeout=300, capture_output=True)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "out.pt"), str(tmp_path / "ck"), "0.2"],
                            env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.strip() == "step 17":
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp_path / "out.pt").exists()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "ck")][-1] == "step-00000015"
    subprocess.run([sys.executable, str(script), str(tmp_path / "out.pt"), str(tmp_path / "ck"), "0"],
                   check=True, env=env, timeout=300, capture_output=True)
    ref, out = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "out.pt")
    for k in ref:
        assert torch.equal(ref[k], out[k]), k


def test_resume_with_a_different_model_or_config_is_refused(tmp_path):
    train(make_model(), adam, data, mse, steps=4, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    wider = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 1))
    with pytest.raises(CheckpointError, match=r"model differs at '0.bias': saved \[32\], this model \[48\]"):
        train(wider, adam, data, mse, steps=6, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    with pytest.raises(CheckpointError, match="config differs at 'grad_clip'"):
        train(make_model(), adam, data, mse, steps=6, grad_clip=1.0, checkpoint_dir=tmp_path, checkpoint_every=2,
              progress=False)


def test_corrupted_checkpoint_is_reported_and_the_previous_one_used(tmp_path):
    train(make_model(), adam, data, mse, steps=6, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    newest = ckpt.list_checkpoints(tmp_path)[-1]
    tensors = newest / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        ckpt.load(newest)
    with pytest.warns(RuntimeWarning, match="skipping unusable checkpoint"):
        result = train(make_model(), adam, data, mse, steps=8, checkpoint_dir=tmp_path, checkpoint_every=2,
                       progress=False)
    assert result.losses and len(result.losses) == 4  # resumed from step 4: steps 5..8 ran
    (ckpt.list_checkpoints(tmp_path)[0] / "state.json").unlink()
    with pytest.raises(CheckpointError, match=r"state\.json is missing"):
        ckpt.load(ckpt.list_checkpoints(tmp_path)[0])


def test_keep_last_n(tmp_path):
    train(make_model(), adam, data, mse, steps=10, checkpoint_dir=tmp_path, checkpoint_every=2, keep_last=2,
          progress=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000008", "step-00000010"]


# ---- outputs -------------------------------------------------------------------------------------------------


def test_metrics_mllog_and_gradient_statistics(tmp_path):
    def eval_fn(model):
        x, y = data(999)
        return {"loss": mse(model, (x, y)).item()}

    train(make_model(), adam, data, mse, steps=6, loss_scaling=2.0**10, eval_fn=eval_fn, eval_every=3,
          log_path=tmp_path / "metrics.jsonl", mllog_path=tmp_path / "mllog.txt", grad_stats_every=2,
          grad_stats_dir=tmp_path / "gs", progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert {"loss", "scale", "skipped", "lr", "samples_per_s"} <= set(records[0]) and "eval" in records[2]
    mllog = (tmp_path / "mllog.txt").read_text()
    assert ":::MLLOG" in mllog and '"run_start"' in mllog and '"run_stop"' in mllog and '"eval_loss"' in mllog
    stats = json.loads((tmp_path / "gs" / "grad_stats.json").read_text())
    assert len(stats["records"]) == 3
    layer = stats["records"][0]["layers"]["0.weight"]
    assert 0 <= layer["below_fp16"] <= layer["below_fp8_e5m2"] <= 1
    assert (tmp_path / "gs" / "grad_stats.png").stat().st_size > 1000


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown precision 'fp12'.*fp16_pure.*mxfp8"):
        train(make_model(), adam, data, mse, steps=1, precision="fp12", progress=False)
    with pytest.raises(ValueError, match="unknown loss scaling 'huge'"):
        train(make_model(), adam, data, mse, steps=1, loss_scaling="huge", progress=False)
    with pytest.raises(ValueError, match="scalar loss"):
        train(make_model(), adam, data, lambda m, b: m(b[0]), steps=1, progress=False)


# ---- distributed ---------------------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent("""
    import json, math, sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_train import make_model, data, mse
    from fewbit.train import train
    out, inject, parallel = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
    model = make_model(0)
    state = {{"step": 0}}
    def loss_fn(m, batch):
        loss = mse(m, batch)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if inject and rank == 1 and state["step"] == 3:
            loss = loss * math.inf  # overflow on rank 1 only
        return loss
    def on_step(step, m):
        state["step"] = step
    sgd = lambda p: torch.optim.SGD(p, lr=0.05)
    result = train(model, sgd, data, loss_fn, steps=8, loss_scaling="dynamic", progress=False, on_step=on_step,
                   parallel=parallel)
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = {{k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}}
    torch.save(state, f"{{out}}.{{rank}}.pt")
    json.dump({{"skipped": result.skipped_steps}}, open(f"{{out}}.{{rank}}.json", "w"))
""")


def run_torchrun(tmp_path: Path, nproc: int, inject: bool, name: str, parallel: str = "ddp") -> None:
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           str(tmp_path / name), "1" if inject else "0", parallel]
    started = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:] + f" after {time.time() - started:.0f}s"


def test_ddp_two_processes_match_one_and_share_overflow_decisions(tmp_path):
    run_torchrun(tmp_path, 1, False, "single")
    run_torchrun(tmp_path, 2, False, "double")
    single = torch.load(tmp_path / "single.0.pt")
    for rank in (0, 1):
        double = torch.load(tmp_path / f"double.{rank}.pt")
        for k in single:  # same global batch; only the reduction order differs
            torch.testing.assert_close(double[k], single[k], rtol=1e-4, atol=1e-5)
    run_torchrun(tmp_path, 2, True, "inject")
    skipped = [json.loads((tmp_path / f"inject.{r}.json").read_text())["skipped"] for r in (0, 1)]
    assert skipped == [1, 1]  # rank 1's overflow skipped the step on both ranks
    a, b = torch.load(tmp_path / "inject.0.pt"), torch.load(tmp_path / "inject.1.pt")
    for k in a:
        assert torch.equal(a[k], b[k])


def test_fsdp_two_processes_match_one(tmp_path):
    run_torchrun(tmp_path, 1, False, "single")
    run_torchrun(tmp_path, 2, False, "fsdp", parallel="fsdp")
    single = torch.load(tmp_path / "single.0.pt")
    for rank in (0, 1):
        sharded = torch.load(tmp_path / f"fsdp.{rank}.pt")
        for k in single:
            torch.testing.assert_close(sharded[k], single[k], rtol=1e-4, atol=1e-5)
