"""Recipe YAML: a safe loader that reads ``1e-3`` as a float and refuses a key written
twice, and the dumper of resolved recipes.

A recipe is bounded before anything is built from it (``MAX_CHARACTERS``, ``MAX_DEPTH``,
``MAX_VALUES``): its event stream is walked once, counting every value as it would be
after aliases are expanded, so a document that expands into billions of values (the
"billion laughs") or nests thousands of levels deep is one line, at once, in little
memory."""

from __future__ import annotations

import re
from typing import Any

import yaml

from ..errors import ConfigError


class _Loader(yaml.SafeLoader):
    """Safe YAML with two fixes: ``1e-3`` is a float (YAML 1.2; PyYAML reads it as a
    string) and a key written twice in one mapping is an error, not silently dropped."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise ConfigError(str(key), f"written twice in one mapping (line {line})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


#: the longest recipe text (characters), the deepest nesting of mappings and lists, and
#: the most values (scalars, mappings, lists) once aliases are expanded
MAX_CHARACTERS = 1 << 16
MAX_DEPTH = 50
MAX_VALUES = 100_000

_OPEN = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSE = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


def check_bounds(text: str) -> None:
    """A ``ConfigError`` if ``text`` is longer than ``MAX_CHARACTERS``, nests deeper
    than ``MAX_DEPTH`` or holds more than ``MAX_VALUES`` values once its aliases are
    expanded (an alias counts as the whole node it names, nesting included); an alias
    of a node that holds it is refused too. Time and memory linear in the text."""
    if len(text) > MAX_CHARACTERS:
        raise ConfigError("", f"{len(text)} characters; a recipe may have at most {MAX_CHARACTERS}")
    anchored: dict[str, tuple[int, int]] = {}  # anchor -> (values, height)
    open_: list[list[Any]] = []  # per open mapping or list: [values, height, anchor]
    total = 0

    def add(values: int, height: int, line: int) -> None:
        nonlocal total
        total += values
        if total > MAX_VALUES:
            raise ConfigError(
                "",
                f"more than {MAX_VALUES} values once its aliases are expanded "
                f"(line {line}); a recipe may hold at most {MAX_VALUES}",
            )
        if len(open_) + height > MAX_DEPTH:
            raise ConfigError(
                "",
                f"nested deeper than {MAX_DEPTH} levels (line {line}); a recipe may "
                f"nest at most {MAX_DEPTH}",
            )
        if open_:
            open_[-1][1] = max(open_[-1][1], height)

    try:
        for event in yaml.parse(text, Loader=_Loader):
            line = event.start_mark.line + 1
            if isinstance(event, _OPEN):
                add(1, 1, line)
                open_.append([total, 0, event.anchor])
            elif isinstance(event, _CLOSE):
                first, height, anchor = open_.pop()
                if anchor is not None:  # its values: itself and all counted since
                    anchored[anchor] = (total - first + 1, height + 1)
                if open_:
                    open_[-1][1] = max(open_[-1][1], height + 1)
            elif isinstance(event, yaml.ScalarEvent):
                add(1, 0, line)
                if event.anchor is not None:
                    anchored[event.anchor] = (1, 0)
            elif isinstance(event, yaml.AliasEvent):
                if any(entry[2] == event.anchor for entry in open_):
                    raise ConfigError(
                        "", f"the alias *{event.anchor} (line {line}) names a value that holds it"
                    )
                add(*anchored.get(event.anchor, (1, 0)), line)
    except yaml.YAMLError:
        return  # the loader says what is wrong


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text (bounded: ``check_bounds``); errors name ``source``."""
    try:
        check_bounds(text)
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as error:
        raise ConfigError(error.key_path, error.message, source) from None
    except yaml.YAMLError as error:
        raise ConfigError("", f"not valid YAML: {error}", source) from None
    except ValueError as error:  # a value YAML reads but Python will not build (a huge int)
        raise ConfigError("", f"a value cannot be read: {error}", source) from None
    except RecursionError:  # a safety net: check_bounds keeps nesting far below it
        raise ConfigError("", "nested too deeply to read", source) from None


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
