"""The recipes shipped with ewgs-plugins, addressable by name.

Installed as ``ewgs_plugins.recipes``: the file ``demo/digits.yaml`` of this folder is
the recipe ``demo/digits``, so ``ewgs compare demo/digits`` runs it from anywhere. A
recipe's description is the first sentence of its leading comment.
"""

from __future__ import annotations

import difflib
import re
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from ..errors import ConfigError

SUFFIX = ".yaml"


def shipped() -> dict[str, Traversable]:
    """Every shipped recipe by name (``demo/digits``), sorted."""
    found: dict[str, Traversable] = {}
    for folder in files(__name__).iterdir():
        if folder.is_dir():
            for file in folder.iterdir():
                if file.name.endswith(SUFFIX):
                    found[f"{folder.name}/{file.name[: -len(SUFFIX)]}"] = file
    return dict(sorted(found.items()))


def description(text: str, width: int = 72) -> str:
    """The first sentence of a recipe's leading comment, cut to ``width`` characters."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    comment = " ".join(line for line in lines if line)
    sentence = re.split(r"(?<=[.!?])\s", comment, maxsplit=1)[0]
    if len(sentence) <= width:
        return sentence
    return sentence[: width - 1].rsplit(" ", 1)[0] + "…"


def find(recipe: str | Path) -> Path | Traversable:
    """The recipe file ``recipe`` names: a path that exists, else the shipped recipe of
    that name (``demo/digits``; ``recipes/demo/digits.yaml`` names it too). Neither: a
    ConfigError listing the shipped recipes with close names."""
    path = Path(recipe)
    if path.exists():
        return path
    name = str(recipe).removesuffix(SUFFIX)
    name = name.removeprefix("recipes/")
    recipes = shipped()
    if name in recipes:
        return recipes[name]
    close = difflib.get_close_matches(name, recipes, n=3, cutoff=0.6)
    hint = f"close names: {', '.join(close)}" if close else "`ewgs recipes` lists them"
    raise ConfigError(
        "", f"recipe file not found, nor a shipped recipe of that name ({hint})", str(recipe)
    )
