"""The ``ewgs`` command line with the test-only plugins (tests/toys.py) registered, for
tests/test_distributed.py to start under torchrun; ``--then`` separates commands run one
after the other in the same processes (their exit codes are printed). With
``EWGS_TEST_AUDIT=DIR`` it also records every path this process opens for writing,
renames or creates, in ``DIR/writes-rank<RANK>.json``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _record_writes(directory: Path) -> None:
    writes: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = mode is not None and any(c in str(mode) for c in "wax+")
            writing = writing or bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing:
                writes.append(str(path))
        elif event in ("os.rename", "os.mkdir"):
            writes.append(str(args[1] if event == "os.rename" else args[0]))

    sys.addaudithook(hook)
    import atexit

    rank = os.environ.get("RANK", "0")
    # json.dumps before opening: the report's own open is recorded after the dump
    atexit.register(
        lambda: (directory / f"writes-rank{rank}.json").write_text(json.dumps(list(writes)))
    )


if __name__ == "__main__":
    audit = os.environ.get("EWGS_TEST_AUDIT")
    if audit:
        _record_writes(Path(audit))
    from toys import toy_plugins

    from ewgs_plugins import cli

    # several commands in one process group: ``train r.yaml --then train r.yaml --resume``
    commands: list[list[str]] = [[]]
    for arg in sys.argv[1:]:
        if arg == "--then":
            commands.append([])
        else:
            commands[-1].append(arg)
    with toy_plugins():
        codes = [cli.main(command) for command in commands]
    print(f"rank {os.environ.get('RANK', '0')} exit codes: {codes}", flush=True)
