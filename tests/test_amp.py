"""Mixed precision (``amp``), channels_last and ``compile`` in the trainer, and the
quantizers' float32 round sites under autocast (CPU autocast: bf16 and fp16)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from toys import digits_recipe, toy_plugins

from ewgs_plugins import ConfigError, hookimpl, quantize_model, quantized_layers, set_backward
from ewgs_plugins.models import digits_cnn
from ewgs_plugins.quant import initialize_quantizers
from ewgs_plugins.recipe import Recipe, expand_runs
from ewgs_plugins.registry import registry
from ewgs_plugins.train import Trainer

METHODS = ("interval", "dorefa", "lsq", "profit")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def toys():
    with toy_plugins():
        yield


def recipe(output: Path, **changes: Any) -> Recipe:
    (run,) = expand_runs(digits_recipe(output, **changes), source="test")
    return run.recipe


def without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in history]


# ------------------------------------------------------------ quantizers under autocast


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("amp", sorted(HALF))
def test_quantizers_round_in_float32_under_autocast(method, amp):
    generator = torch.Generator().manual_seed(0)
    factory = registry().create("method", method)
    for kind in ("weight", "activation"):
        quantizer = getattr(factory, f"{kind}_quantizer")(8)
        x = torch.randn(4, 8, 5, 5, generator=generator)
        if kind == "weight":
            x = x * 0.1  # a float32 parameter: autocast leaves it float32
        else:
            x = (x.relu() * 3).to(HALF[amp])  # the low-precision output of a layer above
        quantizer.initialize(x.float())
        site = quantizer.round_site
        latents: list[torch.Tensor] = []

        def record(_, args, kwargs, seen=latents):  # the latent the site computes from x
            x_in, scale, shift = args[0], kwargs.get("scale"), kwargs.get("shift")
            latent = x_in if scale is None else x_in * scale
            seen.append(latent if shift is None else latent + shift)

        site.register_forward_pre_hook(record, with_kwargs=True)
        with torch.no_grad():
            expected = quantizer(x.float()).to(x.dtype)  # float32, no autocast, cast once
            site.capture = []
            with torch.autocast("cpu", dtype=HALF[amp]):
                out = quantizer(x)
        ((levels, _),) = site.capture
        site.capture = None
        assert [latent.dtype for latent in latents] == [torch.float32, torch.float32]
        assert out.dtype == x.dtype and torch.equal(out, expected)
        assert levels.dtype == torch.float32 and torch.equal(levels, levels.round())
        if kind == "activation" and amp == "bf16":
            # what the float32 path prevents: a bf16 latent (8 significant bits) loses
            # levels of an 8-bit quantizer
            latent = latents[-1]
            assert not torch.equal(latent.to(HALF[amp]).float().round(), latent.round())


def converted(method: str, rule: str, bits: int, seed: int) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = quantize_model(
        digits_cnn(num_classes=10, width=4),
        method,
        weight_bits=bits,
        activation_bits=bits,
        backward=rule,
        quantize_first_last=True,
    )
    x = torch.randn(16, 1, 8, 8)
    initialize_quantizers(model, x)
    return model.train(), x


def gradients_under_autocast(model: torch.nn.Module, x: torch.Tensor, amp: str) -> dict:
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=HALF[amp]):
        out = model(x)
    out.float().logsumexp(1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads["input"] = x.grad
    return grads


@settings(max_examples=12)
@given(
    st.sampled_from(METHODS),
    st.sampled_from(sorted(HALF)),
    st.integers(2, 4),
    st.integers(0, 2**16),
)
def test_ewgs_with_zero_delta_is_ste_bit_for_bit_under_autocast(method, amp, bits, seed):
    model, x = converted(method, "ste", bits, seed)
    ewgs = copy.deepcopy(model)
    set_backward(ewgs, "ewgs", 0.0)
    ste_grads = gradients_under_autocast(model, x, amp)
    ewgs_grads = gradients_under_autocast(ewgs, x, amp)
    assert ste_grads.keys() == ewgs_grads.keys()
    unused = {name for name, grad in ste_grads.items() if grad is None}
    assert unused == {n for n, g in ewgs_grads.items() if g is None}
    assert all(".input_quantizer." in name for name in unused)  # the raw image's (32 bits)
    for name in ste_grads.keys() - unused:
        assert torch.isfinite(ste_grads[name]).all(), name
        assert torch.equal(ste_grads[name], ewgs_grads[name]), name


@pytest.mark.parametrize("method", METHODS)
def test_ewgs_under_autocast_scales_by_the_float32_error(method):
    # with δ > 0 the EWGS factor 1 + δ·sign(g)·(x_n - x_q) comes from the float32
    # latent: an activation quantizer's input gradient under autocast is the float32
    # one (from the same bf16 input), cast once to bf16
    quantizer = registry().create("method", method).activation_quantizer(4)
    x = (torch.randn(256, generator=torch.Generator().manual_seed(3)).relu() * 2).bfloat16()
    quantizer.initialize(x.float())
    grad_out = torch.linspace(-1, 1, 256).bfloat16().float()  # it arrives as bf16

    def input_gradient(rule: str, autocast: bool) -> torch.Tensor:
        set_backward(quantizer, rule, 3.0)
        leaf = (x if autocast else x.float()).clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            quantizer(leaf).float().backward(grad_out)
        return leaf.grad

    under_autocast, in_float32 = input_gradient("ewgs", True), input_gradient("ewgs", False)
    assert under_autocast.dtype == torch.bfloat16
    assert torch.equal(under_autocast, in_float32.bfloat16())
    assert not torch.equal(in_float32, input_gradient("ste", False))  # δ = 3 matters


# --------------------------------------------------------------------------- recipes


def test_recipe_keys_and_their_errors(tmp_path):
    plain = recipe(tmp_path / "a")
    assert (plain.compile, plain.amp, plain.channels_last) == (False, None, False)
    chosen = recipe(tmp_path / "b", compile=True, amp="fp16", channels_last=True)
    assert (chosen.compile, chosen.amp, chosen.channels_last) == (True, "fp16", True)
    with pytest.raises(
        ConfigError, match=r"amp: expected one of 'bf16', 'fp16' or null, got 'fp32'"
    ):
        recipe(tmp_path / "c", amp="fp32")
    with pytest.raises(ConfigError, match="compile: expected bool, got 1"):
        recipe(tmp_path / "d", compile=1)
    with pytest.raises(ConfigError, match="channels_last: expected bool"):
        recipe(tmp_path / "e", channels_last="yes please")


# --------------------------------------------------------------------------- trainer


class Observe:
    """Records, in the training step, whether autocast is on and in what dtype, the
    dtype of the outputs the loss sees, and the memory format of the inputs."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    @hookimpl
    def ewgs_extra_loss(self, trainer: Any, inputs: Any, outputs: Any, targets: Any) -> Any:
        self.seen.append(
            (
                torch.is_autocast_enabled("cpu"),
                torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None,
                outputs.dtype,
                inputs.is_contiguous(memory_format=torch.channels_last),
            )
        )
        return None


