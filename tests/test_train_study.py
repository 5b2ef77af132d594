"""``fewbit study --train``: recipes trained from scratch on a tiny workload, and the gradient-underflow shares."""

from __future__ import annotations

import json

import pytest
import torch

from fewbit import cli, train_study
from fewbit.train.gradstats import GradientStatistics

TINY_LM = ["layers=1", "d_model=32", "heads=2", "d_ff=64", "block_size=32", "batch_size=8", "warmup=2",
           "eval_limit=512", "steps=4"]


def test_noscale_variants_and_unknown_recipes():
    assert train_study.recipe("fp16_noscale").loss_scaling == "none"
    assert train_study.recipe("fp16_noscale").compute_format == "fp16"
    assert train_study.recipe("fp16").loss_scaling == "dynamic"
    with pytest.raises(ValueError, match="unknown recipe"):
        train_study.recipe("fp17_noscale")


@pytest.mark.parametrize("threshold", [2.0 ** -24, 2.0 ** -40, 2.0 ** -8])
def test_underflow_share_counts_what_falls_below(threshold):
    net = torch.nn.Linear(64, 64)
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(64, 64, generator=g) * 2.0 ** torch.randint(-50, 0, (64, 64), generator=g).float()
    grad[0, :8] = 0.0
    net.weight.grad = grad
    net.bias.grad = torch.zeros(64)
    stats = GradientStatistics(net)
    stats.record(0)
    layer = stats.records[0]["layers"]["weight"]
    expected = float((grad.abs() < threshold).float().mean())
    assert train_study.underflow_share(layer["histogram"], layer["zeros"], layer["count"], threshold) == \
        pytest.approx(expected, abs=1e-9)


def test_study_train_on_a_tiny_lm(capsys, tmp_path):
    code = cli.main(["study", "lm", "--train", "--recipes", "fp32,fp16_noscale", "--split", "valid", "--json",
                     "--quiet", "--out", str(tmp_path), *TINY_LM])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(captured.out)
    rows = {r["recipe"]: r for r in record["results"]}
    assert list(rows) == ["fp32", "fp16_noscale"]
    assert rows["fp32"]["delta"] == 0.0 and rows["fp32"]["steps"] == 4 and len(rows["fp32"]["losses"]) == 4
    assert rows["fp16_noscale"]["final_scale"] is None and rows["fp16_noscale"]["status"] == "ok"
    assert [e["step"] for e in rows["fp32"]["evals"]] == [1, 2, 3, 4]  # every steps // 10 = 0 -> 1
    # same seed, same data order: the first loss is the same in both (the first step's weights are the same)
    assert rows["fp16_noscale"]["losses"][0] == pytest.approx(rows["fp32"]["losses"][0], rel=1e-2)
    gradients = record["gradients"]
    assert gradients["layers"] and all(0.0 <= layer["below_fp16"] <= 1.0 for layer in gradients["layers"])
    for name in ("results.json", "report.md", "curves.png", "grad_underflow.png"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "fp16_noscale" in captured.err  # the table, on stderr under --json
