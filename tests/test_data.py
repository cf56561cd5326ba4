"""The datasets, on real files in their real formats: CIFAR-10's pickled batches,
ImageFolder trees of PNG/JPEG files, and scikit-learn's digits."""

from __future__ import annotations

import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ewgs_plugins.data import CIFAR10_MEAN, CIFAR10_STD, Cifar10, Digits, ImageNet
from ewgs_plugins.errors import ConfigError
from ewgs_plugins.registry import registry


def write_cifar10(root: Path, per_batch: int = 4, test: int = 6, seed: int = 0) -> Path:
    """CIFAR-10 as torchvision reads it: ``cifar-10-batches-py/`` holding pickled
    dicts (``data``: uint8 N×3072 in CHW order, ``labels``) and ``batches.meta``."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(name: str, n: int) -> None:
        entry = {
            "batch_label": name,
            "data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
            "labels": [int(v) for v in rng.integers(0, 10, n)],
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)

    for i in range(1, 6):
        batch(f"data_batch_{i}", per_batch)
    batch("test_batch", test)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [*names, "truck"], "num_vis": 3072}, f)
    return root


def test_cifar10_reads_torchvisions_format(tmp_path):
    root = write_cifar10(tmp_path / "cifar")
    spec = registry().create("dataset", "cifar10", {"verify": False}, "data")
    assert isinstance(spec, Cifar10) and spec.num_classes(str(root)) == 10
    spec.check(str(root))
    train, test = spec.train_set(str(root)), spec.test_set(str(root))
    assert len(train) == 20 and len(test) == 6
    image, label = test[2]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    # the test image is the stored one, normalized: pixel (c, y, x) of row 2 of test_batch
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        stored = pickle.load(f)
    raw = torch.tensor(stored["data"][2], dtype=torch.float32).view(3, 32, 32) / 255
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])
    assert torch.allclose(image, (raw - mean[:, None, None]) / std[:, None, None], atol=1e-6)
    assert label == stored["labels"][2]
    # training augmentation (crop with padding, flip) draws from the RNG
    torch.manual_seed(0)
    first = train[0][0]
    torch.manual_seed(0)
    assert torch.equal(first, train[0][0])
    assert any(not torch.equal(first, train[0][0]) for _ in range(5))


def test_cifar10_checks_like_torchvision_and_says_how_to_get_the_data(tmp_path):
    root = write_cifar10(tmp_path / "cifar")
    spec = Cifar10()  # verify: the files' MD5 sums must be CIFAR-10's
    with pytest.raises(ConfigError, match=r"data_batch_1: its MD5 sum is .*verify: false"):
        spec.train_set(str(root))
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(ConfigError, match=r"cifar-10-batches-py/test_batch not found; download"):
        Cifar10(verify=False).test_set(str(root))
    with pytest.raises(ConfigError, match=r"^data\.root: the cifar10 dataset needs data\.root"):
        spec.check(None)
    Cifar10(download=True).check(str(tmp_path / "empty"))  # fetched when asked, not checked


def python2_pickle(entry: dict) -> bytes:
    """``entry`` (str keys; str, int, list and uint8-array values) pickled as Python 2's
    cPickle wrote CIFAR-10's original files: protocol 2, byte strings (``U``/``T``
    opcodes) for keys, names and pixel data, and NumPy 1's
    ``numpy.core.multiarray._reconstruct`` followed by the array's state."""

    def string(value: bytes) -> bytes:
        if len(value) < 256:
            return b"U" + bytes([len(value)]) + value
        return b"T" + struct.pack("<i", len(value)) + value

    def pickled(value) -> bytes:
        if isinstance(value, str):
            return string(value.encode())
        if isinstance(value, int):
            return b"J" + struct.pack("<i", value)
        if isinstance(value, list):
            return b"](" + b"".join(pickled(v) for v in value) + b"e"
        shape = b"(" + b"".join(pickled(int(n)) for n in value.shape) + b"t"
        dtype_state = b"(K\x03" + string(b"|") + b"NNN" + pickled(-1) + pickled(-1) + b"K\x00t"
        dtype = b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R" + dtype_state + b"b"
        state = b"(K\x01" + shape + dtype + b"\x89" + string(value.tobytes()) + b"t"
        reconstruct = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        return reconstruct + b"K\x00\x85" + string(b"b") + b"\x87R" + state + b"b"

    items = b"".join(pickled(key) + pickled(value) for key, value in entry.items())
    return b"\x80\x02}(" + items + b"u."


