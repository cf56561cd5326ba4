"""The ``ewgs`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import EwgsError
from .registry import KINDS, registry


def _cmd_plugins(args: argparse.Namespace) -> int:
    reg = registry()
    for kind, (_, label) in KINDS.items():
        entries = reg.entries(kind)
        print(f"{label}s:")
        if not entries:
            print("  (none)")
        for name in sorted(entries):
            entry = entries[name]
            print(f"  {name:<16} plugin {entry.plugin} ({entry.distribution})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ewgs",
        description="Quantization-aware training with pluggable backward rules (STE, EWGS).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plugins = commands.add_parser("plugins", help="list every registered plugin contribution")
    plugins.set_defaults(handler=_cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except EwgsError as error:
        print(f"ewgs: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ewgs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
