"""Runs that survive faults, concurrency and hostile files (issue 12): every case of
the issue as a test. A user's mistake or a broken environment is one line and exit
status 2; a killed run resumes to the same result; nothing is left half-written."""

from __future__ import annotations

import json
from pathlib import Path

from test_core_readme import readme_plugin_source
from toys import make_distribution

from ewgs_plugins import cli

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo" / "digits.yaml"


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ewgs: error: "), err
    return lines[0]


# ------------------------------------------------------------------------- plugins


def test_ewgs_plugins_lists_what_loaded_and_names_what_failed(site_packages, capsys):
    make_distribution(site_packages, "ewgs-broken", "ewgs_broken", "import not_a_module_anywhere\n")
    make_distribution(
        site_packages,
        "ewgs-raises",
        "ewgs_raises",
        """
        from ewgs_plugins import hookimpl

        @hookimpl
        def ewgs_models():
            raise RuntimeError("no models today")
        """,
    )
    assert cli.main(["plugins"]) == 2
    out, err = capsys.readouterr()
    assert "  ewgs             plugin core (ewgs-plugins)" in out  # the rest still listed
    assert "  digits           plugin datasets (ewgs-plugins)" in out
    failed = err.strip().splitlines()
    assert len(failed) == 2, err
    assert "plugin 'ewgs_broken' (distribution ewgs-broken" in failed[0]
    assert "ModuleNotFoundError" in failed[0] and "not_a_module_anywhere" in failed[0]
    assert "plugin 'ewgs_raises' failed while registering models" in failed[1]
    # training still refuses to run with a broken plugin installed (strict registry)
    assert cli.main(["train", str(DEMO), "matrix=null"]) == 2
    assert "ewgs_broken" in one_error_line(capsys.readouterr().err)


def test_two_entry_points_naming_one_module_is_one_line(site_packages, capsys):
    source = """
        from ewgs_plugins import hookimpl
        from ewgs_plugins.backward import StraightThrough

        @hookimpl
        def ewgs_backward_rules():
            return {"my-ste": StraightThrough}
        """
    make_distribution(site_packages, "ewgs-mine", "ewgs_mine", source)
    info = site_packages / "ewgs_mine_again-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ewgs-mine-again\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ewgs_plugins]\nmine_again = ewgs_mine\n")
    assert cli.main(["plugins"]) == 2
    out, err = capsys.readouterr()
    assert "my-ste" in out
    line = one_error_line(err)
    assert "'mine_again'" in line and "'ewgs_mine'" in line
    assert "remove one of the two entry points" in line


# ------------------------------------------------------------ the README's example


def final_top1(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["test_top1"]


def test_the_readme_method_trains_like_a_built_in_one(site_packages, capsys):
    """Installed as a real distribution (entry point), the README's example trains the
    digits demo to within a few points of DoReFa (whose quantizer it simplifies);
    before the fix its weight quantizer sent every weight to 0 (chance, ~10 %)."""
    make_distribution(site_packages, "my-quant", "my_quant", readme_plugin_source())
    common = [f"{DEMO}", "matrix=null", "backward=ste", "epochs=6", "device=cpu"]
    for method in ("uniform", "dorefa"):
        output = f"output={site_packages / method}"
        assert cli.main(["train", *common, f"method={method}", output]) == 0
    uniform, dorefa = final_top1(site_packages / "uniform"), final_top1(site_packages / "dorefa")
    assert uniform > 70 and uniform > dorefa - 6, (uniform, dorefa)
