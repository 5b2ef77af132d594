"""``vision``: image classification with a small ResNet or a MobileNet-v2, scored by top-1 accuracy.

Data, by ``source`` (:mod:`fewbit.workloads.data.images`):

- ``auto`` (default): Fashion-MNIST when Debian's ``dataset-fashion-mnist`` is installed, else scikit-learn's 8x8
  digits with a loud warning (a much easier task: its accuracy is not comparable);
- ``fashion-mnist``: an error naming the package when the files are missing or truncated;
- ``digits``: always the 8x8 digits.

Models (``model``, :mod:`fewbit.workloads.models.cnn`): ``resnet`` (basic blocks, ``blocks`` per stage, 16 * ``width``
channels in the first stage) or ``mobilenet_v2`` (inverted residuals with depthwise convolutions, the known hard
case for 8-bit formats with one scale per tensor; ``width`` is its width multiplier, ``stem_stride`` 2 quarters its
cost). Training batches are random shifts (and mirror images, where they keep the class) of training images.

The metric is top-1 ``accuracy`` in percent; evaluations also report the cross-entropy ``loss``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fewbit.workloads.base import (
    Model,
    Samples,
    Source,
    TrainSettings,
    Workload,
    batch_generator,
    installed,
    limited,
    model_device,
)
from fewbit.workloads.data import images
from fewbit.workloads.models import cnn


@dataclass(frozen=True)
class VisionConfig(TrainSettings):
    model: str = "resnet"
    source: str = "auto"
    width: float = 1.0
    blocks: int = 2  # resnet: blocks per stage (three stages)
    stem_stride: int = 1  # mobilenet_v2: 2 halves the resolution at the stem
    valid_size: int = 0  # images moved from train to valid; 0: a twelfth of the source's (5,000 of Fashion-MNIST)
    train_limit: int = 0  # keep only this many training images (0: all)
    max_shift: int = 2  # augmentation: random shifts of up to this many pixels
    flip: bool = True  # augmentation: mirror images, where the data set allows it (clothing yes, digits no)
    label_smoothing: float = 0.0
    eval_batch_size: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model not in cnn.MODELS:
            raise ValueError(f"model={self.model!r}; valid: {', '.join(cnn.MODELS)}")
        if self.source not in images.SOURCES:
            raise ValueError(f"source={self.source!r}; valid: {', '.join(images.SOURCES)}")
        if not self.width > 0 or self.blocks < 1 or self.stem_stride < 1 or self.eval_batch_size < 1:
            raise ValueError(f"width={self.width}, blocks={self.blocks}, stem_stride={self.stem_stride} and "
                             f"eval_batch_size={self.eval_batch_size} must be positive")
        if self.train_limit < 0 or self.max_shift < 0 or self.valid_size < 0:
            raise ValueError(f"train_limit={self.train_limit}, max_shift={self.max_shift} and valid_size="
                             f"{self.valid_size} must be >= 0")


class Vision(Workload):
    name = "vision"
    description = "ResNet or MobileNet-v2 on Fashion-MNIST (8x8 digits fallback); top-1 accuracy"
    metric = "accuracy"
    higher_is_better = True
    secondary = "loss"
    Config = VisionConfig

    @classmethod
    def sources(cls) -> list[Source]:
        return [
            Source("fashion-mnist", f"Fashion-MNIST, Debian files in {images.default_root()}",
                   images.available_source() == "fashion-mnist", images.INSTALL_HINT),
            Source("digits", "scikit-learn's 8x8 digits (fallback: a much easier task)", installed("sklearn"),
                   "pip install scikit-learn"),
        ]

    def _setup(self) -> None:
        c = self.config
        if c.source != "auto":
            self.require_source(c.source)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.data = images.load(images.ImageSpec(source=c.source, valid_size=c.valid_size or None,
                                                     train_limit=c.train_limit or None, seed=c.data_seed))
        for warning in caught:  # the digits fallback: say it where people look, every time
            _loud(str(warning.message))

    def data_key(self) -> dict:
        """``source=auto`` means Fashion-MNIST or the digits, whichever this machine has: a cached baseline names
        the one it was trained on."""
        source = self.config.source
        return {"source": images.available_source() if source == "auto" else source}

    def info(self) -> dict:
        d = self.data
        return {"source": d.source, "image_shape": list(d.image_shape), "classes": len(d.classes),
                **{f"{split}_images": len(x) for split, x in d.images.items()}}

    def build_model(self) -> nn.Module:
        c = self.config
        torch.manual_seed(c.seed)
        options = {"blocks_per_stage": (c.blocks,) * 3} if c.model == "resnet" else {"stem_stride": c.stem_stride}
        return cnn.build(c.model, num_classes=len(self.data.classes), in_channels=self.data.image_shape[0],
                         width=c.width, **options)

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        generator = batch_generator(c.seed, step, micro)
        x, y = self.data.images["train"], self.data.labels["train"]
        pick = torch.randint(len(x), (c.batch_size,), generator=generator)
        shift = min(c.max_shift, x.shape[-1] // 4)
        return images.augment(x[pick], generator, max_shift=shift, flip=c.flip and self.data.flip_ok), y[pick]

    def example_input(self) -> torch.Tensor:
        return self.data.images["test"][:1]

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x).float(), y, label_smoothing=self.config.label_smoothing)

    def samples(self, split: str, limit: int = 0) -> ImageSamples:
        self.check_split(split)
        x, y = self.data.images[split], self.data.labels[split]
        count = limited(split, len(x), limit)
        return ImageSamples(split, x[:count], y[:count])

    def predict(self, model: Model, inputs: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes), float32 on the CPU."""
        return model(inputs.to(model_device(model))).float().cpu()

    def score(self, outputs, references) -> dict[str, float]:
        logits, labels = torch.stack(list(outputs)), torch.as_tensor(references)
        correct = int((logits.argmax(-1) == labels).sum())
        loss = float(F.cross_entropy(logits.double(), labels, reduction="sum"))
        return {"accuracy": 100.0 * correct / len(labels), "loss": loss / len(labels), "images": float(len(labels))}


@dataclass
class ImageSamples(Samples):
    """Images (N, C, H, W) with their class labels."""

    split: str
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)

    def inputs(self, indices) -> torch.Tensor:
        return self.images[torch.as_tensor(list(indices), dtype=torch.long)]

    def references(self, indices) -> list[int]:
        return self.labels[torch.as_tensor(list(indices), dtype=torch.long)].tolist()


def _loud(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold yellow]WARNING:[/] {message}")


__all__ = ["ImageSamples", "Vision", "VisionConfig"]
