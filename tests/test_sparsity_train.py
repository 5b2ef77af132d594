"""Masks fixed during training (KeepMasks): AdamW with weight decay never revives a pruned weight, under every
precision, through checkpoint/resume and under DDP."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from fewbit import sparsity
from fewbit.train import train
from fewbit.train.callbacks import Callback

ROOT = Path(__file__).resolve().parent.parent
X = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
Y = torch.randn(256, 4, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    monkeypatch.setenv("FEWBIT_COMPILE", "0")


def data(step, micro):
    i = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(step))
    return X[i], Y[i]


def mse(model, batch):
    return nn.functional.mse_loss(model(batch[0]).float(), batch[1])


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)


def pruned_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return sparsity.sparsify_(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)))


def assert_pruned_zero(model: nn.Module, tensors=None) -> None:
    for name, mask in sparsity.masks(model).items():
        w = model.get_submodule(name).weight if tensors is None else tensors[name]
        assert not w.detach()[~mask.to(w.device)].any(), f"{name}: a pruned weight came back"
        assert w.detach()[mask.to(w.device)].ne(0).all()


def test_adamw_with_weight_decay_never_revives_a_pruned_weight():
    model = pruned_net()
    start = {n: model.get_submodule(n).weight.detach().clone() for n in sparsity.masks(model)}
    train(model, adamw, data, mse, steps=150, progress=False, callbacks=[sparsity.KeepMasks()])
    assert_pruned_zero(model)
    for name, before in start.items():  # the kept weights did train
        assert not torch.equal(model.get_submodule(name).weight.detach(), before)
    # Without the callback the same run revives them: the test would catch a KeepMasks that did nothing.
    unmasked = pruned_net()
    train(unmasked, adamw, data, mse, steps=5, progress=False)
    assert unmasked[0].weight.detach()[~sparsity.masks(unmasked)["0"]].ne(0).any()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "bf16_mixed", "fp16_mixed", "fp16_pure", "fp8",
                                       "mxfp8", "mxfp4", "int8"])
def test_masks_hold_under_every_precision(precision):
    model = pruned_net()
    seen = {}

    class Master(Callback):
        def on_step_end(self, state, record):
            if state.master is not None:
                index = {id(p): i for i, p in enumerate(state.master.model_params)}
                seen.update({n: state.master.params[index[id(model.get_submodule(n).weight)]]
                             for n in sparsity.masks(model)})

    train(model, adamw, data, mse, steps=12, precision=precision, progress=False,
          callbacks=[sparsity.KeepMasks(), Master()])
    assert_pruned_zero(model)
    if precision == "fp16_pure":
        assert seen and seen["0"].dtype == torch.float32
        assert_pruned_zero(model, seen)  # the float32 master copy keeps the zeros too
    assert all(r.nm for r in sparsity.summary(model).rows if r.pruned)


def test_checkpoint_resume_brings_the_masks_back(tmp_path):
    reference = pruned_net()
    masks = sparsity.masks(reference)
    train(reference, adamw, data, mse, steps=8, progress=False, callbacks=[sparsity.KeepMasks()])
    first = pruned_net()
    train(first, adamw, data, mse, steps=4, progress=False, checkpoint_dir=tmp_path, checkpoint_every=2,
          callbacks=[sparsity.KeepMasks(tmp_path)])
    assert (tmp_path / sparsity.MASKS_FILE).is_file()
    torch.manual_seed(0)  # a fresh process: the dense model, no masks; they come back from the run's folder
    resumed = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    train(resumed, adamw, data, mse, steps=8, progress=False, checkpoint_dir=tmp_path, checkpoint_every=2,
          callbacks=[sparsity.KeepMasks(tmp_path)])
    for name, mask in masks.items():
        assert torch.equal(sparsity.masks(resumed)[name], mask)
    for k, v in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    wrong = sparsity.sparsify_(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), "1:4")
    with pytest.raises(ValueError, match="differ from the model's at layer '0'"):
        train(wrong, adamw, data, mse, steps=8, progress=False, checkpoint_dir=tmp_path,
              callbacks=[sparsity.KeepMasks(tmp_path)])
    with pytest.raises(ValueError, match=r"has no masks; call fewbit\.sparsify_"):
        train(nn.Linear(16, 4), adamw, data, mse, steps=1, progress=False, callbacks=[sparsity.KeepMasks()])


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_sparsity_train import pruned_net, data, mse, adamw
    from fewbit import sparsity
    from fewbit.train import train
    import torch.distributed as dist
    model = pruned_net()
    train(model, adamw, data, mse, steps=6, progress=False, callbacks=[sparsity.KeepMasks()])
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save({{"state": model.state_dict(), "masks": sparsity.masks(model)}}, f"{{sys.argv[1]}}.{{rank}}.pt")
""")


def test_ddp_two_processes_keep_the_masks_and_match_one(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "FEWBIT_COMPILE": "0"}
    for nproc, name in ((1, "single"), (2, "double")):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={nproc}", str(script), str(tmp_path / name)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    single = torch.load(tmp_path / "single.0.pt")
    for rank in (0, 1):
        double = torch.load(tmp_path / f"double.{rank}.pt")
        for name, mask in single["masks"].items():
            w = double["state"][f"{name}.weight"]
            assert torch.equal(double["masks"][name], mask) and not w[~mask].any()
        for k, v in single["state"].items():  # same global batch; only the reduction order differs
            torch.testing.assert_close(double["state"][k], v, rtol=1e-4, atol=1e-5)
