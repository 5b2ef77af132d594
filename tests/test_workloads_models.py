"""The workload models (ResNet, MobileNet-v2, QuartzNet): shapes, that they learn, CTC decoding, and that
``fewbit.quantize_`` reaches every convolution and linear layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fewbit
from fewbit.nn import QuantizedModule
from fewbit.workloads.models import cnn
from fewbit.workloads.models.quartznet import QuartzNet, QuartzNetConfig, ctc_loss, greedy_decode

TINY_CNN = {"resnet": {"width": 0.5, "blocks_per_stage": (1, 1)},
            "mobilenet_v2": {"width": 0.25, "stages": ((1, 8, 1, 1), (4, 16, 2, 2)), "head_channels": 32,
                             "dropout": 0.0}}
TINY_QUARTZNET = QuartzNetConfig(vocab_size=6, n_mels=16, prologue=(32, 11), blocks=((32, 7), (48, 9)), repeat=2,
                                 epilogue=(48, 7, 64), dropout=0.0)


def tiny_cnn(name, seed=0, in_channels=1):
    torch.manual_seed(seed)
    return cnn.build(name, num_classes=10, in_channels=in_channels, **TINY_CNN[name])


@pytest.mark.parametrize("name", cnn.MODELS)
@pytest.mark.parametrize("size", [28, 8])
def test_cnn_forward_shapes(name, size):
    model = tiny_cnn(name, in_channels=3).eval()
    assert model(torch.randn(5, 3, size, size)).shape == (5, 10)


def test_default_cnns_and_bad_names():
    resnet, mobilenet = cnn.build("resnet"), cnn.build("mobilenet_v2")
    assert resnet.blocks[-1].body[0].out_channels == 64  # stages of 16, 32, 64 channels
    depthwise = [m for m in mobilenet.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    with torch.no_grad():
        assert resnet.eval()(torch.randn(2, 1, 28, 28)).shape == mobilenet.eval()(torch.randn(2, 1, 28, 28)).shape
    with pytest.raises(ValueError, match="unknown model 'vgg'; valid: resnet, mobilenet_v2"):
        cnn.build("vgg")


def test_round_channels_follows_the_mobilenet_rule():
    assert [cnn._round_channels(c) for c in (3, 16 * 0.25, 24 * 0.5, 32 * 0.75, 100)] == [8, 8, 16, 24, 104]
    assert cnn._round_channels(19) == 24  # 16 would be more than 10% below 19


def learn_a_fixed_batch(model, x, loss_fn, steps=15, lr=0.05):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("recipe", ["fp32", "int8", "mxfp8"])
@pytest.mark.parametrize("name", cnn.MODELS)
def test_cnn_learns_and_quantizes(name, recipe):
    model = tiny_cnn(name).train()
    converted = fewbit.quantize_(model, recipe)
    layers = [m for m in converted.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert layers and all(isinstance(m, QuantizedModule) for m in layers)  # every conv and linear was reached
    torch.manual_seed(1)
    y = torch.randint(0, 10, (32,))
    x = torch.randn(10, 1, 12, 12)[y] + 0.5 * torch.randn(32, 1, 12, 12)  # a noisy prototype per class
    losses = learn_a_fixed_batch(converted, x, lambda m, x: F.cross_entropy(m(x), y), steps=25, lr=0.1)
    assert losses[-1] < 0.85 * losses[0], losses  # from ln 10 = 2.30; the zero-initialised residuals start slowly


def test_greedy_ctc_decoding_on_hand_made_logits():
    # frames: a a _ a b b _ _ | padding (ignored through the length)
    frames = [1, 1, 0, 1, 2, 2, 0, 0, 3]
    logits = F.one_hot(torch.tensor([frames, [0, 3, 3, 3, 0, 3, 2, 0, 1]]), 4).float().transpose(1, 2)
    assert greedy_decode(logits, torch.tensor([8, 9])) == [[1, 1, 2], [3, 3, 2, 1]]
    assert greedy_decode(logits[:1]) == [[1, 1, 2, 3]]
    assert greedy_decode(torch.zeros(1, 4, 0)) == [[]]


def test_ctc_loss_matches_a_hand_computed_case():
    """Two frames, target 'a': the alignments are (a, a), (a, _), (_, a); with uniform probabilities 1/3 per class
    the likelihood is 3 * (1/3)^2 and the loss (divided by the target length, 1) is log 3."""
    logits = torch.zeros(1, 3, 2)
    loss = ctc_loss(logits, torch.tensor([2]), [[1]])
    assert loss.item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=1e-6)
    padded = ctc_loss(logits, torch.tensor([2]), torch.tensor([[1, 0]]), torch.tensor([1]))
    assert padded.item() == loss.item()
    # 'aa' needs a blank between the two a's: three frames; two frames are impossible -> zeroed, not inf
    assert ctc_loss(logits, torch.tensor([2]), [[1, 1]]).item() == 0.0


def test_quartznet_shapes_and_lengths():
    torch.manual_seed(0)
    model = QuartzNet(TINY_QUARTZNET).eval()
    for frames in (1, 2, 7, 40):
        assert model(torch.randn(2, 16, frames)).shape == (2, 6, (frames + 1) // 2)
    assert QuartzNet.output_lengths(torch.tensor([1, 2, 7, 40])).tolist() == [1, 1, 4, 20]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert any(m.groups == m.in_channels > 1 for m in convs)  # depthwise (time) convolutions
    with pytest.raises(ValueError, match=r"expected \(batch, 16, frames\)"):
        model(torch.randn(2, 40, 10))
    with pytest.raises(ValueError, match="odd"):
        QuartzNetConfig(vocab_size=6, blocks=((32, 8),))


@pytest.mark.parametrize("recipe", ["fp32", "int8", "mxfp8"])
def test_quartznet_learns_a_toy_alignment_and_quantizes(recipe):
    """Features that spell the target: frames carry a one-hot of the character (class c lights mel bins 3c..3c+2)
    with blanks between; after training, greedy decoding reads the targets back."""
    torch.manual_seed(0)
    model = fewbit.quantize_(QuartzNet(TINY_QUARTZNET), recipe)
    assert all(isinstance(m, QuantizedModule) for m in model.modules() if isinstance(m, nn.Conv1d))
    targets = [[1, 2, 3], [4, 4, 5], [2, 5], [3, 1, 4, 2]]
    features = torch.zeros(len(targets), 16, 32)
    for b, target in enumerate(targets):
        for i, c in enumerate(target):
            features[b, 3 * c:3 * c + 3, 8 * i:8 * i + 4] = 1.0
    lengths = torch.full((len(targets),), 32)
    out_lengths = QuartzNet.output_lengths(lengths)

    def loss_fn(m, x):
        return ctc_loss(m(x), out_lengths, targets)

    losses = learn_a_fixed_batch(model, features, loss_fn, steps=60, lr=0.02)
    assert losses[-1] < 0.2 * losses[0], losses
    with torch.no_grad():
        assert greedy_decode(model.eval()(features), out_lengths) == targets
