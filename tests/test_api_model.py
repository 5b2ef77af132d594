"""The Python API for any model: ``fewbit.study(model, evaluate=fn, recipes=[...])``, ``fewbit.ptq(model,
evaluate=fn, calibration=...)`` and ``post_training.model_ptq``: the records the CLI prints, for a model and a
metric fewbit has never seen."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fewbit
from fewbit import post_training, study
from fewbit.report import ptq as ptq_render
from fewbit.report import study as study_render


class Scorer(nn.Module):
    """A model fewbit has no workload for: two inputs, a gated sum."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(12, 48), nn.Linear(12, 48), nn.Linear(48, 5)

    def forward(self, x, y):
        return self.out(torch.relu(self.a(x)) * torch.sigmoid(self.b(y)))


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = Scorer().eval()
    x, y = torch.randn(256, 12), torch.randn(256, 12)
    with torch.no_grad():
        labels = model(x, y).argmax(1)

    def agreement(m) -> float:  # % of examples whose class survives
        return 100.0 * float((m(x, y).argmax(1) == labels).float().mean())

    return model, x, y, agreement


def test_study_of_any_model_with_any_metric(setup):
    model, _, _, agreement = setup
    before = copy.deepcopy(model.state_dict())
    record = fewbit.study(model, evaluate=agreement, recipes=["int8", "mxfp4", "w4a16"])
    assert fewbit.study is study  # the verb's module, callable; `study.run` is the workload verb
    rows = {r["recipe"]: r for r in record["results"]}
    assert list(rows) == ["fp32", "int8", "mxfp4", "w4a16"]  # fp32 added first
    assert rows["fp32"]["metric"] == 100.0 and rows["fp32"]["bits_per_weight"] == 32.0
    for name in ("int8", "mxfp4", "w4a16"):  # each metric is the metric of the model converted by that recipe
        assert rows[name]["metric"] == pytest.approx(agreement(fewbit.quantize_(copy.deepcopy(model), name)))
        assert rows[name]["delta"] == pytest.approx(rows[name]["metric"] - 100.0)
    assert rows["mxfp4"]["bits_per_weight"] < rows["int8"]["bits_per_weight"] < 32  # K = 12 pads its MX blocks
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is left untouched
    assert type(model.a) is nn.Linear
    assert record["workload"] == "Scorer" and record["metric"] == "metric"
    assert "int8" in study_render.markdown(record)  # the CLI's renderers take it as they take results.json


def test_study_with_a_dict_of_metrics_needs_the_headline(setup):
    model, _, _, agreement = setup
    record = fewbit.study(model, evaluate=lambda m: {"agreement": agreement(m), "loss": 0.5}, recipes=["bf16"],
                          metric="agreement", secondary="loss")
    bf16 = agreement(fewbit.quantize_(copy.deepcopy(model), "bf16"))
    assert record["results"][1]["metrics"] == {"agreement": pytest.approx(bf16), "loss": 0.5}
    with pytest.raises(ValueError, match=r"name the headline one with metric=\.\.\."):
        fewbit.study(model, evaluate=lambda m: {"agreement": 1.0}, recipes=["bf16"])
    with pytest.raises(ValueError, match="evaluate returned nan for the fp32 model"):
        fewbit.study(model, evaluate=lambda m: math.nan, recipes=["bf16"])
    with pytest.raises(ValueError, match="unknown recipe 'fp7'"):
        fewbit.study(model, evaluate=agreement, recipes=["fp7"])


def test_ptq_keywords(setup):
    model, x, y, agreement = setup
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    _, report = fewbit.ptq(copy.deepcopy(model), "int8", calibration=batches, evaluate=agreement)
    assert report.float_metric == 100.0 and report.layer_amax and report.within_tolerance == (
        report.final_metric >= 99.0)
    with pytest.raises(TypeError, match=r"ptq needs calibration= .* and evaluate="):
        fewbit.ptq(copy.deepcopy(model), "int8", calibration=batches)


def test_model_ptq_gives_the_cli_record(setup):
    model, x, y, agreement = setup
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    quantized, record = post_training.model_ptq(copy.deepcopy(model), agreement, batches, "fp8_current",
                                                test=agreement, metric="agreement", methods=["max", "mse"])
    assert record["recipe"] == "fp8_current" and set(record["calibrator_metrics"]) == {"max", "mse"}
    assert record["test"]["float"] == {"agreement": 100.0}
    assert record["test"]["quantized"]["agreement"] == pytest.approx(agreement(quantized))
    assert set(record["layer_amax"]) | set(record["float_layers"]) == {"a", "b", "out"}
    assert record["tolerance_rule"].startswith("agreement >= fp32 agreement - 0.01")
    # the renderers of `fewbit ptq` take it as they take ptq.json
    assert ptq_render.summary_table(record).row_count == 2
    assert "## Calibrators" in ptq_render.markdown(record)
