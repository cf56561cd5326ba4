import os

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
