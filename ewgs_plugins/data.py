"""Datasets by name (the ``ewgs_datasets`` hook): ``cifar10``, ``imagenet``, ``digits``.

A dataset plugin's factory takes the recipe's ``data.options`` and returns a
``DatasetSpec``: cheap to make (it reads no data), it checks that the files are there
and builds the training and test sets from ``data.root``. Every problem with the files
is a ``ConfigError`` at ``data.root`` saying what was expected and how to get the data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .errors import ConfigError
from .hookspecs import hookimpl


class DatasetSpec:
    """What a dataset factory returns. ``root`` is the recipe's ``data.root``."""

    def check(self, root: str | None) -> None:
        """Raise ``ConfigError("data.root", ...)`` if the data is not where it should be.
        Fast: looks at file names only."""

    def num_classes(self, root: str | None) -> int:
        raise NotImplementedError

    def train_set(self, root: str | None) -> Dataset:
        """The training set, with training augmentation; items are (tensor, int label)."""
        raise NotImplementedError

    def test_set(self, root: str | None) -> Dataset:
        """The test (validation) set, without augmentation."""
        raise NotImplementedError


def _need_root(root: str | None, dataset: str, how: str) -> Path:
    if root is None:
        raise ConfigError("data.root", f"the {dataset} dataset needs data.root: {how}")
    return Path(root)


# ------------------------------------------------------------------------ CIFAR-10

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


