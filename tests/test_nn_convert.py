"""The quantized-module protocol and conversion bookkeeping: the registry of float layer types, replace_module,
set_recipe, skipped layers, and the summary record."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import fewbit
from fewbit.nn import (
    LayerRow,
    ModelSummary,
    QLinear,
    QuantizedModule,
    conversion_for,
    mark_skipped,
    quantized_layers,
    register_conversion,
    replace_module,
    skipped_layers,
)


class Scaled(nn.Module):
    """A float layer fewbit does not know: y = s * x W^T."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n))
        self.s = 2.0

    def forward(self, x):
        return self.s * x @ self.weight.t()


class QScaled(QuantizedModule, nn.Module):
    def __init__(self, float_module: Scaled, recipe) -> None:
        super().__init__()
        self.weight, self.s = float_module.weight, float_module.s
        self.set_recipe(recipe)

    @classmethod
    def from_float(cls, module: Scaled, recipe) -> QScaled:
        return cls(module, recipe)

    def to_float(self) -> Scaled:
        module = Scaled.__new__(Scaled)
        nn.Module.__init__(module)
        module.weight, module.s = self.weight, self.s
        return module

    def forward(self, x):
        return self.s * x @ self.weight.t()


class MyLinear(nn.Linear):
    """A subclass of nn.Linear: its forward may differ, so it is not converted as a Linear."""


@pytest.fixture
def scaled_registered():
    register_conversion(Scaled, QScaled.from_float)
    yield
    from fewbit.nn import convert

    del convert._CONVERSIONS[Scaled]


def test_a_registered_layer_type_converts_and_back(scaled_registered):
    model = nn.Sequential(nn.Linear(4, 4), Scaled(4))
    weight = model[1].weight
    fewbit.quantize_(model, "mxfp8")
    assert type(model[1]) is QScaled and model[1].weight is weight and model[1].recipe.name == "mxfp8"
    assert [name for name, _ in quantized_layers(model)] == ["0", "1"]
    assert skipped_layers(model) == {}
    fewbit.dequantize_(model)
    assert type(model[1]) is Scaled and model[1].weight is weight


def test_register_conversion_as_a_decorator_and_its_errors():
    class Other(nn.Module):
        pass

    @register_conversion(Other)
    def convert(module, recipe):
        return module

    try:
        assert conversion_for(Other) is convert
        assert conversion_for(MyLinear) is None  # exact types: a subclass is not covered by its base's entry
    finally:
        from fewbit.nn import convert as convert_module

        del convert_module._CONVERSIONS[Other]
    with pytest.raises(TypeError, match=r"float_type=.*int.*subclass of torch\.nn\.Module"):
        register_conversion(int, convert)
    with pytest.raises(TypeError, match=r"register_conversion\(Scaled\): convert_fn=3 is not callable"):
        register_conversion(Scaled, 3)


def test_unregistered_types_and_subclasses_are_listed_as_skipped():
    model = nn.Sequential(MyLinear(4, 4), Scaled(4), nn.Linear(4, 4))
    fewbit.quantize_(model, "int8")
    assert type(model[0]) is MyLinear and type(model[1]) is Scaled and type(model[2]) is QLinear
    assert skipped_layers(model) == {"0": "MyLinear has no quantized version (kept in float)",
                                     "1": "Scaled has no quantized version (kept in float)"}
    assert fewbit.summary(model).skipped == skipped_layers(model)


def test_nothing_convertible_warns_with_the_skipped_layers():
    with pytest.warns(UserWarning, match=r"no convertible layer.*Not converted \(1\): 0: Scaled has no quantized"):
        fewbit.quantize_(nn.Sequential(Scaled(3), nn.ReLU()), "mxfp8")


def test_skipped_layers_is_a_copy_and_mark_skipped_records():
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    assert skipped_layers(model) == {}
    fewbit.quantize_(model, "int8")
    skipped_layers(model).clear()
    assert skipped_layers(model) == {"1": "LayerNorm has no quantized version (kept in float)"}
    mark_skipped(model, "0", "left in float by hand")
    assert skipped_layers(model)["0"] == "left in float by hand"
    assert skipped_layers(copy.deepcopy(model)) == skipped_layers(model)
    fewbit.dequantize_(model)
    assert skipped_layers(model) == {}


def test_importing_fewbit_does_not_import_transformers():
    code = ("import sys, fewbit, torch; fewbit.quantize_(torch.nn.Sequential(torch.nn.Linear(2, 2)), 'int8'); "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- replace_module -------------------------------------------------------------------------------------------


def _nested():
    return nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.ModuleDict({"fc": nn.Linear(2, 3)})))


