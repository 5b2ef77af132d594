"""Quantized layers and model conversion: bit-exact against hand-written references, conversion bookkeeping,
state_dict / deepcopy / torch.compile, the eval-mode weight cache, Hugging Face GPT-2, recipes as data."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fewbit
from fewbit import recipes
from fewbit.cli import main
from fewbit.nn.functional import along
from fewbit.nn.modules import QConv1d, QConv2d, QLinear, QMatmul
from fewbit.recipes import Recipe
from fewbit.report.layers import model_summary_text
from fewbit.scaling import AmaxHistory, PerTensor

PRESETS = recipes.names()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def ref_q(x: torch.Tensor, spec, axis: int, recipe: Recipe) -> torch.Tensor:
    """The reference operand quantizer: fake_quantize along ``axis`` (a fresh history for delayed specs, whose
    first step uses the current amax), or a cast to the compute format."""
    if spec is None:
        return fewbit.cast(x, recipe.compute_format) if recipe.compute_format else x
    history = AmaxHistory() if isinstance(spec.scaling, PerTensor) and spec.scaling.delayed else None
    return fewbit.fake_quantize(x, along(spec, axis), history=history)


def seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- fp32 is the identity -----------------------------------------------------------------------------------


def test_fp32_recipe_is_bit_identical():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))
    x = torch.randn(4, 3, 6, 6)
    converted = fewbit.quantize_(copy.deepcopy(model), "fp32")
    assert isinstance(converted[0], QConv2d) and isinstance(converted[3], QLinear)
    for m in (model, converted):
        m(x).square().sum().backward()
    assert torch.equal(bits(model(x)), bits(converted(x)))
    for p, q in zip(model.parameters(), converted.parameters(), strict=True):
        assert torch.equal(bits(p.grad), bits(q.grad))


# ---- every preset against the hand-written reference ---------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_qlinear_forward_and_backward_gemms_match_reference(name):
    recipe = recipes.get(name)
    x = seeded(6, 10, 50, seed=1).requires_grad_()  # K = 50: not a multiple of 32, blocks are padded
    layer = QLinear(50, 40, recipe=recipe)
    with torch.no_grad():
        layer.weight.copy_(seeded(40, 50, seed=2) * 0.2)
        layer.bias.copy_(seeded(40, seed=3))
    y = layer(x)
    dy = seeded(6, 10, 40, seed=4)
    y.backward(dy)

    x2, w, dy2 = x.detach().reshape(-1, 50), layer.weight.detach(), dy.reshape(-1, 40)
    y_ref = F.linear(ref_q(x2, recipe.input, -1, recipe), ref_q(w, recipe.weight, 1, recipe), layer.bias.detach())
    dx_ref = ref_q(dy2, recipe.grad_output, -1, recipe) @ ref_q(w, recipe.weight_backward, 0, recipe)
    dw_ref = ref_q(dy2, recipe.grad_output, 0, recipe).t() @ ref_q(x2, recipe.input_backward, 0, recipe)
    assert torch.equal(bits(y.reshape(-1, 40)), bits(y_ref))
    assert torch.equal(bits(x.grad.reshape(-1, 50)), bits(dx_ref))
    assert torch.equal(bits(layer.weight.grad), bits(dw_ref))
    assert torch.equal(bits(layer.bias.grad), bits(dy2.sum(0)))


@pytest.mark.parametrize("name", PRESETS)
def test_qmatmul_matches_reference(name):
    recipe = recipes.get(name)
    a = seeded(2, 3, 16, 40, seed=5).requires_grad_()
    b = seeded(2, 3, 40, 24, seed=6).requires_grad_()
    y = QMatmul(recipe)(a, b)
    dy = seeded(2, 3, 16, 24, seed=7)
    y.backward(dy)
    a_, b_ = a.detach(), b.detach()
    i, g = recipe.input, recipe.grad_output
    assert torch.equal(bits(y), bits(ref_q(a_, i, -1, recipe) @ ref_q(b_, i, -2, recipe)))
    ib = recipe.input_backward
    da = ref_q(dy, g, -1, recipe) @ ref_q(b_, ib, -1, recipe).transpose(-1, -2)
    db = ref_q(a_, ib, -2, recipe).transpose(-1, -2) @ ref_q(dy, g, -2, recipe)
    assert torch.equal(bits(a.grad), bits(da)) and torch.equal(bits(b.grad), bits(db))


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("name", PRESETS)
def test_qconv_matches_reference(name, dims):
    recipe = recipes.get(name)
    conv_cls, q_cls = (nn.Conv1d, QConv1d) if dims == 1 else (nn.Conv2d, QConv2d)
    conv = conv_cls(6, 10, 3, stride=1, padding=1)
    kernel = (3,) * dims
    with torch.no_grad():
        conv.weight.copy_(seeded(10, 6, *kernel, seed=8) * 0.3)
    q = q_cls.from_float(copy.deepcopy(conv), recipe)
    x = seeded(2, 6, *(7,) * dims, seed=9).requires_grad_()
    y = q(x)
    dy = seeded(*y.shape, seed=10)
    y.backward(dy)
    w = q.weight.detach()
    conv_fn = F.conv1d if dims == 1 else F.conv2d
    grad_input = torch.nn.grad.conv1d_input if dims == 1 else torch.nn.grad.conv2d_input
    grad_weight = torch.nn.grad.conv1d_weight if dims == 1 else torch.nn.grad.conv2d_weight
    wq = ref_q(w.reshape(10, -1), recipe.weight, 1, recipe).reshape(w.shape)
    y_ref = conv_fn(ref_q(x.detach(), recipe.input, 1, recipe), wq, q.bias.detach(), 1, 1)
    assert torch.equal(bits(y), bits(y_ref))
    g = recipe.grad_output
    dx = grad_input(x.shape, ref_q(w, recipe.weight_backward, 0, recipe), ref_q(dy, g, 1, recipe), 1, 1)
    dw = grad_weight(ref_q(x.detach(), recipe.input_backward, 0, recipe), w.shape, ref_q(dy, g, 0, recipe), 1, 1)
    assert torch.equal(bits(x.grad), bits(dx)) and torch.equal(bits(q.weight.grad), bits(dw))


def test_delayed_scaling_state_advances_per_step():
    layer = QLinear(32, 16, recipe="fp8")
    for step in range(3):
        layer(seeded(4, 32, seed=step) * (10 if step == 0 else 1)).sum().backward()
    histories = layer._state.histories
    assert set(histories) == {"weight", "input", "input_b", "grad_output"}
    assert histories["input"].steps == histories["weight"].steps == histories["grad_output"].steps == 3
    # Step 3 scaled its input with the max over the history (step 0's large amax), not its own.
    assert histories["input"].amax(torch.tensor(0.0)).item() > 5


# ---- conversion ----------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 32)
        self.first = nn.Linear(32, 64)
        self.blocks = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
        self.attn = QMatmul()
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10)

    def forward(self, ids):
        h = self.first(self.embed(ids))
        h = self.blocks(h)
        h = h + self.attn(h.softmax(-1), h.transpose(-1, -2) @ h / 64)
        return self.head(self.norm(h))


def test_quantize_with_layer_overrides_and_summary(capsys):
    torch.manual_seed(0)
    model = Tiny()
    fewbit.quantize_(model, "mxfp8", layer_recipes={"head": "bf16", "first": None})
    assert isinstance(model.blocks[0], QLinear) and model.blocks[0].recipe.name == "mxfp8"
    assert model.head.recipe.name == "bf16" and type(model.first) is nn.Linear
    assert model.attn.recipe.name == "mxfp8"
    totals = fewbit.summary(model)
    assert capsys.readouterr().out == ""  # a record; rendering is fewbit.report's
    out = model_summary_text(totals)
    assert "first: kept in float by layer_recipes" in out and "embed: Embedding has no quantized version" in out
    assert "norm: LayerNorm has no quantized version" in out
    assert totals["layers"] == 4 and totals["quantized_bytes"] < totals["float_bytes"]
    fewbit.dequantize_(model)
    assert type(model.blocks[0]) is nn.Linear and type(model.head) is nn.Linear


@pytest.mark.parametrize(("recipe", "bits"), [("fp32", None), ("mxfp8", 8.25), ("mxfp4", 4.25), ("fp8", 8.0),
                                               ("bf16", 16.0), ("w4a16", 4.25)])
def test_weight_bytes_counts_packed_weights_and_the_rest_in_float(recipe, bits):
    model = nn.Sequential(nn.Embedding(10, 256), nn.Linear(256, 512), nn.LayerNorm(512), nn.Linear(512, 256))
    floats = sum(p.numel() * 4 for p in model.parameters())
    linear_weights = 256 * 512 * 2
    if recipe != "fp32":
        fewbit.quantize_(model, recipe)  # fp8 (delayed scaling) is sized without a history
    sizes = fewbit.nn.weight_bytes(model)
    if bits is None:
        assert sizes == {"total": floats, "quantized": 0, "quantized_weights": 0, "bits_per_weight": None}
        return
    assert sizes["quantized_weights"] == linear_weights
    assert sizes["bits_per_weight"] == pytest.approx(bits, abs=0.001)
    assert sizes["total"] == floats - 4 * linear_weights + sizes["quantized"]


def test_filter_fn_and_no_convertible_layer_warning():
    model = Tiny()
    fewbit.quantize_(model, "int8", filter_fn=lambda m, name: name.startswith("blocks"))
    assert isinstance(model.blocks[2], QLinear) and type(model.head) is nn.Linear
    assert model.__dict__["_fewbit_skipped"]["head"] == "excluded by filter_fn"
    with pytest.warns(UserWarning, match="no convertible layer"):
        fewbit.quantize_(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), "mxfp8")


def test_dequantize_restores_the_float_model_exactly():
    torch.manual_seed(1)
    model = Tiny()
    ids = torch.randint(0, 10, (2, 5))
    ref = model(ids)
    fewbit.quantize_(model, "mxfp4")
    assert not torch.equal(model(ids), ref)
    fewbit.dequantize_(model)
    assert torch.equal(model(ids), ref)


def test_state_dict_and_deepcopy():
    torch.manual_seed(2)
    model = Tiny()
    keys = set(model.state_dict())
    fewbit.quantize_(model, "mxfp6")
    assert set(model.state_dict()) == keys
    other = fewbit.quantize_(Tiny(), "mxfp6")
    other.load_state_dict(model.state_dict())
    ids = torch.randint(0, 10, (3, 4))
    assert torch.equal(model(ids), other(ids))
    twin = copy.deepcopy(model)
    assert torch.equal(twin(ids), model(ids)) and twin.blocks[0].weight is not model.blocks[0].weight


def test_torch_compile_of_a_converted_model():
    torch.manual_seed(3)
    model = fewbit.quantize_(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)), "mxfp8")
    x = torch.randn(16, 64)
    eager = model(x)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), eager, rtol=0, atol=1e-5)


def test_eval_cache_invalidates_when_weights_change(monkeypatch):
    layer = QLinear(64, 32, recipe="mxfp4").eval()
    calls = []
    original = layer.quantized_weight
    monkeypatch.setattr(layer, "quantized_weight", lambda w: calls.append(1) or original(w))
    x = torch.randn(8, 64)
    with torch.no_grad():
        first = layer(x)
        again = layer(x)
        assert len(calls) == 1 and torch.equal(first, again)
        layer.weight.mul_(2)  # in place: the version counter moves
        changed = layer(x)
        assert len(calls) == 2
    layer.train()
    assert torch.equal(changed, layer(x).detach())  # the cached result is what training mode computes
    layer.eval()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.train()
    layer(x).sum().backward()
    optimizer.step()
    layer.eval()
    with torch.no_grad():
        after_step = layer(x)
    layer.train()
    assert torch.equal(after_step, layer(x).detach())


def test_stochastic_rounding_recipe_reproducible_with_seed():
    spec = fewbit.get_spec("mxfp4_e2m1", rounding="stochastic")
    recipe = Recipe(name="sr", weight=spec, input=spec, grad_output=spec)
    x = torch.randn(8, 64)
    outs = []
    for _ in range(2):
        torch.manual_seed(11)
        layer = QLinear(64, 32, recipe=recipe)
        outs.append(layer(x))
    assert torch.equal(outs[0], outs[1])


# ---- Hugging Face transformers -------------------------------------------------------------------------------


def test_gpt2_conv1d_layers_convert():
    transformers = pytest.importorskip("transformers")
    from fewbit.nn.hf import QHFConv1D

    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=101, n_positions=32)
    torch.manual_seed(4)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    keys = {k: v.shape for k, v in model.state_dict().items()}
    fp32 = fewbit.quantize_(copy.deepcopy(model), "fp32")
    with torch.no_grad():
        assert torch.equal(fp32(ids).logits, ref)
    fewbit.quantize_(model, "mxfp8")
    assert isinstance(model.transformer.h[0].attn.c_attn, QHFConv1D)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    model.train()
    model(ids, labels=ids).loss.backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None
    fewbit.dequantize_(model)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


# ---- recipes as data -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_recipe_round_trips(name):
    recipe = recipes.get(name)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


def test_recipe_validation():
    with pytest.raises(ValueError, match=r"role 'weight'.*unknown quantization spec 'mxfp7'"):
        Recipe(name="bad", weight="mxfp7")
    with pytest.raises(ValueError, match=r"unknown recipe key\(s\) \['bias'\]"):
        Recipe.from_dict({"name": "x", "bias": "mxfp8_e4m3"})
    with pytest.raises(ValueError, match="compute_format 'fp8'"):
        Recipe(compute_format="fp8")
    with pytest.raises(ValueError, match="version 2"):
        Recipe(version=2)
    with pytest.raises(ValueError, match=r"unknown recipe 'fp7'.*mxfp8"):
        recipes.get("fp7")
    spec = fewbit.get_spec("mxfp8_e4m3").to_dict()
    spec["format"] = "fp9"
    with pytest.raises(ValueError, match="unknown format 'fp9'"):
        Recipe.from_dict({"weight": spec})


def test_recipes_cli(capsys):
    assert main(["recipes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == recipes.names(include_training=True)  # the training-only presets too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["recipes"]) == 0
    assert "mxfp6_e2m3" in capsys.readouterr().out
