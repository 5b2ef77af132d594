"""A QuartzNet-style speech encoder (Kriman et al. 2020, the small member of the Jasper family) with CTC, in one file.

Input: log-mel features (B, n_mels, T). Output: per-frame logits (B, vocab, T') over the characters plus the CTC
blank, with T' = ceil(T / 2) (one stride-2 prologue).

- **Time-channel separable convolution**: a depthwise ``Conv1d`` (``groups = channels``: each channel filtered
  alone along time with a long kernel, k weights per channel) followed by a pointwise ``Conv1d`` (kernel 1: mixes
  channels, a GEMM). It costs C*k + C*C' weights instead of C*C'*k, so long kernels (33..87 frames) stay cheap.
- **Block**: ``repeat`` sub-blocks of separable conv -> BatchNorm -> ReLU -> dropout; the last sub-block adds a
  residual (pointwise conv + BatchNorm of the block input) before its ReLU.
- **Prologue**: one separable conv with stride 2 (halves the frame rate: 100 -> 50 frames per second at a 10 ms
  hop); **epilogue**: a dilated separable conv, a pointwise conv, and a pointwise conv to the vocabulary.

Every convolution is an ``nn.Conv1d`` (no bias before BatchNorm), so ``fewbit.quantize_`` reaches all of them.
Padded frames are not masked inside the network (features are zero past an utterance's end, its mean after
normalisation); :meth:`QuartzNet.output_lengths` gives the valid frames for CTC and decoding.

CTC (Graves et al. 2006) sums over all alignments of the target to the frames, where an alignment may repeat a
character over consecutive frames and insert the blank (id 0) anywhere; a repeated character in the target needs a
blank between its two copies. Greedy decoding takes the best class per frame, collapses repeats, drops blanks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BLANK = 0


@dataclass(frozen=True)
class QuartzNetConfig:
    """``blocks``: (channels, kernel) per block, each with ``repeat`` sub-blocks; kernels are odd (same padding).
    The defaults make a ~0.5M-parameter model for a few dozen characters; QuartzNet 5x5 (6.7M) is
    ``prologue=(256, 33)``, ``blocks`` 5 x (256..512, 33..75), ``repeat=5``, ``epilogue=(512, 87, 1024)``."""

    vocab_size: int
    n_mels: int = 64
    prologue: tuple[int, int] = (128, 33)  # channels, kernel (stride 2)
    blocks: tuple[tuple[int, int], ...] = ((128, 13), (128, 15), (128, 17), (192, 21), (192, 25))
    repeat: int = 2
    epilogue: tuple[int, int, int] = (256, 29, 256)  # channels and kernel of the dilated conv, then pointwise width
    dropout: float = 0.1

    def __post_init__(self) -> None:
        kernels = [self.prologue[1], self.epilogue[1]] + [k for _, k in self.blocks]
        if any(k % 2 == 0 or k < 1 for k in kernels):
            raise ValueError(f"kernel sizes {kernels} must be odd and positive (same padding)")
        if self.vocab_size < 2 or self.repeat < 1:
            raise ValueError(f"vocab_size={self.vocab_size} (blank + characters) must be >= 2, repeat={self.repeat}"
                             " >= 1")


class SeparableConv(nn.Sequential):
    """Depthwise conv (kernel k, along time) then pointwise conv (C_in -> C_out), then BatchNorm."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, dilation: int = 1) -> None:
        padding = dilation * (kernel // 2)
        super().__init__(
            nn.Conv1d(c_in, c_in, kernel, stride, padding, dilation, groups=c_in, bias=False),
            nn.Conv1d(c_in, c_out, 1, bias=False),
            nn.BatchNorm1d(c_out),
        )


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, repeat: int, dropout: float) -> None:
        super().__init__()
        self.sub_blocks = nn.ModuleList(SeparableConv(c_in if i == 0 else c_out, c_out, kernel) for i in range(repeat))
        self.residual = nn.Sequential(nn.Conv1d(c_in, c_out, 1, bias=False), nn.BatchNorm1d(c_out))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, T) -> (B, C_out, T)."""
        residual = self.residual(x)
        for i, sub_block in enumerate(self.sub_blocks):
            x = sub_block(x)
            if i == len(self.sub_blocks) - 1:
                x = x + residual
            x = self.dropout(F.relu(x))
        return x


class QuartzNet(nn.Module):
    def __init__(self, config: QuartzNetConfig) -> None:
        super().__init__()
        self.config = config
        channels, kernel = config.prologue
        self.prologue = nn.Sequential(SeparableConv(config.n_mels, channels, kernel, stride=2), nn.ReLU(),
                                      nn.Dropout(config.dropout))
        blocks = []
        for c_out, k in config.blocks:
            blocks.append(Block(channels, c_out, k, config.repeat, config.dropout))
            channels = c_out
        self.blocks = nn.Sequential(*blocks)
        c_dilated, k_dilated, c_pointwise = config.epilogue
        self.epilogue = nn.Sequential(
            SeparableConv(channels, c_dilated, k_dilated, dilation=2), nn.ReLU(), nn.Dropout(config.dropout),
            nn.Conv1d(c_dilated, c_pointwise, 1, bias=False), nn.BatchNorm1d(c_pointwise), nn.ReLU(),
            nn.Dropout(config.dropout),
        )
        self.classifier = nn.Conv1d(c_pointwise, config.vocab_size, 1)  # bias: the blank's prior is learned early

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, n_mels, T) -> logits (B, vocab_size, ceil(T / 2))."""
        if features.ndim != 3 or features.shape[1] != self.config.n_mels:
            raise ValueError(f"features of shape {tuple(features.shape)}; expected (batch, {self.config.n_mels}, "
                             "frames)")
        x = self.prologue(features)  # (B, C, T/2)
        return self.classifier(self.epilogue(self.blocks(x)))  # (B, V, T/2)

    @staticmethod
    def output_lengths(lengths: torch.Tensor) -> torch.Tensor:
        """Valid output frames for input frame counts: the stride-2 prologue with odd kernel k and padding k // 2
        gives floor((T + 2*(k//2) - k) / 2) + 1 = floor((T - 1) / 2) + 1 = ceil(T / 2)."""
        return torch.div(lengths + 1, 2, rounding_mode="floor")