def test_replace_module_nested_and_top_level():
    model = _nested()
    old = model[1][1]["fc"]
    new = nn.Linear(2, 3)
    assert replace_module(model, "1.1.fc", new) is old
    assert model.get_submodule("1.1.fc") is new
    first = nn.Identity()
    replace_module(model, "0", first)
    assert model[0] is first
    assert [name for name, _ in model.named_modules()] == ["", "0", "1", "1.0", "1.1", "1.1.fc"]


@pytest.mark.parametrize("name", ["2", "1.1.head", "1.0.x", "nope.fc"])
def test_replace_module_names_a_missing_submodule(name):
    with pytest.raises(AttributeError, match=rf"Sequential has no submodule '{name}'"):
        replace_module(_nested(), name, nn.Identity())


def test_replace_module_rejects_the_root_and_non_modules():
    with pytest.raises(ValueError, match="name='' is the model itself"):
        replace_module(_nested(), "", nn.Identity())
    with pytest.raises(TypeError, match=r"new=int; expected a torch\.nn\.Module"):
        replace_module(_nested(), "0", 3)


# ---- set_recipe -----------------------------------------------------------------------------------------------


def test_set_recipe_resets_the_weight_cache_and_the_state():
    torch.manual_seed(0)
    layer = QLinear(64, 32, recipe="mxfp4").eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        mxfp4 = layer(x)
        assert layer._weight_cache is not None
        layer.set_recipe("mxfp8")
        assert layer._weight_cache is None and layer.recipe.name == "mxfp8"
        mxfp8 = layer(x)
    assert not torch.equal(mxfp4, mxfp8)
    with torch.no_grad():
        assert torch.equal(mxfp8, QLinear.from_float(layer.to_float(), "mxfp8").eval()(x))

    fp8 = QLinear(8, 8, recipe="fp8")  # delayed scaling: an amax history per role
    fp8(torch.randn(2, 8)).sum().backward()
    state = fp8._state
    fp8.set_recipe("fp8")
    assert fp8._state is not state


def test_set_recipe_takes_names_and_recipes():
    layer = QLinear(4, 4)
    layer.set_recipe(fewbit.recipes.get("int8"))
    assert layer.recipe.name == "int8"
    with pytest.raises(ValueError, match="unknown recipe 'fp7'"):
        layer.set_recipe("fp7")


def test_qactivation_set_recipe_reads_fp32_for_non_integer_recipes():
    act = fewbit.nn.QActivation()
    act.set_recipe("mxfp8")
    assert act.recipe.name == "fp32"
    act.set_recipe("int8")
    assert act.recipe.name == "int8"


# ---- the summary record ---------------------------------------------------------------------------------------


def test_summary_record_rows_skipped_and_totals(capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 32), nn.Conv1d(32, 16, 3), nn.Linear(16, 8))
    fewbit.quantize_(model, "mxfp8", layer_recipes={"3": "bf16"})
    record = fewbit.summary(model)
    assert capsys.readouterr().out == ""
    assert isinstance(record, ModelSummary) and record.model == "Sequential"
    linear, conv, bf16 = record.rows
    # 64 * 32 elements: one byte each plus one E8M0 scale per 32: 2048 + 64 bytes.
    assert linear == LayerRow(name="1", type="QLinear", recipe="mxfp8", weight="mxfp8_e4m3", input="mxfp8_e4m3",
                              grad_output="mxfp8_e5m2", float_bytes=64 * 32 * 4, quantized_bytes=2048 + 64,
                              weights=64 * 32)
    # conv weight (16, 32, 3) as a (16, 96) matrix: 1536 codes and 16 * 3 scales.
    assert conv.type == "QConv1d" and conv.float_bytes == 16 * 96 * 4 and conv.quantized_bytes == 1536 + 48
    assert bf16.recipe == "bf16" and bf16.weight == "-" and bf16.quantized_bytes == 16 * 8 * 2
    assert record.skipped == {"0": "Embedding has no quantized version (kept in float)"}
    assert record.float_bytes == sum(r.float_bytes for r in record.rows)
    assert record.totals == {"float_bytes": record.float_bytes, "quantized_bytes": 2112 + 1584 + 256,
                             "layers": 3, "weights": 2048 + 1536 + 128, "skipped": record.skipped}
    assert record["layers"] == 3 and record["skipped"] == record.skipped  # the old dict's keys
    with pytest.raises(KeyError, match="no total 'rows'"):
        record["rows"]


def test_summary_of_a_float_model_is_empty():
    record = fewbit.summary(nn.Linear(2, 2))
    assert record.rows == () and record.skipped == {} and record["quantized_bytes"] == 0