@dataclass
class Cifar10(DatasetSpec):
    """CIFAR-10 in torchvision's on-disk format: ``ROOT/cifar-10-batches-py/``.

    Training augmentation: random crop 32 with padding 4, horizontal flip; both sets
    normalized per channel. ``download`` fetches it (only when asked). ``verify``
    checks the files' MD5 sums as torchvision does; ``false`` checks only that they
    exist, for a copy in the same format with other contents (a subset, say).
    """

    download: bool = False
    verify: bool = True
    augment: bool = True

    FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")

    def _how(self, root: Path | str) -> str:
        return (
            f"download {_CIFAR10_URL} and extract it into {root} (so that "
            f"{Path(root) / 'cifar-10-batches-py' / 'data_batch_1'} exists), "
            "or set data.options.download: true"
        )

    def check(self, root: str | None) -> None:
        folder = _need_root(root, "cifar10", self._how("ROOT")) / "cifar-10-batches-py"
        if self.download:
            return
        missing = [name for name in self.FILES if not (folder / name).is_file()]
        if missing:
            raise ConfigError(
                "data.root", f"{folder / missing[0]} not found; {self._how(root or '')}"
            )

    def num_classes(self, root: str | None) -> int:
        return 10

    def _dataset(self, root: str | None, train: bool, transform: Callable) -> Dataset:
        self.check(root)
        cls = _cifar10_class(self.verify)
        try:
            return cls(str(root), train=train, transform=transform, download=self.download)
        except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
            raise ConfigError(
                "data.root",
                f"{root}: {error} (set data.options.verify: false to accept files in "
                f"CIFAR-10's format with other contents); {self._how(root or '')}",
            ) from None

    def train_set(self, root: str | None) -> Dataset:
        from torchvision import transforms as T

        augment = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.augment else []
        normalize = [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        return self._dataset(root, True, T.Compose([*augment, *normalize]))

    def test_set(self, root: str | None) -> Dataset:
        from torchvision import transforms as T

        return self._dataset(
            root, False, T.Compose([T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
        )


def _cifar10_class(verify: bool) -> type:
    from torchvision.datasets import CIFAR10

    if verify:
        return CIFAR10

    class UncheckedCIFAR10(CIFAR10):
        # torchvision's own loader with no MD5 sums: its integrity check then only
        # tests that each file exists.
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return UncheckedCIFAR10


# ------------------------------------------------------------------------ ImageNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageNet(DatasetSpec):
    """ImageNet (ILSVRC-2012) as two ImageFolder trees, ``ROOT/train/<class>/*`` and
    ``ROOT/val/<class>/*``. Training: RandomResizedCrop ``image_size`` + horizontal
    flip; validation: Resize ``resize`` + CenterCrop ``image_size``; normalized."""

    image_size: int = 224
    resize: int = 256

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.resize < self.image_size:
            raise ValueError(
                f"expected 1 <= image_size <= resize, got image_size={self.image_size}, "
                f"resize={self.resize}"
            )

    HOW = (
        "get ILSVRC-2012 from https://image-net.org and unpack it so that ROOT/train and "
        "ROOT/val each hold one folder per class with its images (the validation images "
        "sorted into class folders)"
    )

    def _classes(self, folder: Path) -> list[str]:
        if not folder.is_dir():
            raise ConfigError("data.root", f"{folder} not found; {self.HOW}")
        classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
        if not classes:
            raise ConfigError("data.root", f"{folder} holds no class folder; {self.HOW}")
        return classes

    def check(self, root: str | None) -> None:
        base = _need_root(root, "imagenet", self.HOW)
        train, val = self._classes(base / "train"), self._classes(base / "val")
        if train != val:
            only = sorted(set(train) ^ set(val))
            raise ConfigError(
                "data.root",
                f"{base / 'train'} and {base / 'val'} have different class folders "
                f"(e.g. {only[0]!r} is only in one)",
            )

    def num_classes(self, root: str | None) -> int:
        return len(self._classes(_need_root(root, "imagenet", self.HOW) / "train"))

    def _folder(self, root: str | None, split: str, transform: Callable) -> Dataset:
        from torchvision.datasets import ImageFolder

        self.check(root)
        folder = Path(str(root)) / split
        try:
            return ImageFolder(str(folder), transform=transform)
        except (FileNotFoundError, RuntimeError) as error:
            raise ConfigError("data.root", f"{folder}: {error}; {self.HOW}") from None

    def train_set(self, root: str | None) -> Dataset:
        from torchvision import transforms as T

        transform = T.Compose(
            [
                T.RandomResizedCrop(self.image_size),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        return self._folder(root, "train", transform)

    def test_set(self, root: str | None) -> Dataset:
        from torchvision import transforms as T

        transform = T.Compose(
            [
                T.Resize(self.resize),
                T.CenterCrop(self.image_size),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        return self._folder(root, "val", transform)


# -------------------------------------------------------------------------- digits


class TensorImages(Dataset):
    """Images in memory, (N, C, H, W) in [0, 1]: optionally shifted by up to ``shift``
    pixels (zero padding), then normalized with ``mean`` and ``std``."""

    def __init__(
        self, images: Tensor, labels: Tensor, mean: float, std: float, shift: int = 0
    ) -> None:
        self.images, self.labels = images, labels
        self.mean, self.std, self.shift = mean, std, shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.shift:
            s = self.shift
            dy, dx = (int(v) for v in torch.randint(-s, s + 1, (2,)))
            padded = torch.nn.functional.pad(image, (s, s, s, s))
            h, w = image.shape[-2:]
            image = padded[:, s + dy : s + dy + h, s + dx : s + dx + w]
        return (image - self.mean) / self.std, int(self.labels[index])


@dataclass
class Digits(DatasetSpec):
    """scikit-learn's handwritten digits (1797 images, 1×8×8, 10 classes; it ships inside
    scikit-learn, nothing to download). Pixels scaled to [0, 1], then normalized with the
    training split's mean and std. A fixed split: ``test_fraction`` of the images, drawn
    with ``split_seed``. Training augmentation: a random shift of up to ``shift``
    pixels. ``data.root`` is not used."""

    test_fraction: float = 0.2
    split_seed: int = 0
    shift: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be between 0 and 1, got {self.test_fraction}")
        if not 0 <= self.shift <= 4:
            raise ValueError(f"shift must be 0..4 pixels, got {self.shift}")

    def check(self, root: str | None) -> None:
        self._load_digits()

    def num_classes(self, root: str | None) -> int:
        return 10

    @staticmethod
    def _load_digits() -> Callable[..., Any]:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ConfigError(
                "data.name",
                "the digits dataset comes with scikit-learn, which is not installed; "
                'install the demo extra: pip install -e ".[demo]"',
            ) from None
        return load_digits

    def _split(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        digits = self._load_digits()()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(
            len(labels), generator=torch.Generator().manual_seed(self.split_seed)
        )
        n_test = round(len(labels) * self.test_fraction)
        test, train = order[:n_test], order[n_test:]
        return images[train], labels[train], images[test], labels[test]

    def _sets(self) -> tuple[TensorImages, TensorImages]:
        train_x, train_y, test_x, test_y = self._split()
        mean, std = float(train_x.mean()), float(train_x.std())
        return (
            TensorImages(train_x, train_y, mean, std, shift=self.shift),
            TensorImages(test_x, test_y, mean, std),
        )

    def train_set(self, root: str | None) -> Dataset:
        return self._sets()[0]

    def test_set(self, root: str | None) -> Dataset:
        return self._sets()[1]


@hookimpl
def ewgs_datasets() -> Mapping[str, Callable[..., Any]]:
    return {"cifar10": Cifar10, "imagenet": ImageNet, "digits": Digits}
