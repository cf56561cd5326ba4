"""Splits by index (``data.train: train[a:b]``, ``data.val: train[c:d]`` or ``test``),
class subsets of image folders, and the ``imagefolder`` and ``npz`` datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_data import write_cifar10, write_image_folder
from toys import digits_recipe, toy_plugins, write_recipe

from ewgs_plugins.data import (
    Cifar10,
    ImageFolderData,
    ImageNet,
    Npz,
    SplitDataset,
    check_splits,
    evaluated_split,
    with_splits,
)
from ewgs_plugins.errors import ConfigError
from ewgs_plugins.recipe import load_recipe
from ewgs_plugins.registry import registry

ranges = st.tuples(st.integers(0, 60), st.integers(1, 60)).map(lambda p: (p[0], p[0] + p[1]))


@given(ranges, ranges)
def test_ranges_are_accepted_exactly_when_disjoint(train, val):
    text_train, text_val = f"train[{train[0]}:{train[1]}]", f"train[{val[0]}:{val[1]}]"
    disjoint = train[1] <= val[0] or val[1] <= train[0]
    if disjoint:
        check_splits(text_train, text_val)
    else:
        with pytest.raises(ConfigError, match=r"^data\.val: train\[.* overlaps the training"):
            check_splits(text_train, text_val)


@pytest.mark.parametrize(
    ("train", "val", "message"),
    [
        ("train", "train[0:10]", r"^data\.val: train\[0:10\] overlaps the training images"),
        ("train[5:]", "train[0:6]", r"^data\.val: train\[0:6\] overlaps"),
        ("train[3:3]", "test", r"^data\.train: train\[3:3\]: the range is empty"),
        ("train[0:10", "test", r"^data\.train: expected train or a range"),
        ("test", "test", r"^data\.train: expected train or a range"),
        ("train", "val", r"^data\.val: expected test or a range"),
    ],
)
def test_bad_splits_are_one_line_at_their_key(train, val, message):
    with pytest.raises(ConfigError, match=message) as error:
        check_splits(train, val)
    assert "\n" not in str(error.value)


def test_cifar10_ranges_are_exact_disjoint_and_leave_the_test_set_alone(tmp_path):
    root = str(write_cifar10(tmp_path / "cifar", per_batch=4, test=6))  # 20 training images
    spec = with_splits(Cifar10(verify=False), "train[0:12]", "train[12:20]")
    assert isinstance(spec, SplitDataset)
    spec.check(root)
    train, val = spec.train_set(root), spec.test_set(root)
    assert (len(train), len(val)) == (12, 8)
    assert set(train.indices).isdisjoint(val.indices)
    plain = Cifar10(verify=False).eval_train_set(root)
    for i in range(8):  # the held-out images, without augmentation, in order
        assert torch.equal(val[i][0], plain[12 + i][0]) and val[i][1] == plain[12 + i][1]
    whole = with_splits(Cifar10(verify=False), "train[0:12]", "test")
    assert len(whole.test_set(root)) == 6  # the official test set, untouched


def test_out_of_range_is_caught_before_any_data_is_read(tmp_path):
    root = str(write_cifar10(tmp_path / "cifar", per_batch=4, test=6))
    spec = with_splits(Cifar10(verify=False), "train[0:12]", "train[12:30]")
    with pytest.raises(ConfigError, match=r"^data\.val: train\[12:30\] is out of range: .* 20 "):
        spec.test_set(root)
    # verified CIFAR-10 has 50,000 training images: checked from file names alone
    checked = with_splits(Cifar10(download=True), "train[0:60000]", "test")
    with pytest.raises(ConfigError, match=r"^data\.train: train\[0:60000\] is out of range"):
        checked.check(str(tmp_path / "not-there-yet"))


def test_the_recipe_says_what_is_evaluated(tmp_path):
    assert evaluated_split("test") == "official test set"
    assert evaluated_split("train[10000:12000]") == "validation from train[10000:12000]"
    with toy_plugins():
        recipe = digits_recipe(tmp_path / "run")
        recipe["data"].update(train="train[0:600]", val="train[600:700]")
        loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
        spec = loaded.make_dataset()
        assert len(spec.train_set(None)) == 600 and len(spec.test_set(None)) == 100
        recipe["data"].update(val="train[500:700]")
        with pytest.raises(ConfigError, match=r"data\.val: train\[500:700\] overlaps"):
            load_recipe(write_recipe(tmp_path / "r.yaml", recipe))


def test_report_and_summary_name_the_evaluated_split(tmp_path):
    from ewgs_plugins import rundir
    from ewgs_plugins.report import write_report

    for backward in ("ste", "ewgs"):
        run = tmp_path / backward
        run.mkdir()
        recipe = {
            "model": {"name": "m"},
            "data": {"name": "d", "train": "train[0:10]", "val": "train[10:12]"},
            "method": {"name": "toy", "options": {}},
            "backward": backward,
            "bits": {"weights": 2, "activations": 2},
            "epochs": 1,
            "seed": 0,
            "output": str(run),
        }
        rundir.write_recipe(run, recipe)
        rundir.write_metrics(run, [{"epoch": 0, "test_top1": 50.0, "train_loss": 1.0}])
    report = write_report(tmp_path)
    assert "Evaluated on: validation from train[10:12]." in report.text
    numbers = json.loads(report.summary.read_text())
    assert numbers["evaluated"] == "validation from train[10:12]"
    assert numbers["groups"][0]["evaluated"] == "validation from train[10:12]"


def test_imagenet_class_subset_and_images_per_class(tmp_path):
    write_image_folder(tmp_path, {"n01": 3, "n02": 2, "n03": 4})
    root = str(tmp_path)
    spec = ImageNet(image_size=16, resize=16, classes=["n03", "n01"], images_per_class=2)
    spec.check(root)
    assert spec.num_classes(root) == 2
    train, val = spec.train_set(root), spec.test_set(root)
    assert sorted(t for _, t in train.samples) == [0, 0, 1, 1]  # 2 images of each class
    assert all("/n03/" in p for p, t in train.samples if t == 0)
    assert sorted(t for _, t in val.samples) == [0] * 4 + [1] * 3  # validation stays whole
    assert ImageNet(classes=2).num_classes(root) == 2
    with pytest.raises(ConfigError, match=r"^data\.options\.classes: 'n09' is not a class"):
        ImageNet(classes=["n09"]).check(root)
    with pytest.raises(ConfigError, match=r"^data\.options\.classes: 5 classes asked for"):
        ImageNet(classes=5).check(root)


def test_imagefolder_reads_any_image_size(tmp_path):
    write_image_folder(tmp_path, {"cats": 3, "dogs": 2})
    spec = registry().create("dataset", "imagefolder", {"image_size": 8}, "data")
    assert isinstance(spec, ImageFolderData)
    root = str(tmp_path)
    spec.check(root)
    train, val = spec.train_set(root), spec.test_set(root)
    assert len(train) == 5 and len(val) == 5
    assert train[0][0].shape == (3, 8, 8) and val[4][0].shape == (3, 8, 8)
    with pytest.raises(ConfigError, match=r"^data\.root: .*/train not found; put one folder"):
        spec.check(str(tmp_path / "nothing"))


def test_npz_arrays_with_and_without_a_test_split(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 6, 6, 3), dtype=np.uint8)
    y = rng.integers(0, 4, 30)
    y[0] = 3
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    spec = registry().create("dataset", "npz", {}, "data")
    assert isinstance(spec, Npz)
    spec.check(str(path))
    assert spec.num_classes(str(path)) == 4
    train, test = spec.train_set(str(path)), spec.test_set(str(path))
    assert len(train) == 30 and len(test) == 5 and train[0][0].shape == (3, 6, 6)
    image = torch.from_numpy(x[2]).permute(2, 0, 1).float() / 255
    mean, std = float(torch.from_numpy(x).float().div(255).mean()), train.std
    assert torch.allclose(test[2][0], (image - mean) / std, atol=1e-5)

    only_train = tmp_path / "train_only.npz"
    np.savez(only_train, x_train=x[..., 0], y_train=y)  # grey (N, H, W)
    with pytest.raises(ConfigError, match=r"^data\.val: .* has no x_test/y_test"):
        spec.test_set(str(only_train))
    held_out = with_splits(spec, "train[0:20]", "train[20:30]")
    assert len(held_out.test_set(str(only_train))) == 10
    assert held_out.train_set(str(only_train))[0][0].shape == (1, 6, 6)
    with pytest.raises(ConfigError, match=r"^data\.options\.classes: 3 classes, but y_train"):
        Npz(classes=3).train_set(str(path))
    with pytest.raises(ConfigError, match=r"^data\.root: .*nope\.npz not found"):
        spec.check(str(tmp_path / "nope.npz"))
