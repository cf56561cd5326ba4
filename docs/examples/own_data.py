"""STE against EWGS on your own data: a folder of images per class, an .npz of arrays,
and a dataset plugin of your own. Writes tiny synthetic data to a temporary folder,
compares the two backward rules for one method (one epoch each), and checks that each
comparison wrote its report. Runs in well under a minute on a CPU."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from ewgs_plugins import cli, hookimpl, register_plugin
from ewgs_plugins.data import DatasetSpec, TensorImages

rng = np.random.default_rng(0)


def images(label: int, count: int, size: int) -> np.ndarray:
    """``count`` noisy RGB images; class 1 is brighter than class 0."""
    base = 70 + 110 * label
    return rng.normal(base, 40, (count, size, size, 3)).clip(0, 255).astype(np.uint8)


def write_image_folder(root: Path) -> None:
    """ROOT/train/<class>/*.png and ROOT/val/<class>/*.png, images of any size."""
    for split, count in (("train", 48), ("val", 16)):
        for label, name in enumerate(("dark", "bright")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):  # sizes differ: every image is resized to image_size
                (pixels,) = images(label, 1, 20 + i % 5)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def write_npz(path: Path) -> None:
    """x_train (N, H, W, C) uint8 with y_train labels; no test arrays: validation is
    held out of the training arrays by index (data.val: train[80:96])."""
    x = np.concatenate([images(label, 48, 12) for label in (0, 1)])
    y = np.repeat([0, 1], 48)
    order = rng.permutation(len(y))
    np.savez(path, x_train=x[order], y_train=y[order])


class Stripes(DatasetSpec):
    """A dataset plugin: horizontal against vertical stripes, made in memory."""

    def __init__(self, count: int = 64) -> None:
        self.count = count

    def _set(self, seed: int) -> TensorImages:
        generator = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 2, (self.count,), generator=generator)
        stripes = (torch.arange(8) % 2).float().expand(8, 8)
        images = torch.stack([stripes if y else stripes.T for y in labels]).unsqueeze(1)
        images = images + 0.3 * torch.randn(images.shape, generator=generator)
        return TensorImages(images, labels, mean=0.5, std=0.5)

    def num_classes(self, root: str | None) -> int:
        return 2

    def train_set(self, root: str | None) -> TensorImages:
        return self._set(0)

    def test_set(self, root: str | None) -> TensorImages:
        return self._set(1)


class StripesPlugin:
    @hookimpl
    def ewgs_datasets(self):
        return {"stripes": Stripes}


def compare(folder: Path, data: dict, in_channels: int) -> dict:
    """STE and EWGS for one method (interval, W2A2), one epoch each; the report's numbers."""
    recipe = {
        "model": {"name": "digits_cnn", "options": {"width": 8, "in_channels": in_channels}},
        "data": {"batch_size": 16, **data},
        "method": "interval",
        "backward": "ewgs",
        "bits": "W2A2",
        "epochs": 1,
        "delta": {"name": "hessian", "options": {"every": 2, "unit": "step", "batches": 1}},
        "device": "cpu",
        "output": str(folder / "runs"),
        "matrix": {"backward": ["ste", "ewgs"]},
    }
    folder.mkdir()
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert cli.main(["compare", str(path)]) == 0
    assert (folder / "runs" / "report.md").is_file()
    return json.loads((folder / "runs" / "summary.json").read_text())


with tempfile.TemporaryDirectory() as temporary:
    tmp = Path(temporary)
    write_image_folder(tmp / "pictures")
    folder = compare(
        tmp / "folder",
        {"name": "imagefolder", "root": str(tmp / "pictures"), "options": {"image_size": 16}},
        in_channels=3,
    )
    assert folder["evaluated"] == "official test set"

    write_npz(tmp / "arrays.npz")
    arrays = compare(
        tmp / "npz",
        {
            "name": "npz",
            "root": str(tmp / "arrays.npz"),
            "train": "train[0:80]",
            "val": "train[80:96]",
        },
        in_channels=3,
    )
    assert arrays["evaluated"] == "validation from train[80:96]"

    register_plugin(StripesPlugin(), "stripes-example")
    plugin = compare(tmp / "plugin", {"name": "stripes"}, in_channels=1)
    assert plugin["rules"] == ["ste", "ewgs"]
    print("three comparisons, each with report.md and summary.json")
