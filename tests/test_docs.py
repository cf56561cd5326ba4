"""The manual cannot drift from the code: nothing in the tree names a path outside it or
the development history, every example of the manual runs, every page of its navigation
exists, and the generated references hold every recipe key and every command."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from ewgs_plugins import reference
from ewgs_plugins.recipe.schema import Recipe

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = sorted((DOCS / "examples").glob("*.py"))

#: what no text in the repository may contain, with why (history belongs in CHANGELOG.md)
FORBIDDEN = {
    r"\.\./shared": "a folder beside the checkout",
    r"(?<![\w.~])/(?:work|root|home)/": "an absolute path of a machine",
    r"\b(?:DESIGN|REFERENCE|FINDINGS)\.md\b|\bDESIGN\b": "design notes outside the repository",
    r"\b[Ii]ssue #?\d+": "the development history (an issue)",
    r"(?i)\b(?:first|second|third|fourth|fifth|sixth|seventh) round\b|\b[Rr]ound \d+\b": (
        "the development history (a round of work)"
    ),
}
#: files that may name history or these patterns: the changelog, and this test
EXEMPT = {"CHANGELOG.md", "tests/test_docs.py"}


def repository_files() -> list[str]:
    """Tracked files and untracked ones git does not ignore (what a commit would hold)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return sorted(set(listed) - EXEMPT)


def test_no_text_names_anything_outside_the_repository():
    offences = []
    for name in repository_files():
        path = ROOT / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:  # images and other binary files
            continue
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            for pattern, why in FORBIDDEN.items():
                if re.search(pattern, line):
                    offences.append(f"{name}:{number}: {why}: {line.strip()[:100]}")
    assert not offences, "\n".join(offences)


def test_the_patterns_catch_what_they_are_for():
    caught = [
        "see ../shared/data",
        "data.root=/work/shared/x",
        "DESIGN.md, section 2",
        "issue 15",
        "third round",
        "Round 2: what changed",
    ]
    passed = ["round(z)", "the round site", "rounds to 2 bits", "a tissue", "data/cifar10"]
    for text in caught:
        assert any(re.search(p, text) for p in FORBIDDEN), text
    for text in passed:
        assert not any(re.search(p, text) for p in FORBIDDEN), text


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_of_the_manual_runs(example: Path, tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EWGS_FUSED": os.environ.get("EWGS_FUSED", "1")}
    done = subprocess.run(
        [sys.executable, str(example)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def nav_pages(entries: typing.Any) -> list[str]:
    if isinstance(entries, str):
        return [entries]
    if isinstance(entries, list):
        return [page for entry in entries for page in nav_pages(entry)]
    if isinstance(entries, dict):
        return [page for value in entries.values() for page in nav_pages(value)]
    return []


def mkdocs_config() -> dict:
    """mkdocs.yml read as data (its tags, if any, do not matter here)."""
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)


def test_every_page_of_the_navigation_exists():
    generated = {"reference/recipe.md", "reference/cli.md"}  # written by docs/hooks/generate.py
    pages = nav_pages(mkdocs_config()["nav"])
    assert "reference/recipe.md" in pages and "reference/cli.md" in pages
    missing = [p for p in pages if p not in generated and not (DOCS / p).is_file()]
    assert not missing, missing


def test_every_page_is_in_the_navigation():
    pages = set(nav_pages(mkdocs_config()["nav"]))
    written = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert written <= pages, sorted(written - pages)


def test_every_recipe_field_says_what_it_means():
    undocumented = []

    def walk(cls: type, path: str) -> None:
        docs = reference.field_docs(cls)
        hints = typing.get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            key = f"{path}{spec.name}"
            if not docs.get(spec.name):
                undocumented.append(f"{cls.__name__}.{spec.name} ({key})")
            section, form = reference._nested(hints[spec.name])
            if section is not None:
                walk(section, f"{key}[]." if form.startswith("list") else f"{key}.")

    walk(Recipe, "")
    assert not undocumented, "add a #: comment above: " + ", ".join(undocumented)


def test_the_recipe_reference_holds_every_key_with_its_default():
    page = reference.recipe_reference_markdown()
    for key in reference.recipe_keys():
        section, _, name = key.rpartition(".")
        assert f"| `{name}` |" in page, key
        if section:
            assert f"## `{section}`" in page, key
    assert "| `batch_size` | int | `256` |" in page  # data.batch_size: type and default
    assert "## `matrix`" in page and "arms" in page


def test_a_new_recipe_key_appears_in_the_reference_with_its_doc():
    @dataclasses.dataclass(kw_only=True)
    class Extra(Recipe):
        #: a key added later
        brand_new: int = 7

    docs = reference.field_docs(Extra)
    assert docs["brand_new"] == "a key added later"
    assert docs["backward"] == reference.field_docs(Recipe)["backward"]  # inherited


def test_the_cli_reference_holds_every_command():
    page = reference.cli_reference_markdown()
    commands = reference.cli_commands()
    assert {"train", "compare", "report", "export", "summary", "plugins"} <= set(commands)
    for command in commands:
        assert f"## `ewgs {command}`" in page, command
    assert "--resume" in page and "--format" in page


def test_the_readme_example_is_the_tested_example():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert (DOCS / "examples" / "readme_example.py").read_text() in blocks


def test_the_readme_is_short_and_links_into_the_manual():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for target in re.findall(r"\]\(((?:docs/|bench/)[^)#]+)", readme):
        assert (ROOT / target).is_file(), target