def test_cifar10_reads_the_original_python2_files_and_numpy2_pickles(tmp_path):
    rng = np.random.default_rng(3)
    original, modern = tmp_path / "original", tmp_path / "modern"
    batches = {}
    for name in [*Cifar10.TRAIN_FILES, "test_batch"]:
        batches[name] = {
            "batch_label": f"{name} of 5",
            "labels": [int(v) for v in rng.integers(0, 10, 3)],
            "data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(3)],
        }
    meta = {"label_names": ["airplane"] * 10, "num_vis": 3072}
    for root, write in (
        (original, python2_pickle),
        (modern, lambda entry: pickle.dumps(entry, protocol=5)),
    ):
        (root / "cifar-10-batches-py").mkdir(parents=True)
        for name, entry in {**batches, "batches.meta": meta}.items():
            (root / "cifar-10-batches-py" / name).write_bytes(write(entry))
    assert (
        b"numpy.core.multiarray" in (original / "cifar-10-batches-py" / "test_batch").read_bytes()
    )
    spec = Cifar10(verify=False, augment=False)
    for root in (original, modern):
        test = spec.test_set(str(root))
        raw = torch.tensor(batches["test_batch"]["data"][1], dtype=torch.float32) / 255
        mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
        expected = (raw.view(3, 32, 32) - mean[:, None, None]) / std[:, None, None]
        assert torch.allclose(test[1][0], expected, atol=1e-6)
        assert test[1][1] == batches["test_batch"]["labels"][1]
        train = spec.train_set(str(root))
        assert [train[i][1] for i in range(15)] == sum(
            (batches[name]["labels"] for name in Cifar10.TRAIN_FILES), []
        )


class RunsAShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("verify", [False, True])
def test_cifar10_never_runs_code_from_its_files(tmp_path, verify):
    root = write_cifar10(tmp_path / "cifar")
    marker = tmp_path / "ran"
    evil = {"data": RunsAShellCommand(marker), "labels": [0]}
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(ConfigError) as error:
        Cifar10(verify=verify).test_set(str(root))
    message = str(error.value)
    assert "\n" not in message and "test_batch" in message
    assert ("system, which is not part of CIFAR-10's format" in message) != verify
    assert ("MD5 sum" in message) == verify
    assert not marker.exists()


def test_cifar10_files_of_another_shape_are_one_line_naming_the_file(tmp_path):
    root = write_cifar10(tmp_path / "cifar")
    test_batch = root / "cifar-10-batches-py" / "test_batch"
    for content, expected in (
        (pickle.dumps({"data": np.zeros((2, 5), np.uint8), "labels": [0, 1]}), "N×3072"),
        (pickle.dumps([1, 2, 3]), "holds a list"),
        (b"\x80\x04not a pickle at all", "not a CIFAR-10 batch file"),
        (pickle.dumps({"data": np.zeros((1, 3072), np.uint8)})[:40], "not a CIFAR-10 batch"),
    ):
        test_batch.write_bytes(content)
        with pytest.raises(ConfigError, match=expected) as error:
            Cifar10(verify=False).test_set(str(root))
        assert str(test_batch) in str(error.value) and "\n" not in str(error.value)


