"""Image classification data, offline: Fashion-MNIST from Debian's ``dataset-fashion-mnist``, else scikit-learn's
8x8 digits.

Fashion-MNIST (Xiao et al. 2017: 70,000 28x28 grey-scale images of clothing in 10 classes, 60,000 train and 10,000
test) is read from the IDX files that ``apt-get install dataset-fashion-mnist`` puts in
``/usr/share/datasets/fashion-mnist/`` (gzip-compressed or not). Every file's header is checked against its length,
so a missing or truncated file is an error that names the path and the fix, never a silently short data set.

When Fashion-MNIST is not installed, :func:`load` with ``source="auto"`` falls back to the 1,797 8x8 hand-written
digits shipped inside scikit-learn, with a warning: a much smaller and easier task (8x8 images, values 0..16), useful
to run the code anywhere, not to compare numbers with Fashion-MNIST. It has no official test split; one is carved
with the seed.

Splits: the validation split is carved from the training split by a seeded permutation. Pixels are scaled to [0, 1]
and then standardised with the mean and standard deviation of the (remaining) training split, one scalar each, as
is usual for grey-scale data. :func:`augment` adds random shifts (and horizontal flips where they keep the class).
"""

from __future__ import annotations

import gzip
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fewbit.workloads.base import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
ROOT_VARIABLE = "FEWBIT_FASHION_MNIST_DIR"  # where to look instead (an empty folder hides the Debian files)
VALID_SHARE = 12  # valid_size None: a twelfth of the training images (5,000 of Fashion-MNIST's 60,000)

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle boot")
DIGITS_CLASSES = tuple(str(d) for d in range(10))
SOURCES = ("auto", "fashion-mnist", "digits")
INSTALL_HINT = "apt-get install dataset-fashion-mnist"


def default_root() -> Path:
    """Where Fashion-MNIST is looked for: ``$FEWBIT_FASHION_MNIST_DIR`` if set, else Debian's folder."""
    return Path(os.environ.get(ROOT_VARIABLE) or FASHION_MNIST_DIR)


# IDX element types (third byte of the magic number) -> numpy dtype, big-endian as the format prescribes.
_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DatasetError(DataError):
    """A data file is missing, truncated or malformed; the message names the file and the fix."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in one IDX file (``.gz`` is decompressed), with its header checked against its length.

    IDX layout: two zero bytes, one type byte, one byte giving the number of dimensions d, then d big-endian uint32
    sizes, then the elements in C order. A file whose data is shorter or longer than its header says, or whose gzip
    stream ends early, raises :class:`DatasetError`.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DatasetError(f"{path} is missing; install Fashion-MNIST with `{INSTALL_HINT}`") from None
    except (EOFError, gzip.BadGzipFile, OSError) as error:
        raise DatasetError(f"{path} is truncated or corrupt ({error}); reinstall it with "
                           f"`apt-get install --reinstall dataset-fashion-mnist`") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (magic bytes {raw[:4].hex() or 'missing'}); reinstall it with "
                           f"`apt-get install --reinstall dataset-fashion-mnist`")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated inside its header; reinstall it with "
                           f"`apt-get install --reinstall dataset-fashion-mnist`")
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "longer than its header says"
        raise DatasetError(f"{path} is {kind}: {len(raw)} bytes, expected {expected} for shape {shape}; reinstall "
                           f"it with `apt-get install --reinstall dataset-fashion-mnist`")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist_paths(root: str | os.PathLike | None = None) -> dict[str, Path]:
    """The four IDX files under ``root`` (None: :func:`default_root`) (``name`` or ``name.gz``, whichever exists;
    ``.gz`` when neither does)."""
    root = Path(root) if root is not None else default_root()
    paths = {}
    for key, name in FASHION_MNIST_FILES.items():
        plain = root / name
        paths[key] = plain if plain.exists() else root / f"{name}.gz"
    return paths


def available_source(root: str | os.PathLike | None = None) -> str:
    """``"fashion-mnist"`` when its four files exist under ``root`` (their contents are checked at load time),
    else ``"digits"`` (scikit-learn's 8x8 digits)."""
    return "fashion-mnist" if all(p.exists() for p in fashion_mnist_paths(root).values()) else "digits"


@dataclass(frozen=True)
class ImageSpec:
    """What to load. ``source``: ``"auto"`` (Fashion-MNIST if installed, else digits with a warning),
    ``"fashion-mnist"`` (an error if missing) or ``"digits"``. ``valid_size``: images moved from train to valid
    (None: a twelfth of the source's training images, 5,000 for Fashion-MNIST and 119 for the digits; for digits,
    ``test_size`` images are carved first, since it has no test split). ``train_limit`` keeps only the first n
    training images after the split (None: all), for quick runs. ``root``: None looks in :func:`default_root`."""

    source: str = "auto"
    valid_size: int | None = None
    test_size: int = 360
    train_limit: int | None = None
    seed: int = 0
    root: str | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source={self.source!r}; valid: {', '.join(SOURCES)}")
        if (self.valid_size is not None and self.valid_size < 0) or self.test_size < 0:
            raise ValueError(f"valid_size={self.valid_size} and test_size={self.test_size} must be >= 0")
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError(f"train_limit={self.train_limit}; use None for all images or a positive count")


@dataclass
class ImageData:
    """Normalised images and labels per split. ``images[split]``: float32 (N, 1, H, W); ``labels[split]``: int64
    (N,). ``mean``/``std``: the scalars used to standardise pixels in [0, 1] (from the training split).
    ``flip_ok``: whether a horizontal flip keeps the class (clothing yes, digits no)."""

    source: str
    classes: tuple[str, ...]
    images: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    mean: float
    std: float
    flip_ok: bool

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images["train"].shape[1:])


