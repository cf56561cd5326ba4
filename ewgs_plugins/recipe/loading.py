"""Recipe files: read, check and expand into runs."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .. import recipes
from ..errors import ConfigError
from .matrix import Run, expand_runs
from .schema import Recipe
from .yaml_text import MAX_CHARACTERS, parse_yaml


def load_runs(
    path: str | Path, overrides: Iterable[str] = (), problems: list[ConfigError] | None = None
) -> list[Run]:
    """Read, check and expand a recipe file (or a shipped recipe by name, ``demo/digits``)
    into its runs. With ``problems``, a run that fails its checks is left out and its
    error appended there (each message once) instead of raised."""
    source = str(path)
    file = recipes.find(path)
    try:
        with open(file, "rb") as handle:  # no more than a recipe may hold
            data = handle.read(4 * MAX_CHARACTERS + 1)
        if len(data) > 4 * MAX_CHARACTERS:
            raise ConfigError(
                "", f"more than {4 * MAX_CHARACTERS} bytes: too large for a recipe", source
            )
        text = data.decode()
    except FileNotFoundError:
        raise ConfigError("", "recipe file not found", source) from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            "",
            f"not a text (UTF-8) file: byte {error.start} is {error.object[error.start]:#x}",
            source,
        ) from None
    except OSError as error:
        raise ConfigError(
            "", f"cannot read the recipe: {error.strerror or error}", source
        ) from None
    return expand_runs(
        parse_yaml(text, source),
        source=source,
        overrides=overrides,
        default_output=str(Path("runs") / Path(file.name).stem),
        problems=problems,
    )


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """The single run of a recipe file (a matrix must expand into exactly one run)."""
    runs = load_runs(path, overrides)
    if len(runs) != 1:
        raise ConfigError(
            "matrix",
            f"expands into {len(runs)} runs; train them all with `ewgs compare`, or pick "
            "one with overrides (matrix=null method.name=... backward=...)",
            str(path),
        )
    return runs[0].recipe
