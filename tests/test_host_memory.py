"""``keep_freed_memory``: glibc's malloc keeps what a step frees, and the CLI asks for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from toys import digits_recipe, toy_plugins, write_recipe

from ewgs_plugins import cli, host_memory
from ewgs_plugins.train import Trainer

GLIBC = host_memory._glibc() is not None

# A fresh process (the setting is process-wide): 40 MiB tensors, above the 32 MiB that
# glibc's adaptive mmap threshold reaches, allocated, filled and freed as a step would.
PROBE = r"""
import ctypes, json, resource, sys
import torch
from ewgs_plugins.host_memory import keep_freed_memory

torch.set_num_threads(1)
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
          "uordblks", "fordblks", "keepcost")
libc = ctypes.CDLL(None)
field = ctypes.c_size_t if hasattr(libc, "mallinfo2") else ctypes.c_int
class Info(ctypes.Structure):
    _fields_ = [(name, field) for name in FIELDS]
mallinfo = libc.mallinfo2 if hasattr(libc, "mallinfo2") else libc.mallinfo
mallinfo.restype = Info
size = 40 << 20
def step():
    torch.empty(size, dtype=torch.uint8).fill_(1)
for _ in range(12):  # the heap settles (posix_memalign's padding grows it a few times)
    step()
block = torch.empty(size, dtype=torch.uint8).fill_(1)
alive = mallinfo()
del block
freed = mallinfo()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
unmapped = alive.hblkhd - freed.hblkhd  # the mmapped bytes that freeing the block unmapped
print(json.dumps({"kept": kept, "unmapped": unmapped, "heap_after_free": freed.arena,
                  "faults": faults, "size": size}))
"""


def probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in host_memory.USER_SETTINGS}
    env.pop("EWGS_KEEP_FREED_MEMORY", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's (Linux)")
def test_kept_memory_serves_the_next_step_without_page_faults():
    default, kept = probe("default"), probe("keep")
    size = kept["size"]
    # glibc as it comes: the block is mmapped and unmapped when freed, so every step
    # faults it in again
    assert default["kept"] is False and default["unmapped"] >= size
    # kept: the block comes from the heap, which keeps it once freed, and five more
    # steps fault in none of its 10,240 pages each
    assert kept["kept"] is True
    assert kept["unmapped"] == 0
    assert kept["heap_after_free"] >= size
    assert kept["faults"] < 1000


@pytest.mark.parametrize(
    "name, value",
    [
        ("MALLOC_TRIM_THRESHOLD_", "1048576"),
        ("MALLOC_MMAP_THRESHOLD_", "1048576"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576"),
        ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
        ("EWGS_KEEP_FREED_MEMORY", "0"),
    ],
)
def test_a_users_own_malloc_settings_are_left_alone(monkeypatch, name, value):
    for other in (*host_memory.USER_SETTINGS, "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.delenv("EWGS_KEEP_FREED_MEMORY", raising=False)
    assert host_memory.user_tuned() is False
    monkeypatch.setenv(name, value)
    assert host_memory.user_tuned() is True
    calls = []
    monkeypatch.setattr(host_memory, "_glibc", lambda: calls.append(1))
    assert host_memory.keep_freed_memory() is False
    assert calls == []  # decided before touching the C library


def test_off_glibc_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(host_memory, "user_tuned", lambda: False)
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    assert host_memory.keep_freed_memory() is False


@pytest.mark.parametrize("command", ["train", "compare"])
def test_the_cli_keeps_freed_memory_before_it_trains(tmp_path, monkeypatch, command):
    events = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: events.append("kept"))
    original = Trainer.run  # the class the command imports when it runs
    monkeypatch.setattr(Trainer, "run", lambda self: (events.append("run"), original(self)))
    matrix = {"matrix": {"backward": ["ste"]}} if command == "compare" else {}
    raw = digits_recipe(tmp_path / "out", epochs=1, **matrix)
    with toy_plugins():
        assert cli.main([command, str(write_recipe(tmp_path / "r.yaml", raw))]) == 0
    assert events[:2] == ["kept", "run"]
