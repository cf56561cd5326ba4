import os
import sys

import pytest
from hypothesis import HealthCheck, settings

# Tensor work is slow to start; time limits per example would only make CI flaky.
settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=50
)
settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    max_examples=50,
    derandomize=True,
)
settings.load_profile("ci" if os.environ.get("CI") else "default")

# Two test workers' worth of torch threads fight over CI's 2 cores; one is faster.
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def site_packages(tmp_path, monkeypatch):
    """A folder on ``sys.path`` to install distributions into (``toys.make_distribution``);
    the plugin registry is reloaded before and after, and the modules imported from
    the folder are forgotten (another test may install one of the same name)."""
    from ewgs_plugins import reset_registry

    monkeypatch.syspath_prepend(str(tmp_path))
    reset_registry()
    yield tmp_path
    monkeypatch.undo()
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]
    reset_registry()
