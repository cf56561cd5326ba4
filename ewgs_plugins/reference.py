"""The reference pages of the manual, generated from the code so that they cannot drift
from it: every recipe key (from the schema's dataclasses and the ``#:`` comment above each
field) and every command of the CLI (from its argparse parser). The documentation build
writes them; tests call the same functions."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any

from . import cli
from .options import describe_type
from .recipe import matrix
from .recipe.schema import Recipe, Section


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: doc}`` of a dataclass: the ``#:`` comment lines right above each
    annotated field, looked up through the class's bases (a subclass that only changes
    a default keeps its base's doc). Fields without a comment are left out."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        lines, _ = inspect.getsourcelines(klass)
        source = textwrap.dedent("".join(lines))
        body = source.splitlines()
        tree = ast.parse(source)
        for node in tree.body[0].body:  # type: ignore[attr-defined]
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            comment: list[str] = []
            row = node.lineno - 2
            while row >= 0 and body[row].strip().startswith("#:"):
                comment.insert(0, body[row].strip()[2:].strip())
                row -= 1
            if comment:
                docs[node.target.id] = " ".join(comment)
    return docs


def _section(hint: Any) -> type[Section] | None:
    return hint if isinstance(hint, type) and issubclass(hint, Section) else None


def _nested(hint: Any) -> tuple[type[Section] | None, str]:
    """The section a field holds (directly, optionally or as a list) and how to write it."""
    if _section(hint):
        return hint, "mapping"
    args = typing.get_args(hint)
    plain = [a for a in args if a is not type(None)]
    if type(None) in args and len(plain) == 1 and _section(plain[0]):
        return plain[0], "mapping or null"
    if typing.get_origin(hint) is list and args and _section(args[0]):
        return args[0], "list of mappings"
    return None, describe_type(hint)


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default(spec: dataclasses.Field) -> str:
    if spec.default is not dataclasses.MISSING:
        return f"`{_yaml(spec.default)}`"
    if spec.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = spec.default_factory()  # type: ignore[misc]
        return "(its defaults)" if dataclasses.is_dataclass(value) else f"`{_yaml(value)}`"
    return "**required**"


def recipe_keys(cls: type[Section] = Recipe, prefix: str = "") -> list[str]:
    """Every key path of the schema (``data.batch_size``; list items: ``overrides[].bits``)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):  # type: ignore[arg-type]
        path = f"{prefix}{spec.name}"
        keys.append(path)
        section, form = _nested(hints[spec.name])
        if section is not None:
            keys += recipe_keys(section, f"{path}[]." if form.startswith("list") else f"{path}.")
    return keys


def _anchor(path: str) -> str:
    return path.replace("[]", "").replace(".", "-").replace("_", "-")


def _section_markdown(cls: type[Section], path: str, out: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    title = f"`{path}`" if path else "Top level"
    out += [f"## {title} {{#{_anchor(path) if path else 'top-level'}}}", ""]
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
        out += [inspect.cleandoc(cls.__doc__).replace("\n", " "), ""]
    out += ["| key | type | default | meaning |", "|---|---|---|---|"]
    below = []
    for spec in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f"{path}.{spec.name}" if path else spec.name
        section, form = _nested(hints[spec.name])
        kind = form.replace("|", "\\|")
        if section is not None:
            item = f"{key}[]" if form.startswith("list") else key
            kind = f"[{form}](#{_anchor(item)})"
            below.append((section, item))
        meaning = docs.get(spec.name, "").replace("|", "\\|").replace("<", "&lt;")
        out.append(f"| `{spec.name}` | {kind} | {_default(spec)} | {meaning} |")
    out.append("")
    for section, item in below:
        _section_markdown(section, item, out)


def recipe_reference_markdown() -> str:
    """The recipe reference page: every key of the schema with its type, default and
    meaning, section by section, then the ``matrix``."""
    out = [
        "# Recipe reference",
        "",
        "Generated from the recipe schema (`ewgs_plugins/recipe/schema.py`) when the manual",
        "is built. A recipe is one YAML mapping; every key is checked before anything runs,",
        "and a bad value is one line naming the file, the key path and what was expected.",
        "On the command line, `key.path=value` sets any key below (the value is read as YAML).",
        "",
    ]
    _section_markdown(Recipe, "", out)
    out += ["## `matrix` {#matrix}", "", inspect.cleandoc(matrix.__doc__ or ""), ""]
    return "\n".join(out)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_commands() -> list[str]:
    """The names of the ``ewgs`` subcommands, as the parser has them."""
    return list(_subcommands(cli.build_parser()))


def cli_reference_markdown() -> str:
    """The CLI reference page: ``ewgs --help`` and every subcommand's help, from the parser."""
    parser = cli.build_parser()
    helps = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
    out = [
        "# Command-line reference",
        "",
        "Generated from the `ewgs` command's argparse parser when the manual is built.",
        "Bad input (a recipe error, a missing file, an unknown plugin) prints one line and",
        "exits with status 2.",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
        "",
    ]
    for name, sub in _subcommands(parser).items():
        out += [f"## `ewgs {name}`", ""]
        if helps.get(name):
            out += [str(helps[name]).capitalize() + ".", ""]
        out += ["```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(out)
