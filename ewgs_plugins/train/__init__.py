"""Training one run of a recipe: ``build`` makes the run's parts once (``build_run``:
the quantized model, optimizers, schedules, data, δ schedule, callbacks) and ``Trainer``
(the loop, evaluation, the callback API) runs on them, with what lives beside it:
``optim`` (optimizers, param groups, the LR schedule),
``checkpoint`` (what a checkpoint holds, restore, resume checks) and ``seeding`` (seeds
and RNG state). The run directory's files are ``ewgs_plugins.rundir``'s."""

from .build import RunParts, build_run
from .checkpoint import RESUME_MAY_CHANGE, check_same_recipe, finished_run
from .optim import (
    LRSchedule,
    make_optimizer,
    make_optimizers,
    parameter_groups,
    quantizer_parameters,
)
from .seeding import derive_seed, rng_state, seed_everything, set_rng_state
from .trainer import AMP_DTYPES, Trainer

__all__ = [
    "AMP_DTYPES",
    "LRSchedule",
    "RESUME_MAY_CHANGE",
    "RunParts",
    "Trainer",
    "build_run",
    "check_same_recipe",
    "derive_seed",
    "finished_run",
    "make_optimizer",
    "make_optimizers",
    "parameter_groups",
    "quantizer_parameters",
    "rng_state",
    "seed_everything",
    "set_rng_state",
]