def ctc_loss(logits: torch.Tensor, logit_lengths: torch.Tensor, targets: list[list[int]] | torch.Tensor,
             target_lengths: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Mean CTC loss (each utterance's negative log-likelihood divided by its target length, then averaged);
    ``reduction="none"``: the per-utterance values (B,) before the average.

    ``logits`` (B, V, T) as the model returns them (blank = 0); ``targets`` a list of id lists (no blanks), or a
    padded (B, S) tensor with ``target_lengths``. Utterances too short for their target (fewer frames than
    characters plus the blanks needed between repeats) would give an infinite loss; their loss is zeroed
    (``zero_infinity``) so that one bad sample cannot poison a batch: shorten the targets or keep more frames.
    """
    if isinstance(targets, list):
        target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
        targets = torch.tensor([i for t in targets for i in t], dtype=torch.long)
    elif target_lengths is None:
        raise ValueError("a padded targets tensor needs target_lengths")
    log_probs = logits.float().log_softmax(dim=1).permute(2, 0, 1)  # (T, B, V), as F.ctc_loss expects
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction={reduction!r}; valid: mean, none")
    losses = F.ctc_loss(log_probs, targets, logit_lengths, target_lengths, blank=BLANK, reduction=reduction,
                        zero_infinity=True)
    # F.ctc_loss's "mean" divides by the target lengths before averaging; "none" does not, so divide here.
    return losses if reduction == "mean" else losses / target_lengths.clamp(min=1).to(losses.dtype)


def greedy_decode(logits: torch.Tensor, lengths: torch.Tensor | None = None) -> list[list[int]]:
    """Best path decoding: per utterance, argmax class per valid frame, repeats collapsed, blanks removed.

    ``logits`` (B, V, T); ``lengths`` (B,) valid frames (None: all T). Returns id lists (no blank ids).
    """
    best = logits.argmax(dim=1)  # (B, T)
    frames = best.shape[1]
    lengths = torch.full((best.shape[0],), frames) if lengths is None else lengths
    lengths = lengths.to(best.device)
    keep = torch.ones_like(best, dtype=torch.bool)
    keep[:, 1:] = best[:, 1:] != best[:, :-1]  # first frame of each run
    keep &= best != BLANK
    keep &= torch.arange(frames, device=best.device) < lengths[:, None]
    return [row[mask].tolist() for row, mask in zip(best.cpu(), keep.cpu(), strict=True)]