def write_image_folder(root: Path, classes: dict[str, int]) -> None:
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for index, (name, count) in enumerate(classes.items()):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
                extension = "png" if (i + index) % 2 else "jpg"
                Image.fromarray(pixels).save(folder / f"img{i}.{extension}")


def test_imagenet_reads_image_folders_of_png_and_jpeg(tmp_path):
    write_image_folder(tmp_path, {"n01": 3, "n02": 2, "n03": 2})
    spec = registry().create("dataset", "imagenet", {"image_size": 16, "resize": 18}, "data")
    assert isinstance(spec, ImageNet)
    spec.check(str(tmp_path))
    assert spec.num_classes(str(tmp_path)) == 3
    train, val = spec.train_set(str(tmp_path)), spec.test_set(str(tmp_path))
    assert len(train) == 7 and len(val) == 7
    assert sorted({label for _, label in val}) == [0, 1, 2]
    for dataset in (train, val):
        image, _ = dataset[3]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    torch.manual_seed(0)
    first = train[0][0]
    torch.manual_seed(0)
    assert torch.equal(first, train[0][0])  # RandomResizedCrop + flip, from the RNG
    assert torch.equal(val[0][0], val[0][0])  # Resize + CenterCrop: fixed


def test_imagenet_errors_name_the_folder(tmp_path):
    spec = ImageNet()
    with pytest.raises(ConfigError, match=r"data\.root: .*/train not found; get ILSVRC-2012"):
        spec.check(str(tmp_path))
    write_image_folder(tmp_path, {"n01": 1})
    (tmp_path / "val" / "n01b").mkdir()
    with pytest.raises(ConfigError, match=r"different class folders \(e\.g\. 'n01b'"):
        spec.check(str(tmp_path))
    with pytest.raises(ConfigError, match=r"data\.options: dataset 'imagenet': expected 1 <= "):
        registry().create("dataset", "imagenet", {"image_size": 300}, "data")


def test_digits_is_a_fixed_seeded_split_of_normalized_8x8_images():
    spec = registry().create("dataset", "digits", {}, "data")
    assert isinstance(spec, Digits) and spec.num_classes(None) == 10
    train, test = spec.train_set(None), spec.test_set(None)
    assert len(train) + len(test) == 1797 and len(test) == round(1797 * 0.2)
    image, label = test[0]
    assert image.shape == (1, 8, 8) and isinstance(label, int)
    # normalized with the training split's statistics
    plain = Digits(shift=0).train_set(None)
    stacked = torch.stack([plain[i][0] for i in range(len(plain))])
    assert abs(float(stacked.mean())) < 1e-4 and abs(float(stacked.std()) - 1) < 1e-3
    # the split is fixed by split_seed, and the two parts do not overlap
    again = Digits().test_set(None)
    assert all(torch.equal(test[i][0], again[i][0]) for i in range(20))
    other = Digits(split_seed=1).test_set(None)
    assert not all(torch.equal(test[i][0], other[i][0]) for i in range(20))
    train_images = {tuple(train.images[i].flatten().tolist()) for i in range(len(train))}
    test_images = [tuple(test.images[i].flatten().tolist()) for i in range(len(test))]
    assert sum(image in train_images for image in test_images) < 10  # only true duplicates
    # the augmentation shifts by at most a pixel, filling with blank (0) pixels
    padded = torch.nn.functional.pad(train.images[5], (1, 1, 1, 1))
    candidates = [
        (padded[:, 1 + dy : 9 + dy, 1 + dx : 9 + dx] - train.mean) / train.std
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    ]
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        image = train[5][0]
        matches = [i for i, c in enumerate(candidates) if torch.allclose(image, c)]
        assert matches
        seen.add(matches[0])
    assert len(seen) > 3


def test_digits_without_scikit_learn_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails
    with pytest.raises(
        ConfigError, match=r'data\.name: .*scikit-learn.*pip install -e "\.\[demo\]"'
    ):
        Digits().check(None)
