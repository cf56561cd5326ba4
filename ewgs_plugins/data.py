"""Datasets by name (the ``ewgs_datasets`` hook): ``cifar10``, ``imagenet``, ``digits``.

A dataset plugin's factory takes the recipe's ``data.options`` and returns a
``DatasetSpec``: cheap to make (it reads no data), it checks that the files are there
and builds the training and test sets from ``data.root``. Every problem with the files
is a ``ConfigError`` at ``data.root`` saying what was expected and how to get the data.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
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


def _numpy_array_globals() -> dict[tuple[str, str], Any]:
    """The globals a pickled NumPy array refers to, under every name NumPy has used."""
    example = np.zeros(1, np.uint8)
    reconstruct, frombuffer = example.__reduce__()[0], example.__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds only what CIFAR-10's batch files hold: dicts, lists,
    strings, numbers and NumPy arrays (through NumPy's own ``_reconstruct``, named
    ``numpy.core.multiarray`` in the original Python-2 files and ``numpy._core`` in
    NumPy 2's, or ``_frombuffer`` under pickle protocol 5). Any other global (a
    function to call, a class to build) is refused, so no code in the file runs."""

    ALLOWED = _numpy_array_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self.ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"it asks for {module}.{name}, which is not part of CIFAR-10's format "
                "(only NumPy arrays, lists and strings are read from it)"
            )
        return found


def read_cifar10_file(path: Path) -> dict[str, Any]:
    """One pickled dict of CIFAR-10's Python format, read without running code from it
    (``_ArraysOnly``). Python 2's byte strings (the original files' keys and pixel
    data) are read as Latin-1, as torchvision does. A file that is not such a dict is a
    ``ConfigError`` at ``data.root`` naming it."""
    try:
        with open(path, "rb") as handle:
            loaded = _ArraysOnly(handle, encoding="latin1").load()
    except OSError as error:
        raise ConfigError("data.root", f"{path}: cannot be read: {error}") from None
    except Exception as error:  # a user's file: any failure to unpickle it is bad input
        raise ConfigError(
            "data.root", f"{path}: not a CIFAR-10 batch file ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(loaded, dict):
        raise ConfigError(
            "data.root", f"{path}: not a CIFAR-10 batch file (holds a {type(loaded).__name__})"
        )
    return loaded


@dataclass
class Cifar10(DatasetSpec):
    """CIFAR-10 in its Python format (as torchvision stores it): ``ROOT/cifar-10-batches-py/``.

    Training augmentation: random crop 32 with padding 4, horizontal flip; both sets
    normalized per channel. ``download`` fetches it (only when asked). ``verify``
    checks the files' MD5 sums against CIFAR-10's; ``false`` reads files in the same
    format with other contents (a subset, say). Either way the files are read as data
    only: the pickles may hold arrays, lists and strings, never code (``_ArraysOnly``).
    """

    download: bool = False
    verify: bool = True
    augment: bool = True

    TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
    FILES = (*TRAIN_FILES, "test_batch", "batches.meta")

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

    def _fetch(self, root: str) -> None:
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import download_and_extract_archive

        folder = Path(root) / "cifar-10-batches-py"
        if all((folder / name).is_file() for name in self.FILES):
            return
        download_and_extract_archive(_CIFAR10_URL, root, md5=CIFAR10.tgz_md5)

    def _verify(self, path: Path) -> None:
        from torchvision.datasets import CIFAR10

        expected = {name: md5 for name, md5 in (*CIFAR10.train_list, *CIFAR10.test_list)}
        expected[CIFAR10.meta["filename"]] = CIFAR10.meta["md5"]
        digest = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
        if digest != expected[path.name]:
            raise ConfigError(
                "data.root",
                f"{path}: its MD5 sum is {digest}, CIFAR-10's is {expected[path.name]}: the "
                "file is damaged (download it again) or holds other data in CIFAR-10's "
                "format (set data.options.verify: false to train on it; it is read as "
                f"arrays only either way); {self._how(path.parent.parent)}",
            )

    def _images(self, root: str | None, train: bool) -> tuple[np.ndarray, list[int]]:
        """The images (N, 32, 32, 3, uint8) and labels of one split."""
        self.check(root)
        if self.download:
            self._fetch(str(root))
        folder = Path(str(root)) / "cifar-10-batches-py"
        names = self.TRAIN_FILES if train else ("test_batch",)
        data, labels = [], []
        for name in names:
            path = folder / name
            if self.verify:
                self._verify(path)
            entry = read_cifar10_file(path)
            images, targets = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
            if not (
                isinstance(images, np.ndarray)
                and images.dtype == np.uint8
                and images.ndim == 2
                and images.shape[1] == 3 * 32 * 32
                and isinstance(targets, list)
                and len(targets) == len(images)
                and all(isinstance(t, int) and 0 <= t < 10 for t in targets)
            ):
                raise ConfigError(
                    "data.root",
                    f"{path}: not a CIFAR-10 batch file (expected 'data': uint8 array of "
                    "N×3072 and 'labels': N integers 0..9)",
                )
            data.append(images)
            labels += targets
        return np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels

    def train_set(self, root: str | None) -> Dataset:
        from torchvision import transforms as T

        augment = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.augment else []
        normalize = [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        return ArrayImages(*self._images(root, True), T.Compose([*augment, *normalize]))

    def test_set(self, root: str | None) -> Dataset:
        from torchvision import transforms as T

        transform = T.Compose([T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
        return ArrayImages(*self._images(root, False), transform)


class ArrayImages(Dataset):
    """Images in memory, (N, H, W, 3) uint8, served as PIL images through ``transform``
    (as torchvision's CIFAR10 does), with integer labels."""

    def __init__(self, images: np.ndarray, labels: list[int], transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


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
