"""Datasets by name (the ``ewgs_datasets`` hook): ``cifar10``, ``imagenet``,
``imagefolder``, ``npz``, ``digits``; and splits of them by index (``data.train``,
``data.val``).

A dataset plugin's factory takes the recipe's ``data.options`` and returns a
``DatasetSpec``: cheap to make (it reads no data), it checks that the files are there
and builds the training and test sets from ``data.root``. Every problem with the files
is a ``ConfigError`` at ``data.root`` saying what was expected and how to get the data.

Splits: ``data.train`` is ``train`` (the whole training set) or a range of it,
``train[0:10000]`` (images 0..9,999 in the dataset's own order); ``data.val`` is
``test`` (the dataset's official test or validation set) or a range of the training set
held out for validation, ``train[10000:12000]``, read without training augmentation.
The two ranges may not overlap, and the official test set stays untouched.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset

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

    def eval_train_set(self, root: str | None) -> Dataset:
        """The training set in the same order, with the test set's transform (no
        augmentation): what a validation range (``data.val: train[a:b]``) is cut from."""
        raise ConfigError(
            "data.val",
            f"dataset {type(self).__name__} cannot hold out validation images from its "
            "training set (it has no eval_train_set); use data.val: test",
        )

    def train_size(self, root: str | None) -> int | None:
        """The number of training images if known without reading the data (checks a
        split's range before training starts), else None."""
        return None


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
        return ArrayImages(*self._images(root, False), self._plain())

    def eval_train_set(self, root: str | None) -> Dataset:
        return ArrayImages(*self._images(root, True), self._plain())

    def train_size(self, root: str | None) -> int | None:
        return 50_000 if self.verify else None

    @staticmethod
    def _plain() -> Callable:
        from torchvision import transforms as T

        return T.Compose([T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])


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
    flip; validation: Resize ``resize`` + CenterCrop ``image_size``; normalized.

    Subsets: ``classes`` keeps the first N class folders in sorted order, or the named
    ones (in both trees; labels are renumbered 0..N-1 in that order);
    ``images_per_class`` keeps the first N images of each class of the training tree
    (in sorted file order; the validation tree stays whole)."""

    image_size: int = 224
    resize: int = 256
    classes: int | list[str] | None = None
    images_per_class: int | None = None

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.resize < self.image_size:
            raise ValueError(
                f"expected 1 <= image_size <= resize, got image_size={self.image_size}, "
                f"resize={self.resize}"
            )
        if isinstance(self.classes, int) and self.classes < 1:
            raise ValueError(
                f"classes must be >= 1 (or a list of class folders), got {self.classes}"
            )
        if isinstance(self.classes, list) and not self.classes:
            raise ValueError("classes is an empty list")
        if self.images_per_class is not None and self.images_per_class < 1:
            raise ValueError(f"images_per_class must be >= 1, got {self.images_per_class}")

    HOW = (
        "get ILSVRC-2012 from https://image-net.org and unpack it so that ROOT/train and "
        "ROOT/val each hold one folder per class with its images (the validation images "
        "sorted into class folders)"
    )
    VAL = "val"
    NAME = "imagenet"

    def _classes(self, folder: Path) -> list[str]:
        if not folder.is_dir():
            raise ConfigError("data.root", f"{folder} not found; {self.HOW}")
        classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
        if not classes:
            raise ConfigError("data.root", f"{folder} holds no class folder; {self.HOW}")
        return classes

    def _chosen(self, base: Path) -> list[str]:
        """The class folders used, in label order."""
        every = self._classes(base / "train")
        if self.classes is None:
            return every
        if isinstance(self.classes, int):
            if self.classes > len(every):
                raise ConfigError(
                    "data.options.classes",
                    f"{self.classes} classes asked for, {base / 'train'} has {len(every)}",
                )
            return every[: self.classes]
        absent = [name for name in self.classes if name not in every]
        if absent:
            raise ConfigError(
                "data.options.classes", f"{absent[0]!r} is not a class folder of {base / 'train'}"
            )
        return list(dict.fromkeys(self.classes))

    def check(self, root: str | None) -> None:
        base = _need_root(root, self.NAME, self.HOW)
        train, val = self._classes(base / "train"), self._classes(base / self.VAL)
        if train != val:
            only = sorted(set(train) ^ set(val))
            raise ConfigError(
                "data.root",
                f"{base / 'train'} and {base / self.VAL} have different class folders "
                f"(e.g. {only[0]!r} is only in one)",
            )
        self._chosen(base)

    def num_classes(self, root: str | None) -> int:
        return len(self._chosen(_need_root(root, self.NAME, self.HOW)))

    def _folder(self, root: str | None, split: str, transform: Callable) -> Dataset:
        from torchvision.datasets import ImageFolder

        self.check(root)
        folder = Path(str(root)) / split
        try:
            dataset = ImageFolder(str(folder), transform=transform)
        except (FileNotFoundError, RuntimeError) as error:
            raise ConfigError("data.root", f"{folder}: {error}; {self.HOW}") from None
        chosen = self._chosen(Path(str(root)))
        per_class = self.images_per_class if split == "train" else None
        if chosen != dataset.classes or per_class is not None:
            _keep(dataset, chosen, per_class)
        return dataset

    def train_transform(self) -> Callable:
        from torchvision import transforms as T

        return T.Compose(
            [
                T.RandomResizedCrop(self.image_size),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def test_transform(self) -> Callable:
        from torchvision import transforms as T

        return T.Compose(
            [
                T.Resize(self.resize),
                T.CenterCrop(self.image_size),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def train_set(self, root: str | None) -> Dataset:
        return self._folder(root, "train", self.train_transform())

    def test_set(self, root: str | None) -> Dataset:
        return self._folder(root, self.VAL, self.test_transform())

    def eval_train_set(self, root: str | None) -> Dataset:
        return self._folder(root, "train", self.test_transform())


def _keep(dataset: Any, classes: list[str], per_class: int | None) -> None:
    """Keep in a torchvision ``ImageFolder`` the images of ``classes`` (relabelled 0..N-1
    in that order), at most ``per_class`` of each (the first in sorted file order)."""
    label = {
        dataset.classes[old]: new for new, old in enumerate(map(dataset.class_to_idx.get, classes))
    }
    kept: list[tuple[str, int]] = []
    counts: dict[int, int] = {}
    for path, old in dataset.samples:
        new = label.get(dataset.classes[old])
        if new is None or (per_class is not None and counts.get(new, 0) >= per_class):
            continue
        counts[new] = counts.get(new, 0) + 1
        kept.append((path, new))
    dataset.samples = dataset.imgs = kept
    dataset.targets = [target for _, target in kept]
    dataset.classes = list(classes)
    dataset.class_to_idx = {name: index for index, name in enumerate(classes)}


@dataclass
class ImageFolderData(ImageNet):
    """Your own images, one folder per class: ``ROOT/train/<class>/*`` and
    ``ROOT/val/<class>/*`` (any size, any format PIL reads; same class folders in
    both). Every image is resized to ``image_size`` × ``image_size``; training adds a
    random crop with ``image_size // 8`` pixels of padding and a horizontal flip
    (``augment``); both are normalized with ``mean`` and ``std`` per channel (ImageNet's
    by default). ``classes`` and ``images_per_class`` as for ``imagenet``."""

    image_size: int = 32
    resize: int = 0
    augment: bool = True
    mean: list[float] | None = None
    std: list[float] | None = None

    HOW = (
        "put one folder per class under ROOT/train and the same class folders under "
        "ROOT/val, each holding that class's images"
    )
    NAME = "imagefolder"

    def __post_init__(self) -> None:
        self.resize = self.resize or self.image_size
        super().__post_init__()

    def _normalize(self) -> Any:
        from torchvision import transforms as T

        return T.Normalize(self.mean or IMAGENET_MEAN, self.std or IMAGENET_STD)

    def train_transform(self) -> Callable:
        from torchvision import transforms as T

        size = self.image_size
        augment = (
            [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
            if self.augment
            else []
        )
        resize = T.Resize((size, size))
        return T.Compose([T.Lambda(_rgb), resize, *augment, T.ToTensor(), self._normalize()])

    def test_transform(self) -> Callable:
        from torchvision import transforms as T

        resize = T.Resize((self.image_size, self.image_size))
        return T.Compose([T.Lambda(_rgb), resize, T.ToTensor(), self._normalize()])


def _rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


# ----------------------------------------------------------------------------- npz


@dataclass
class Npz(DatasetSpec):
    """Your own arrays: ``data.root`` is a NumPy ``.npz`` file holding ``x_train``,
    ``y_train`` and (for ``data.val: test``) ``x_test``, ``y_test``. Images are
    ``(N, H, W)`` or ``(N, H, W, C)`` (channels last): uint8 (0..255) or floats in
    [0, 1]; labels are integers 0..K-1 (K: ``classes``, or by default the largest label + 1).
    Normalized with the training images' mean and std; training shifts each image by up
    to ``shift`` pixels. Read with ``allow_pickle=False``: arrays only, never code."""

    classes: int | None = None
    shift: int = 0

    KEYS = ("x_train", "y_train")
    HOW = (
        "save your arrays with numpy.savez(ROOT, x_train=..., y_train=..., x_test=..., "
        "y_test=...) and set data.root to that file"
    )

    def __post_init__(self) -> None:
        if not 0 <= self.shift <= 8:
            raise ValueError(f"shift must be 0..8 pixels, got {self.shift}")
        if self.classes is not None and self.classes < 1:
            raise ValueError(f"classes must be >= 1, got {self.classes}")

    def _open(self, root: str | None) -> Any:
        path = _need_root(root, "npz", self.HOW)
        if not path.is_file():
            raise ConfigError("data.root", f"{path} not found; {self.HOW}")
        try:
            return np.load(path, allow_pickle=False)
        except Exception as error:  # a user's file: any failure to read it is bad input
            raise ConfigError(
                "data.root", f"{path}: not an .npz file ({type(error).__name__}: {error})"
            ) from None

    def check(self, root: str | None) -> None:
        with self._open(root) as arrays:
            absent = [key for key in self.KEYS if key not in arrays.files]
        if absent:
            raise ConfigError("data.root", f"{root} has no array {absent[0]!r}; {self.HOW}")

    def _arrays(self, root: str | None, split: str) -> tuple[Tensor, Tensor]:
        with self._open(root) as arrays:
            if f"x_{split}" not in arrays.files or f"y_{split}" not in arrays.files:
                raise ConfigError(
                    "data.val",
                    f"{root} has no x_{split}/y_{split}; add them, or hold out validation "
                    "images from the training arrays with data.val: train[START:STOP]",
                )
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        where = f"{root}: x_{split}"
        if x.ndim not in (3, 4) or len(x) != len(y) or y.ndim != 1:
            raise ConfigError(
                "data.root",
                f"{where} must be (N, H, W) or (N, H, W, C) with y_{split} of N labels, got "
                f"{x.shape} and {y.shape}",
            )
        if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
            raise ConfigError("data.root", f"{root}: y_{split} must hold integers >= 0")
        if self.classes is not None and len(y) and y.max() >= self.classes:
            raise ConfigError(
                "data.options.classes",
                f"{self.classes} classes, but y_{split} of {root} holds label {int(y.max())}",
            )
        images = torch.from_numpy(np.ascontiguousarray(x))
        images = images.unsqueeze(-1) if images.dim() == 3 else images
        images = images.permute(0, 3, 1, 2).float()
        if x.dtype == np.uint8:
            images = images / 255.0
        elif not np.issubdtype(x.dtype, np.floating):
            raise ConfigError("data.root", f"{where} must be uint8 or floating, got {x.dtype}")
        return images, torch.from_numpy(y.astype(np.int64))

    def num_classes(self, root: str | None) -> int:
        if self.classes is not None:
            return self.classes
        return int(self._arrays(root, "train")[1].max()) + 1

    def _sets(self, root: str | None) -> tuple[Tensor, Tensor, float, float]:
        x, y = self._arrays(root, "train")
        return x, y, float(x.mean()), float(x.std())

    def train_set(self, root: str | None) -> Dataset:
        x, y, mean, std = self._sets(root)
        return TensorImages(x, y, mean, std, shift=self.shift)

    def eval_train_set(self, root: str | None) -> Dataset:
        x, y, mean, std = self._sets(root)
        return TensorImages(x, y, mean, std)

    def test_set(self, root: str | None) -> Dataset:
        _, _, mean, std = self._sets(root)
        return TensorImages(*self._arrays(root, "test"), mean, std)

    def train_size(self, root: str | None) -> int | None:
        return None


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

    def eval_train_set(self, root: str | None) -> Dataset:
        train = self._sets()[0]
        return TensorImages(train.images, train.labels, train.mean, train.std)

    def test_set(self, root: str | None) -> Dataset:
        return self._sets()[1]


# --------------------------------------------------------------------------- splits

_RANGE = re.compile(r"train\[(\d*):(\d*)\]")


@dataclass(frozen=True)
class Split:
    """``train`` / ``test`` (a whole set) or ``train[start:stop]`` (``stop`` None: to the end)."""

    text: str
    source: str
    start: int = 0
    stop: int | None = None

    @property
    def is_range(self) -> bool:
        return self.source == "train" and self.text != "train"

    def overlaps(self, other: Split) -> bool:
        if self.source != "train" or other.source != "train":
            return False
        end, other_end = self.stop or float("inf"), other.stop or float("inf")
        return self.start < other_end and other.start < end


def parse_split(text: str, key_path: str, whole: str) -> Split:
    """``text`` of ``data.train`` (``whole`` = ``train``) or ``data.val`` (``test``)."""
    if text == whole:
        return Split(text, whole)
    match = _RANGE.fullmatch(text.replace(" ", ""))
    if match is None:
        raise ConfigError(
            key_path,
            f"expected {whole} or a range of the training set such as train[0:10000], got {text!r}",
        )
    start = int(match[1]) if match[1] else 0
    stop = int(match[2]) if match[2] else None
    if stop is not None and stop <= start:
        raise ConfigError(key_path, f"{text}: the range is empty (expected start < stop)")
    return Split(f"train[{start}:{'' if stop is None else stop}]", "train", start, stop)


def check_splits(train: str, val: str, key_path: str = "data") -> tuple[Split, Split]:
    """The parsed ``data.train`` and ``data.val``; a ``ConfigError`` if either is malformed
    or they overlap (validation images must not be trained on)."""
    train_split = parse_split(train, f"{key_path}.train", "train")
    val_split = parse_split(val, f"{key_path}.val", "test")
    if train_split.overlaps(val_split):
        raise ConfigError(
            f"{key_path}.val",
            f"{val_split.text} overlaps the training images ({train_split.text}); hold the "
            "validation range out of data.train (e.g. train: train[0:10000], "
            "val: train[10000:12000])",
        )
    return train_split, val_split


def evaluated_split(val: str) -> str:
    """What ``data.val`` evaluates on, in words for the report: ``official test set`` or
    ``validation from train[10000:12000]``."""
    return "official test set" if val == "test" else f"validation from {val}"


@dataclass
class SplitDataset(DatasetSpec):
    """``spec`` with ``data.train`` and ``data.val`` applied (``with_splits``)."""

    spec: DatasetSpec
    train: Split
    val: Split

    def _cut(
        self, dataset: Dataset, split: Split, key_path: str, size: int | None = None
    ) -> Dataset:
        size = len(dataset) if size is None else size  # type: ignore[arg-type]
        stop = size if split.stop is None else split.stop
        if stop > size or split.start >= size:
            hint = (
                "data.train: train takes them all"
                if key_path == "data.train"
                else "a root holding only a subset evaluates on its own test files with "
                "data.val: test"
            )
            raise ConfigError(
                key_path,
                f"{split.text} is out of range: the training set of data.root has {size} "
                f"images ({hint})",
            )
        return Subset(dataset, range(split.start, stop))

    def check(self, root: str | None) -> None:
        self.spec.check(root)
        size = self.spec.train_size(root)
        if size is not None:
            for split, key in ((self.train, "data.train"), (self.val, "data.val")):
                if split.is_range:
                    self._cut(_Sized(size), split, key, size)

    def num_classes(self, root: str | None) -> int:
        return self.spec.num_classes(root)

    def train_set(self, root: str | None) -> Dataset:
        whole = self.spec.train_set(root)
        return self._cut(whole, self.train, "data.train") if self.train.is_range else whole

    def test_set(self, root: str | None) -> Dataset:
        if not self.val.is_range:
            return self.spec.test_set(root)
        return self._cut(self.spec.eval_train_set(root), self.val, "data.val")

    def eval_train_set(self, root: str | None) -> Dataset:
        return self.spec.eval_train_set(root)

    def train_size(self, root: str | None) -> int | None:
        return self.spec.train_size(root)


class _Sized(Dataset):
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def with_splits(spec: DatasetSpec, train: str = "train", val: str = "test") -> DatasetSpec:
    """``spec`` itself for the whole training and test sets, else a ``SplitDataset``."""
    train_split, val_split = check_splits(train, val)
    if not (train_split.is_range or val_split.is_range):
        return spec
    return SplitDataset(spec, train_split, val_split)


@hookimpl
def ewgs_datasets() -> Mapping[str, Callable[..., Any]]:
    return {
        "cifar10": Cifar10,
        "imagenet": ImageNet,
        "imagefolder": ImageFolderData,
        "npz": Npz,
        "digits": Digits,
    }