def _read_fashion_mnist(root: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    paths = fashion_mnist_paths(root)
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(f"{paths[f'{part}_images']} holds {images.shape} images but "
                               f"{paths[f'{part}_labels']} holds {labels.shape} labels; reinstall them with "
                               f"`apt-get install --reinstall dataset-fashion-mnist`")
    return arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"]


def _read_digits(spec: ImageSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("Fashion-MNIST is missing and the fallback digits need scikit-learn: "
                          f"`{INSTALL_HINT}` or `pip install scikit-learn`") from error
    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)  # 0..16 -> 0..255, as the IDX files store
    labels = digits.target.astype(np.int64)
    order = rng.permutation(len(images))
    test, train = order[:spec.test_size], order[spec.test_size:]
    return images[train], labels[train], images[test], labels[test]


def load(spec: ImageSpec | None = None) -> ImageData:
    """Train / valid / test splits of the chosen source (see :class:`ImageSpec`), normalised.

    Errors: ``source="fashion-mnist"`` with the files missing or truncated raises :class:`DatasetError` naming the
    file and the install command; ``"auto"`` warns loudly and uses the digits when the files are missing (but a
    truncated file is still an error: a broken install should be fixed, not papered over).
    """
    spec = spec or ImageSpec()
    root = Path(spec.root) if spec.root is not None else default_root()
    rng = np.random.default_rng(spec.seed)
    source = spec.source
    if source == "auto":
        source = available_source(root)
        if source == "digits":
            warnings.warn(f"Fashion-MNIST is not installed under {root}: falling back to scikit-learn's 8x8 "
                          f"digits, a much smaller and easier task whose accuracy is NOT comparable. Install it with "
                          f"`{INSTALL_HINT}`.", UserWarning, stacklevel=2)
    if source == "fashion-mnist":
        train_x, train_y, test_x, test_y = _read_fashion_mnist(root)
        classes, flip_ok = FASHION_MNIST_CLASSES, True
    else:
        train_x, train_y, test_x, test_y = _read_digits(spec, rng)
        classes, flip_ok = DIGITS_CLASSES, False
    valid_size = len(train_x) // VALID_SHARE if spec.valid_size is None else spec.valid_size
    if valid_size >= len(train_x):
        raise ValueError(f"valid_size={valid_size} leaves no training images (the {source} training split has "
                         f"{len(train_x)}); use a smaller valid_size (the default takes a twelfth of them)")
    order = rng.permutation(len(train_x))
    valid, train = order[:valid_size], order[valid_size:]
    if spec.train_limit is not None:
        train = train[:spec.train_limit]
    raw = {"train": (train_x[train], train_y[train]), "valid": (train_x[valid], train_y[valid]),
           "test": (test_x, test_y)}
    train_pixels = raw["train"][0].astype(np.float64) / 255
    mean, std = float(train_pixels.mean()), float(train_pixels.std())
    images, labels = {}, {}
    for split, (x, y) in raw.items():
        pixels = torch.from_numpy(x.astype(np.float32) / 255).unsqueeze(1)  # (N, 1, H, W)
        images[split] = (pixels - mean) / std
        labels[split] = torch.from_numpy(y.astype(np.int64))
    return ImageData(source, classes, images, labels, mean, std, flip_ok)


def augment(images: torch.Tensor, generator: torch.Generator, *, max_shift: int = 2,
            flip: bool = False) -> torch.Tensor:
    """A randomly shifted (and, with ``flip``, randomly mirrored) copy of a batch (N, C, H, W).

    Each image moves by up to ``max_shift`` pixels along each axis (the usual pad-and-random-crop); the uncovered
    border takes the image's minimum, which is black after normalisation. Deterministic given the generator's
    state; the input is not modified.
    """
    n, _, h, w = images.shape
    if max_shift > 0:
        background = images.amin(dim=(1, 2, 3), keepdim=True)
        padded = torch.nn.functional.pad(images - background, [max_shift] * 4) + background
        dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (N, 1, 1, W)
        index = torch.arange(n)[:, None, None, None]
        images = padded[index, torch.arange(images.shape[1])[None, :, None, None], rows, cols]
    if flip:
        mirror = torch.rand(n, generator=generator) < 0.5
        images = torch.where(mirror[:, None, None, None], images.flip(-1), images)
    return images