class AutocastProbe(torch.nn.Module):
    """Wraps a model; records whether autocast is on when it runs (evaluation)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.autocast: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return self.model(x)


def train(path: Path, **changes: Any) -> tuple[Trainer, Observe]:
    observe = Observe()
    changes.setdefault("epochs", 1)
    trainer = Trainer(recipe(path, **changes), callbacks={"observe": observe})
    trainer.run()
    return trainer, observe


def test_amp_bf16_trains_under_autocast_and_evaluates_under_it(tmp_path):
    fp32, _ = train(tmp_path / "fp32")
    bf16, observe = train(tmp_path / "bf16", amp="bf16")
    assert observe.seen and all(
        s[:3] == (True, torch.bfloat16, torch.float32) for s in observe.seen
    )
    assert not bf16.scaler.is_enabled()  # bf16 needs no loss scaling
    row = bf16.history[0]
    assert all(math.isfinite(row[k]) for k in ("train_loss", "test_loss", "test_top1"))
    # the same training, in another precision: close to float32, not identical
    assert row["train_loss"] == pytest.approx(fp32.history[0]["train_loss"], rel=0.05)
    assert row["train_loss"] != fp32.history[0]["train_loss"]
    probe = AutocastProbe(bf16.model)
    assert bf16.evaluate(probe)["test_loss"] == row["test_loss"]
    assert probe.autocast and all(probe.autocast)


def test_channels_last_trains_the_same_model(tmp_path):
    plain, seen_plain = train(tmp_path / "plain")
    fast, seen = train(tmp_path / "fast", channels_last=True)
    assert seen.seen and all(s[3] for s in seen.seen)
    # (a one-channel image is the same in both layouts; three channels tell them apart)
    batch = (torch.randn(2, 3, 4, 4), torch.zeros(2))
    assert fast._to_device(batch)[0].stride(1) == 1  # the channels innermost
    assert plain._to_device(batch)[0].stride(1) == 16
    for layer in quantized_layers(fast.model).values():
        assert layer.weight.is_contiguous(memory_format=torch.channels_last)
    # the same arithmetic in another memory layout: equal up to float32 rounding
    for key in ("train_loss", "test_loss"):
        assert fast.history[0][key] == pytest.approx(plain.history[0][key], rel=1e-4)


def test_compile_trains_through_the_compiled_model(tmp_path):
    # 1280 training images in batches of 128: one batch shape, one compilation
    data = {"name": "digits", "batch_size": 128, "options": {"test_fraction": 0.2875}}
    eager, _ = train(tmp_path / "eager", data=data)
    compiled, seen = train(tmp_path / "compiled", data=data, compile=True)
    assert compiled.steps_per_epoch == 10 and len(seen.seen) == 10
    assert isinstance(compiled.forward_model, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.forward_model._orig_mod is compiled.model
    assert compiled.history[0]["train_loss"] == pytest.approx(
        eager.history[0]["train_loss"], rel=1e-3
    )
    # top-1 near chance after one epoch flips with float noise: compare the test loss
    assert compiled.history[0]["test_loss"] == pytest.approx(
        eager.history[0]["test_loss"], rel=1e-2
    )


def set_scale(scaler: torch.amp.GradScaler, scale: float) -> None:
    scaler.load_state_dict({**scaler.state_dict(), "scale": scale})


def test_fp16_scales_the_loss_and_skips_the_steps_that_overflow(tmp_path):
    trainer = Trainer(recipe(tmp_path / "run", amp="fp16", epochs=1))
    assert trainer.scaler.is_enabled()
    inputs, targets = trainer.sample_batches(1)[0]
    parameters = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    set_scale(trainer.scaler, 2.0**40)  # every fp16 gradient overflows
    trainer._train_step(inputs, targets)
    assert trainer.scaler.get_scale() == 2.0**39  # backed off once
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in parameters.items())  # both skipped

    set_scale(trainer.scaler, 2.0**8)
    trainer._train_step(inputs, targets)
    assert trainer.scaler.get_scale() == 2.0**8
    layer = next(iter(quantized_layers(trainer.model).values()))
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for parameter in (layer.weight, layer.weight_quantizer.step):  # one of each optimizer
        assert not torch.equal(parameter, parameters[names[id(parameter)]])


def test_fp16_resume_restores_the_grad_scaler_and_continues_exactly(tmp_path):
    straight, _ = train(tmp_path / "straight", amp="fp16", epochs=2)
    stop = {"stop_after": {"epoch": 0}}
    first, _ = train(tmp_path / "resumed", amp="fp16", epochs=2, callbacks=stop)
    assert len(first.history) == 1
    saved = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=True)
    assert saved["grad_scaler"] == first.scaler.state_dict() and saved["grad_scaler"]
    resumed = Trainer(
        recipe(tmp_path / "resumed", amp="fp16", epochs=2, callbacks=stop), resume=True
    )
    assert resumed.scaler.state_dict() == first.scaler.state_dict()
    resumed.run()
    assert without_time(resumed.history) == without_time(straight.history)
    assert resumed.scaler.state_dict() == straight.scaler.state_dict()
    expected, got = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)

    # how fast may change on resume, the precision may not
    with pytest.raises(ConfigError, match="amp: differs from the recipe"):
        Trainer(recipe(tmp_path / "resumed", amp="bf16", epochs=2, callbacks=stop), resume=True)
    faster = recipe(
        tmp_path / "resumed", amp="fp16", epochs=2, callbacks=stop, channels_last=True, compile=True
    )
    assert Trainer(faster, resume=True).start_epoch == 2
