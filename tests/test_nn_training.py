"""Training from scratch under low-precision recipes reaches the fp32 loss.

Two small models are trained from the same initial weights on the same batches, once in fp32 (the baseline) and
once per recipe with ``fewbit.quantize_`` (forward operands and backward gradients quantized):

- an MLP (32 -> 128 -> 128 -> 10) on classification with labels sampled from a random teacher network;
- a one-layer transformer LM (d_model 64, 4 heads, hand-written causal attention whose QK^T and PV are
  ``QMatmul`` modules) on "noisy reverse": a random prefix, a separator, then the prefix reversed with each
  token replaced by a random one with probability 0.2, so the loss has a known floor (the noise entropy).

Each batch is fresh (its loss is taken before the step that trains on it, so it is a held-out loss). The final
loss is the mean of the last ``LAST`` steps. Everything is seeded; runs are deterministic.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fewbit
from fewbit import QMatmul

LAST = 20  # the final loss: mean over the last LAST steps

# Relative tolerances: quantized final loss <= fp32 final loss * (1 + tolerance), chosen from measurement with
# margin. Measured (torch 2.13 CPU, one thread) final losses and gaps to fp32:
#   MLP: fp32 0.6583; mxfp8 0.6665 (+1.2%), mxfp6 0.6657 (+1.1%), fp8 0.6603 (+0.3%); mxfp4 0.6686 (+1.6%)
#   LM:  fp32 0.9716; mxfp8 0.9698 (-0.2%), mxfp6 0.9693 (-0.2%), fp8 0.9725 (+0.1%); mxfp4 0.9684 (-0.3%)
#        (noise floor 0.9740: every run solves the task; the last-20-step mean is a sample, so it can dip below)
# mxfp4 is only required to learn, not held to these tolerances.
MLP_REL_TOL = 0.05
LM_REL_TOL = 0.03
# "Learned": final loss below this fraction of the first step's loss (measured: MLP 0.29, LM 0.35).
LEARNED_FRACTION = 0.5

RECIPES = ["mxfp8", "mxfp6", "fp8"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models are tiny: one thread is as fast and is not slowed by other processes sharing the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(model: nn.Module, recipe: str, batches, loss_fn, lr: float) -> list[float]:
    """Train a deep copy of ``model`` (quantized by ``recipe`` unless fp32) with Adam; the loss of every step."""
    model = copy.deepcopy(model)
    if recipe != "fp32":
        layers = sum(isinstance(m, nn.Linear | QMatmul) for m in model.modules())
        fewbit.quantize_(model, recipe)
        quantized = [m for m in model.modules() if isinstance(m, fewbit.QLinear | QMatmul)]
        assert len(quantized) == layers and all(m.recipe.name == recipe for m in quantized)  # QMatmul reached too
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for x, y in batches:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _final(losses: list[float]) -> float:
    return sum(losses[-LAST:]) / LAST


def _check_learned(losses: list[float], what: str) -> float:
    final = _final(losses)
    assert math.isfinite(final), f"{what}: final loss {final}"
    assert final < LEARNED_FRACTION * losses[0], f"{what}: final loss {final:.4f}, first {losses[0]:.4f}"
    return final


# ---------------------------------------------------------------------------------------------------------------
# MLP on a teacher-labelled classification task

MLP_IN, MLP_HIDDEN, MLP_CLASSES = 32, 128, 10
MLP_STEPS, MLP_BATCH, MLP_LR = 150, 256, 1e-2


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(MLP_IN, MLP_HIDDEN), nn.GELU(), nn.Linear(MLP_HIDDEN, MLP_HIDDEN),
                                 nn.GELU(), nn.Linear(MLP_HIDDEN, MLP_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture(scope="module")
def mlp_setup():
    """(initial model, batches): labels sampled from the softmax of a random tanh teacher."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(MLP_STEPS * MLP_BATCH, MLP_IN, generator=g)
    w1 = torch.randn(MLP_IN, 64, generator=g) / math.sqrt(MLP_IN)
    w2 = torch.randn(64, MLP_CLASSES, generator=g) * 2.5
    y = torch.multinomial((torch.tanh(x @ w1) @ w2).softmax(-1), 1, generator=g).squeeze(1)
    batches = list(zip(x.split(MLP_BATCH), y.split(MLP_BATCH), strict=True))
    torch.manual_seed(0)
    return MLP(), batches


@pytest.fixture(scope="module")
def mlp_fp32(mlp_setup) -> list[float]:
    model, batches = mlp_setup
    losses = _train(model, "fp32", batches, F.cross_entropy, MLP_LR)
    _check_learned(losses, "MLP fp32")
    print(f"\nMLP fp32: first {losses[0]:.4f}, final {_final(losses):.4f}")
    return losses


@pytest.mark.parametrize("recipe", RECIPES)
def test_mlp_matches_fp32(recipe, mlp_setup, mlp_fp32):
    model, batches = mlp_setup
    losses = _train(model, recipe, batches, F.cross_entropy, MLP_LR)
    final, baseline = _check_learned(losses, f"MLP {recipe}"), _final(mlp_fp32)
    print(f"\nMLP {recipe}: final {final:.4f}, fp32 {baseline:.4f} ({final / baseline - 1:+.1%})")
    assert final <= baseline * (1 + MLP_REL_TOL), f"MLP {recipe}: {final:.4f} vs fp32 {baseline:.4f}"


