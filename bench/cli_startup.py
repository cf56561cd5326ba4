"""How long the ``ewgs`` command line takes to answer ``--help`` (it must not load torch),
against ``python -c "import torch"`` on the same machine.

    python bench/cli_startup.py [--repeat 5]

Prints the median wall time of each command over ``--repeat`` runs, in seconds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

EWGS = str(Path(sys.executable).with_name("ewgs"))
COMMANDS = {
    "ewgs --help": [EWGS, "--help"],
    "ewgs --version": [EWGS, "--version"],
    "ewgs compare --help": [EWGS, "compare", "--help"],
    "ewgs train --help": [EWGS, "train", "--help"],
    "ewgs recipes": [EWGS, "recipes"],
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
}


def wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for label, command in COMMANDS.items():
        times = [wall(command) for _ in range(args.repeat)]
        print(f"{label:<28} {statistics.median(times):6.2f} s (median of {args.repeat})")


if __name__ == "__main__":
    main()
