"""The recipes in ``recipes/`` are valid, say which paper result they reproduce, and
train with the real methods and models (on small data in the real formats)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from test_data import write_cifar10, write_image_folder

from ewgs_plugins import cli
from ewgs_plugins.recipe import expand_runs, load_runs
from ewgs_plugins.registry import registry
from ewgs_plugins.results import find_runs

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
#: runs per recipe: methods × backward rules (× bit-widths, × seeds)
RUNS = {
    "digits": 24,
    "resnet20_fp": 1,
    "resnet18": 32,
    "resnet34": 32,
    "digits_profit": 6,
    "resnet20_w1a1_short": 12,
}
#: recipes of the paper's two CIFAR-10 rows only (its interval quantizer and DoReFa)
PAPER_ROWS = {"resnet20_w1a1_short"}
#: recipes of PROFIT's training strategy: PROFIT alone, under STE and EWGS
PROFIT_RECIPES = {"mobilenet_v2_w4a4_profit": 2, "resnet20_w4a4_profit": 2, "digits_profit": 6}
#: the EWGS-vs-STE studies: one method, four arms (matrix.arms) × three seeds
STUDY_RECIPES = {
    "resnet20_w1a1_study": "interval",
    "resnet20_w1a1_study_dev": "interval",
    "resnet20_w1a1_dorefa_study": "dorefa",
    "resnet20_w1a1_dorefa_study_dev": "dorefa",
}

#: the δ map's other arms: one method, fixed δ sizes or another optimizer
MAP_RECIPES = {"resnet20_w1a1_delta_map_dev", "resnet20_w1a1_sgd_dev"}


def local_files(path: Path, tmp_path: Path) -> list[str]:
    """Overrides that point a recipe at small data in its real format and at a real
    full-precision state_dict of its model."""
    raw = yaml.safe_load(path.read_text())
    overrides = []
    if raw["data"]["name"] == "cifar10":
        write_cifar10(tmp_path / "cifar")
        overrides += [f"data.root={tmp_path / 'cifar'}", "data.options.verify=false"]
    if raw["data"]["name"] == "imagenet":
        write_image_folder(tmp_path / "imagenet", {"n01": 2, "n02": 2})
        overrides += [f"data.root={tmp_path / 'imagenet'}", "data.options.image_size=32"]
        overrides += ["data.options.resize=36"]
    classes = 10 if raw["data"]["name"] == "cifar10" else 2
    if raw["model"].get("weights"):
        model = registry().create("model", raw["model"]["name"], {"num_classes": classes})
        torch.save(model.state_dict(), tmp_path / "fp.pth")
        overrides.append(f"model.weights={tmp_path / 'fp.pth'}")
    teacher = raw.get("callbacks", {}).get("distill", {}).get("teacher")
    if teacher:  # validation checks that the file is there; training reads it (see below)
        torch.save({}, tmp_path / "teacher.pth")
        overrides.append(f"callbacks.distill.teacher.weights={tmp_path / 'teacher.pth'}")
    return overrides + [f"output={tmp_path / 'runs'}", "data.workers=0"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_shipped_recipe_is_valid_and_names_its_paper_result(path, tmp_path):
    text = path.read_text()
    if path.parent.name != "demo":
        assert re.search(
            r"# Reproduces: (the paper's (CIFAR-10|ImageNet) |no published result)", text
        )
    runs = load_runs(path, local_files(path, tmp_path))
    if path.stem == "resnet20_w1a1_delta_map_dev":  # STE and four fixed-δ arms × 3 seeds
        assert len(runs) == 15 and {r.recipe.method.name for r in runs} == {"interval"}
        assert {r.recipe.delta.name for r in runs if r.recipe.backward == "ewgs"} == {"fixed"}
    elif path.stem == "resnet20_w1a1_sgd_dev":  # STE and the Hessian δ × 3 seeds, SGD
        assert len(runs) == 6 and {r.recipe.method.name for r in runs} == {"interval"}
        assert {r.recipe.optimizers.weights.name for r in runs} == {"sgd"}
        assert {r.recipe.optimizers.quantizer.name for r in runs} == {"adam"}
    elif path.stem in STUDY_RECIPES:
        assert len(runs) == 12
        assert {r.recipe.method.name for r in runs} == {STUDY_RECIPES[path.stem]}
    else:
        assert len(runs) == PROFIT_RECIPES.get(path.stem, RUNS.get(path.stem, 8))
    if path.stem in PROFIT_RECIPES:
        assert {r.recipe.method.name for r in runs} == {"profit"}
        assert all("profit" in r.recipe.callbacks for r in runs)
    elif path.stem in PAPER_ROWS:
        assert {r.recipe.method.name for r in runs} == {"interval", "dorefa"}
    elif path.stem not in ("resnet20_fp", *MAP_RECIPES, *STUDY_RECIPES):
        assert {r.recipe.method.name for r in runs} == {"interval", "dorefa", "lsq", "profit"}
    if path.stem != "resnet20_fp":
        assert {r.recipe.backward for r in runs} == {"ste", "ewgs"}


def test_the_paper_settings_are_in_the_recipes():
    cifar = read_yaml(ROOT / "recipes" / "cifar10" / "resnet20_w2a2.yaml")
    assert cifar["epochs"] == 400 and cifar["data"]["batch_size"] == 256
    assert cifar["optimizers"]["weights"] == {"name": "adam", "lr": 1e-3, "weight_decay": 1e-4}
    assert cifar["optimizers"]["quantizer"] == {"name": "adam", "lr": 1e-5, "weight_decay": 0.0}
    assert cifar["delta"]["options"] == {"every": 10, "unit": "epoch", "batches": 3}
    imagenet = read_yaml(ROOT / "recipes" / "imagenet" / "resnet18.yaml")
    assert imagenet["epochs"] == 100 and imagenet["data"]["batch_size"] == 256
    weights = imagenet["optimizers"]["weights"]
    assert (weights["name"], weights["lr"], weights["momentum"]) == ("sgd", 1e-2, 0.9)
    assert weights["weight_decay"] == 1e-4 and weights["nesterov"] is False
    assert imagenet["delta"]["batch_size"] == 16
    assert imagenet["delta"]["options"] == {"every": 1, "unit": "epoch", "batches": 10}


def test_the_short_w1a1_recipe_keeps_the_papers_settings_but_the_schedule():
    paper = read_yaml(ROOT / "recipes" / "cifar10" / "resnet20_w1a1.yaml")
    short = read_yaml(ROOT / "recipes" / "cifar10" / "resnet20_w1a1_short.yaml")
    for key in ("optimizers", "schedule", "bits", "method"):
        assert short[key] == paper[key], key
    assert short["data"]["batch_size"] == paper["data"]["batch_size"] == 256
    assert short["model"]["name"] == "resnet20" and short["model"]["weights"]
    assert short["delta"]["name"] == "hessian" and short["delta"]["options"]["batches"] == 3
    assert short["epochs"] < 10 and len(short["matrix"]["seed"]) >= 3
    assert set(short["matrix"]["backward"]) == {"ste", "ewgs"}


@pytest.mark.parametrize("name", ["resnet20_w1a1_study", "resnet20_w1a1_dorefa_study"])
def test_the_studies_run_the_papers_protocol_at_both_scales(name, tmp_path):
    """Four arms over three seeds, run seed by seed (a study cut short stays paired); δ = 0
    until the first Hessian estimate after 2.5 % of training, then one every 2.5 % (the
    paper's 10 of 400 epochs) at full scale; the development version on the 10,000
    development images, 40 steps an epoch, estimates every 10 % (what a CPU affords)."""
    for stem, steps_per_epoch in ((name, None), (f"{name}_dev", math.ceil(10_000 / 256))):
        path = ROOT / "recipes" / "cifar10" / f"{stem}.yaml"
        loaded = load_runs(path, local_files(path, tmp_path / stem))
        assert [r.recipe.seed for r in loaded] == [0] * 4 + [1] * 4 + [2] * 4
        runs = {r.name.split("-", 1)[1] + "-" + r.name.split("-", 1)[0]: r.recipe for r in loaded}
        arms = {n.rsplit("-", 1)[0] for n in runs}
        fixed = "ewgs-fixed-1e-3" if STUDY_RECIPES[stem] == "interval" else "ewgs-fixed-1e-2"
        assert arms == {"ste", "ewgs-paper", "ewgs-first-step", fixed}
        assert {r.seed for r in runs.values()} == {0, 1, 2}
        assert all("mechanism" in r.callbacks for r in runs.values())
        paper = runs["ewgs-paper-seed0"]
        assert paper.backward == "ewgs" and paper.delta.name == "hessian"
        assert paper.delta.options.get("initial_value", 0.0) == 0.0
        every = paper.delta.options["every"]
        if paper.delta.options["unit"] == "epoch":
            assert every / paper.epochs == 10 / 400
        else:
            assert every / (paper.epochs * steps_per_epoch) == 1 / 10
            assert paper.epochs >= 20
        first = runs["ewgs-first-step-seed0"].delta
        assert first.options == {**paper.delta.options, "before_training": True}
        assert runs[f"{fixed}-seed0"].delta.name == "fixed"
        assert runs["ste-seed0"].backward == "ste"


def read_yaml(path: Path) -> dict:
    return read_yaml_text(path.read_text())


def read_yaml_text(text: str) -> dict:
    from ewgs_plugins.recipe import parse_yaml

    return parse_yaml(text, "test")


def test_the_cifar10_recipes_train_from_the_full_precision_recipes_checkpoint(tmp_path):
    from ewgs_plugins.train import Trainer

    write_cifar10(tmp_path / "cifar")
    data = [f"data.root={tmp_path / 'cifar'}", "data.options.verify=false", "data.workers=0"]
    small = ["epochs=1", "data.batch_size=8"]
    fp_path = ROOT / "recipes" / "cifar10" / "resnet20_fp.yaml"
    (fp,) = load_runs(fp_path, [*data, *small, f"output={tmp_path / 'fp'}"])
    Trainer(fp.recipe).run()
    checkpoint = tmp_path / "fp" / "checkpoint_last.pt"
    hessian = ["delta.options.every=1", "delta.options.samples=2"]
    # PROFIT quantizes the first and last layers too; its strategy with a short schedule
    short = "callbacks.profit={sample_epochs: 1, stage_epochs: [1, 1], freeze: [0, 1/2]}"
    profit = ["epochs=3", short, f"callbacks.distill.teacher.weights={checkpoint}"]
    for name, method, more in (
        ("resnet20_w2a2", "interval", hessian),
        (
            "resnet20_w2a2",
            "profit",
            [*hessian, "epochs=2", "callbacks.profit={sample_epochs: 1, freeze: [1/3]}"],
        ),
        ("resnet20_w4a4_profit", "profit", profit),  # the teacher: the full-precision run
    ):
        path = ROOT / "recipes" / "cifar10" / f"{name}.yaml"
        overrides = [*data, *small, "matrix=null", f"method.name={method}", *more]
        overrides += [f"model.weights={checkpoint}", f"output={tmp_path / name / method}"]
        (run,) = load_runs(path, overrides)
        trainer = Trainer(run.recipe)
        state = torch.load(checkpoint, weights_only=True)["model"]
        assert torch.equal(trainer.model.state_dict()["conv1.weight"], state["conv1.weight"])
        trainer.run()
        assert trainer.finished and math.isfinite(trainer.history[-1]["train_loss"])
        if method == "profit":  # 19 quantized convs: ⌊19/2⌋ and ⌊19/3⌋ weights frozen
            last = (trainer.history[-1]["profit_phase"], trainer.history[-1]["profit_frozen"])
            assert last == (("stage 2", 9) if name.endswith("profit") else ("stage 1", 6))
    assert {"distill_loss", "ema_test_top1"} <= set(trainer.history[-1])


def test_an_imagenet_recipe_trains_from_torchvision_style_weights(tmp_path):
    from ewgs_plugins.train import Trainer

    path = ROOT / "recipes" / "imagenet" / "resnet18.yaml"
    overrides = local_files(path, tmp_path) + ["matrix=null", "epochs=1", "data.batch_size=4"]
    overrides += ["delta.batch_size=2", "delta.options.batches=1", "delta.options.samples=2"]
    (run,) = load_runs(path, overrides)
    assert run.recipe.bits.label == "W4A4" and run.recipe.method.name == "interval"
    trainer = Trainer(run.recipe)
    trainer.run()
    assert trainer.finished and math.isfinite(trainer.history[-1]["train_loss"])


def test_the_demo_trains_every_method_under_ste_and_ewgs(tmp_path, capsys):
    path = ROOT / "recipes" / "demo" / "digits.yaml"
    overrides = [f"output={tmp_path}", "epochs=1", "matrix.seed=[0]"]
    assert cli.main(["compare", str(path), *overrides]) == 0
    runs = find_runs(tmp_path)
    assert {(r.method, r.backward) for r in runs} == {
        (m, b) for m in ("interval", "dorefa", "lsq", "profit") for b in ("ste", "ewgs")
    }
    assert all(r.finished for r in runs)
    assert "| method | bits | STE | EWGS | EWGS − STE (95 % CI) | W/T/L | verdict |" in (
        capsys.readouterr().out
    )


def test_the_manuals_recipe_example_is_a_valid_recipe(tmp_path):
    text = (ROOT / "docs" / "how-to" / "recipes.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "matrix:" in b)
    raw = read_yaml_text(block)
    raw["data"] = {"name": "digits"}
    raw["model"] = {"name": "digits_cnn"}
    raw["output"] = str(tmp_path)
    runs = expand_runs(raw, source="recipes.md")
    assert len(runs) == 4 * 2 * 3


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipes_need_nothing_outside_the_repository(path):
    """Weights by registered name (or a run of a shipped recipe); data under data/, or
    downloaded; no path outside the checkout."""
    text = path.read_text()
    assert "../" not in text and "/work" not in text
    raw = yaml.safe_load(text)
    for value in (raw["model"].get("weights"), *_teacher_weights(raw)):
        if value is not None:
            assert value in registry().names("weights") or value.startswith("runs/"), value


def _teacher_weights(raw: dict) -> list[str]:
    teacher = (raw.get("callbacks") or {}).get("distill", {}) or {}
    return [teacher["teacher"]["weights"]] if "teacher" in teacher else []


@pytest.mark.parametrize("name", ["resnet20_w1a1_study_dev", "resnet20_w1a1_dorefa_study_dev"])
def test_the_dev_studies_carve_their_subset_out_of_the_standard_download(name, tmp_path):
    path = ROOT / "recipes" / "cifar10" / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["model"]["weights"] == "resnet20"
    assert raw["data"]["root"] == "data/cifar10" and raw["data"]["options"] == {"download": True}
    assert (raw["data"]["train"], raw["data"]["val"]) == ("train[0:10000]", "train[10000:12000]")
    # a local copy holding only the subset (training files = 0..9,999, test_batch =
    # 10,000..11,999) reads the same images as a plain root with its default split
    write_cifar10(tmp_path / "dev", per_batch=2, test=4)
    local = [f"data.root={tmp_path / 'dev'}", "data.options={verify: false}"]
    local += ["data.train=train", "data.val=test", f"output={tmp_path / 'runs'}"]
    runs = load_runs(path, local)
    spec = runs[0].recipe.make_dataset()
    assert len(spec.train_set(runs[0].recipe.data.root)) == 10
    assert len(spec.test_set(runs[0].recipe.data.root)) == 4