@pytest.mark.parametrize("recipe", ["bf16", "mxfp8", "fp8"])
def test_training_loop_under_a_recipe_is_the_hand_written_loop(recipe, mlp_setup):
    """``fewbit.train.train(precision=recipe)`` quantizes the layers as ``quantize_`` does and takes the same steps:
    the losses of the first steps equal this file's plain loop bit for bit."""
    from fewbit.train import train

    model, batches = mlp_setup
    steps = 10
    expected = _train(model, recipe, batches[:steps], F.cross_entropy, MLP_LR)
    result = train(copy.deepcopy(model), lambda p: torch.optim.Adam(p, lr=MLP_LR), lambda step, micro: batches[step],
                   lambda m, b: F.cross_entropy(m(b[0]), b[1]), steps=steps, precision=recipe, progress=False)
    assert result.losses == expected


def test_mlp_mxfp4_learns(mlp_setup, mlp_fp32, record_property):
    """mxfp4 (fp4 weights, fp6 activations, fp8 gradients) is reported, not held to the tolerance. Measured: final
    loss 0.6686 against fp32 0.6583 (+1.6%), from 2.30 at the first step: it learns."""
    model, batches = mlp_setup
    losses = _train(model, "mxfp4", batches, F.cross_entropy, MLP_LR)
    final, baseline = _check_learned(losses, "MLP mxfp4"), _final(mlp_fp32)
    record_property("mlp_mxfp4_final_loss", final)
    print(f"\nMLP mxfp4: final {final:.4f}, fp32 {baseline:.4f} ({final / baseline - 1:+.1%})")


# ---------------------------------------------------------------------------------------------------------------
# Transformer LM on noisy reverse

VOCAB, HALF, NOISE = 16, 8, 0.2  # token 0 is the separator; the prefix and the noise use tokens 1..VOCAB-1
D_MODEL, HEADS = 64, 4
LM_STEPS, LM_BATCH, LM_LR = 150, 16, 3e-3


class Block(nn.Module):
    """Pre-LayerNorm transformer block with causal self-attention written out, QK^T and PV as QMatmul."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.qk, self.pv = QMatmul(), QMatmul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = self.qk(q, k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + self.proj(self.pv(attn, v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, context: int, d: int, heads: int, layers: int = 1) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def _reverse_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = torch.randint(1, VOCAB, (LM_BATCH, HALF), generator=g)
    noise = torch.rand(LM_BATCH, HALF, generator=g) < NOISE
    target = torch.where(noise, torch.randint(1, VOCAB, (LM_BATCH, HALF), generator=g), prefix.flip(1))
    seq = torch.cat([prefix, torch.zeros(LM_BATCH, 1, dtype=torch.long), target], 1)
    return seq[:, :-1], seq[:, 1:]


def _lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the reversed half only (the prefix is random and cannot be predicted)."""
    return F.cross_entropy(logits[:, HALF:].reshape(-1, VOCAB), y[:, HALF:].reshape(-1))


def _noise_floor() -> float:
    """The entropy of a reversed token: right with 1 - NOISE + NOISE/n, each other token NOISE/n (n = VOCAB-1)."""
    n = VOCAB - 1
    right, wrong = 1 - NOISE + NOISE / n, NOISE / n
    return -(right * math.log(right) + (n - 1) * wrong * math.log(wrong))


@pytest.fixture(scope="module")
def lm_setup():
    g = torch.Generator().manual_seed(1)
    batches = [_reverse_batch(g) for _ in range(LM_STEPS)]
    torch.manual_seed(0)
    return TinyLM(VOCAB, 2 * HALF, D_MODEL, HEADS), batches


@pytest.fixture(scope="module")
def lm_fp32(lm_setup) -> list[float]:
    model, batches = lm_setup
    losses = _train(model, "fp32", batches, _lm_loss, LM_LR)
    final = _check_learned(losses, "LM fp32")
    print(f"\nLM fp32: first {losses[0]:.4f}, final {final:.4f}, noise floor {_noise_floor():.4f}")
    # The task is solved: within 5% of the noise floor (0.974; without the reversal the loss would be ln 15 = 2.7).
    assert final < 1.05 * _noise_floor()
    return losses


@pytest.mark.parametrize("recipe", RECIPES)
def test_lm_matches_fp32(recipe, lm_setup, lm_fp32):
    model, batches = lm_setup
    losses = _train(model, recipe, batches, _lm_loss, LM_LR)
    final, baseline = _check_learned(losses, f"LM {recipe}"), _final(lm_fp32)
    print(f"\nLM {recipe}: final {final:.4f}, fp32 {baseline:.4f} ({final / baseline - 1:+.1%})")
    assert final <= baseline * (1 + LM_REL_TOL), f"LM {recipe}: {final:.4f} vs fp32 {baseline:.4f}"


def test_lm_mxfp4_learns(lm_setup, lm_fp32, record_property):
    """mxfp4 is reported, not held to the tolerance. Measured: final loss 0.9684 against fp32 0.9716 (-0.3%),
    from 2.79 at the first step: it also reaches the noise floor (0.974)."""
    model, batches = lm_setup
    losses = _train(model, "mxfp4", batches, _lm_loss, LM_LR)
    final, baseline = _check_learned(losses, "LM mxfp4"), _final(lm_fp32)
    record_property("lm_mxfp4_final_loss", final)
    print(f"\nLM mxfp4: final {final:.4f}, fp32 {baseline:.4f} ({final / baseline - 1:+.1%})")
