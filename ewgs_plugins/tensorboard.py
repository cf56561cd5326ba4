"""TensorBoard logging as a training callback (``callbacks: {tensorboard: {}}``).

Needs the optional ``tensorboard`` package (``pip install 'ewgs-plugins[tensorboard]'``);
it is imported when the callback is made. Written on rank 0 only, into the run
directory's ``tensorboard/`` folder (``rundir.TENSORBOARD``) unless ``log_dir`` says
otherwise. Tags, with the optimizer step as TensorBoard's step:

- ``train/loss``, ``train/top1``, ``test/loss``, ``test/top1``, ``lr/weights``,
  ``lr/quantizer`` and every other number of the epoch's metrics row (``a_b`` → ``a/b``),
  at the end of each epoch; ``train/step_loss`` after every step;
- ``delta/<site>``: δ of every active round site, each epoch;
- ``quantizer/<layer>.<weight|input>/<parameter>``: every learned scalar of every
  enabled quantizer (LSQ's step, PACT's α, the interval bounds, ...), and
  ``quantizer/<layer>/output_scale`` where the method has one; a parameter with more
  than one element (per channel) is logged as a histogram;
- ``error/<site>``: a histogram of the discretization error ``x_n − x_q`` that EWGS
  scales (``(z − round z)/steps``, inside the clip bounds), on the first training batch
  of each epoch, for the first ``histogram_sites`` active sites (or the sites named).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from . import distributed, rundir
from .errors import ConfigError
from .hookspecs import hookimpl
from .quant import active_round_sites, quantized_layers
from .round_site import RoundSite

KEY_PATH = "callbacks.tensorboard"


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            KEY_PATH,
            "needs the tensorboard package: pip install 'ewgs-plugins[tensorboard]'",
        ) from None
    return SummaryWriter


def metric_tag(key: str) -> str:
    """``train_loss`` → ``train/loss``; a key without ``_`` → ``metrics/<key>``."""
    group, separator, name = key.partition("_")
    return f"{group}/{name}" if separator else f"metrics/{key}"


class TensorBoard:
    """Log a run to TensorBoard (see the module docstring for the tags).

    ``log_dir``: where the event files go (default: ``<run>/tensorboard``).
    ``histogram_sites``: how many active round sites (the first, in forward order) get
    a histogram of their discretization error each epoch, or a list of site names
    (``ewgs_plugins.round_sites`` names them: ``layer1.0.conv1.weight``)."""

    def __init__(self, log_dir: str | None = None, histogram_sites: int | list[str] = 4) -> None:
        self._writer_class = _summary_writer_class()
        if isinstance(histogram_sites, int) and histogram_sites < 0:
            raise ConfigError("histogram_sites", f"must be >= 0, got {histogram_sites}")
        self.log_dir = log_dir
        self.histogram_sites = histogram_sites
        self.writer: Any = None
        self._hooks: list[Any] = []
        self._errors: dict[str, Tensor] = {}
        self._sampling = False

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def ewgs_train_start(self, trainer: Any) -> None:
        if not distributed.is_main():
            return
        sites = self._histogram_sites(trainer.model)
        log_dir = Path(self.log_dir) if self.log_dir else trainer.run_dir / rundir.TENSORBOARD
        # purge_step: on resume, drop what was logged after the checkpoint
        self.writer = self._writer_class(str(log_dir), purge_step=trainer.step or None)
        for name, site in sites.items():
            self._hooks.append(site.register_forward_hook(self._error_hook(name)))

    @hookimpl
    def ewgs_epoch_start(self, trainer: Any, epoch: int) -> None:
        self._sampling = self.writer is not None and bool(self._hooks)

    @hookimpl
    def ewgs_step_end(self, trainer: Any, step: int, loss: float) -> None:
        self._sampling = False  # one batch per epoch
        if self.writer is not None:
            self.writer.add_scalar("train/step_loss", loss, step + 1)

    @hookimpl
    def ewgs_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = trainer.step
        for key, value in metrics.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)):
                self.writer.add_scalar(metric_tag(key), value, step)
        for name, site in active_round_sites(trainer.model).items():
            self.writer.add_scalar(f"delta/{name}", float(site.delta), step)
        self._log_quantizers(trainer.model, step)
        for name, errors in self._errors.items():
            self.writer.add_histogram(f"error/{name}", errors, step)
        self._errors = {}
        self.writer.flush()

    @hookimpl
    def ewgs_train_end(self, trainer: Any) -> None:
        self.close()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # ---------------------------------------------------------------- helpers

    def _histogram_sites(self, model: nn.Module) -> dict[str, RoundSite]:
        active = active_round_sites(model)
        if isinstance(self.histogram_sites, int):
            return dict(list(active.items())[: self.histogram_sites])
        unknown = [name for name in self.histogram_sites if name not in active]
        if unknown:
            raise ConfigError(
                f"{KEY_PATH}.histogram_sites",
                f"no active round site named {', '.join(unknown)}; sites: {', '.join(active)}",
            )
        return {name: active[name] for name in self.histogram_sites}

    def _error_hook(self, name: str) -> Any:
        def record(site: RoundSite, args: tuple[Any, ...], rounded: Tensor) -> None:
            if not self._sampling or name in self._errors:  # the step's own forward only
                return
            latent, steps = args[0], args[1]
            low, high = (args[2], args[3]) if len(args) > 3 else (None, None)
            latent, rounded = latent.detach().float(), rounded.detach().float()
            error = (latent - rounded) / steps  # rounded = round(z) wherever z is inside
            if low is not None:
                error = error[(latent >= low) & (latent <= high)]
            self._errors[name] = error.reshape(-1).cpu()

        return record

    def _log_quantizers(self, model: nn.Module, step: int) -> None:
        for layer_name, layer in quantized_layers(model).items():
            for kind in ("weight", "input"):
                quantizer = getattr(layer, f"{kind}_quantizer")
                if not quantizer.enabled:
                    continue
                for name, parameter in quantizer.named_parameters(recurse=False):
                    self._log_value(f"quantizer/{layer_name}.{kind}/{name}", parameter, step)
            if layer.output_scale is not None:
                self._log_value(f"quantizer/{layer_name}/output_scale", layer.output_scale, step)

    def _log_value(self, tag: str, value: Tensor, step: int) -> None:
        value = value.detach().float().cpu()
        if value.numel() == 1:
            self.writer.add_scalar(tag, float(value), step)
        else:
            self.writer.add_histogram(tag, value.reshape(-1), step)
