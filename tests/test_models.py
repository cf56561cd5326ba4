"""Models by name and loading full-precision weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ewgs_plugins import (
    ConfigError,
    QuantConv2d,
    QuantLinear,
    initialize_quantizers,
    quantize_model,
    quantized_layers,
    registry,
)
from ewgs_plugins.models import PadShortcut, digits_cnn, load_full_precision, resnet20

METHODS = ["interval", "dorefa", "lsq", "profit"]
MODELS = ["resnet20", "resnet18", "resnet34", "resnet101", "mobilenet_v2", "digits_cnn"]


def plain_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


# --------------------------------------------------------------------------- ResNet-20


def test_resnet20_is_the_public_cifar_layout():
    model = resnet20(num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 269_722  # He et al.: 0.27 M
    keys = set(model.state_dict())
    top = {k.split(".")[0] for k in keys}
    assert top == {"conv1", "bn1", "layer1", "layer2", "layer3", "linear"}
    for stage in (1, 2, 3):
        for block in range(3):
            for part in ("conv1.weight", "bn1.running_var", "conv2.weight", "bn2.bias"):
                assert f"layer{stage}.{block}.{part}" in keys
    assert not any("shortcut" in k for k in keys)  # option A: parameter-free
    assert len(plain_layers(model)) == 20 - 1 + 1  # 19 convs and the linear layer
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(32)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    block = resnet20().layer2[0]
    assert isinstance(block.shortcut, PadShortcut)
    assert isinstance(resnet20().layer2[1].shortcut, nn.Sequential)


def test_resnet20_batchnorm_before_the_linear_layer_is_an_option():
    assert "bn2.weight" not in resnet20().state_dict()
    model = registry().create("model", "resnet20", {"num_classes": 7, "bn_before_linear": True})
    assert isinstance(model.bn2, nn.BatchNorm1d) and model.bn2.num_features == 64
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        model.bn2.running_mean.fill_(100.0)  # the option is on the forward path
        shifted = model(x)
        model.bn2.running_mean.zero_()
        assert not torch.allclose(shifted, model(x))
    assert shifted.shape == (3, 7)


@pytest.mark.parametrize("method", METHODS)
def test_converted_resnet20_keeps_first_and_last_full_precision_unless_asked(method):
    model = resnet20()
    quantized = quantize_model(model, method, weight_bits=2, activation_bits=2)
    expected_default = method == "profit"  # PROFIT quantizes every layer
    assert isinstance(quantized.conv1, QuantConv2d) is expected_default
    assert isinstance(quantized.linear, QuantLinear) is expected_default
    assert isinstance(quantized.layer1[0].conv1, QuantConv2d)
    assert len(quantized_layers(quantized)) == (20 if expected_default else 18)

    every = quantize_model(
        model, method, weight_bits=2, activation_bits=2, quantize_first_last=True
    )
    assert isinstance(every.conv1, QuantConv2d) and isinstance(every.linear, QuantLinear)
    assert every.conv1.weight_quantizer.bits == 2
    assert every.conv1.input_quantizer.bits == 32  # the raw image stays full precision
    assert every.linear.input_quantizer.bits == 2
    kept = quantize_model(
        model, method, weight_bits=2, activation_bits=2, quantize_first_last=False
    )
    assert type(kept.conv1) is nn.Conv2d and type(kept.linear) is nn.Linear
    assert type(model.layer1[0].conv1) is nn.Conv2d  # the caller's model is not mutated


# -------------------------------------------------------------------------- ImageNet


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_converted_torchvision_models_run_forward_and_backward(name, method):
    torch.manual_seed(0)
    model = registry().create("model", name, {"num_classes": 5})
    convs = plain_layers(model)
    quantized = quantize_model(
        model, method, weight_bits=4, activation_bits=4, backward="ewgs", delta=0.01
    )
    x = torch.randn(2, 3, 32, 32)
    initialize_quantizers(quantized, x)
    out = quantized(x)
    assert out.shape == (2, 5)
    out.logsumexp(dim=1).sum().backward()
    layers = quantized_layers(quantized)
    everything = method == "profit"
    assert len(layers) == len(convs) - (0 if everything else 2)
    for layer_name, layer in layers.items():
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
        assert layer.weight.grad.abs().sum() > 0, layer_name
    if name == "resnet18":
        downsample = [n for n in convs if "downsample" in n]
        assert downsample == ["layer2.0.downsample.0", "layer3.0.downsample.0"] + [
            "layer4.0.downsample.0"
        ]
        for layer_name in downsample:
            layer = quantized.get_submodule(layer_name)
            assert isinstance(layer, QuantConv2d) and layer.kernel_size == (1, 1)
            assert layer.weight_quantizer.bits == 4 and layer.input_quantizer.bits == 4
    else:
        depthwise = [m for m in layers.values() if getattr(m, "groups", 1) > 1]
        assert depthwise and all(m.groups == m.in_channels for m in depthwise)


def test_resnet34_and_resnet18_are_torchvision_layouts():
    for name, blocks in (("resnet18", [2, 2, 2, 2]), ("resnet34", [3, 4, 6, 3])):
        model = registry().create("model", name, {"num_classes": 3})
        assert isinstance(model, torchvision.models.ResNet)
        assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3, 4)] == blocks
        assert model.fc.out_features == 3
        reference = getattr(torchvision.models, name)(weights=None, num_classes=3)
        assert list(model.state_dict()) == list(reference.state_dict())
    model = registry().create("model", "mobilenet_v2", {"num_classes": 4})
    reference = torchvision.models.mobilenet_v2(weights=None, num_classes=4)
    assert list(model.state_dict()) == list(reference.state_dict())


# ---------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", MODELS)
def test_every_model_is_registered_and_builds_on_the_meta_device(name):
    """Recipe validation builds the model on ``meta`` (no memory, no init work)."""
    with torch.device("meta"):
        model = registry().create("model", name, {"num_classes": 10})
    assert all(p.device.type == "meta" for p in model.parameters())


def test_model_options_are_checked():
    with pytest.raises(ConfigError, match="num_classes must be >= 1"):
        registry().create("model", "resnet20", {"num_classes": 0})
    with pytest.raises(ConfigError, match="bn_before_linear.*expected bool"):
        registry().create("model", "resnet20", {"num_classes": 10, "bn_before_linear": "yes"})
    with pytest.raises(ConfigError, match="unknown option"):
        registry().create("model", "resnet18", {"num_classes": 10, "depth": 50})
    with pytest.raises(ConfigError, match="width"):
        registry().create("model", "digits_cnn", {"num_classes": 10, "width": 0})


# ------------------------------------------------------------------------------ digits


def test_digits_cnn_learns_the_digits_quickly_on_cpu():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images, targets = (images - 0.3) / 0.4, torch.tensor(data.target)
    model = registry().create("model", "digits_cnn", {"num_classes": 10})
    assert model(images[:2]).shape == (2, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):  # three epochs over 1200 training images, batches of 50
        for batch in torch.randperm(1200).split(50):
            loss = F.cross_entropy(model(images[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[1200:]).argmax(1) == targets[1200:]).float().mean()
    assert accuracy > 0.85


# ---------------------------------------------------------------- load_full_precision


def source_and_target(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    source = digits_cnn(10, width=4)
    source[1].running_mean.uniform_()  # buffers travel too
    torch.manual_seed(seed + 1)
    return source, digits_cnn(10, width=4)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model", "module_prefix", "nested"])
def test_load_full_precision_reads_the_common_checkpoint_layouts(layout, tmp_path):
    source, target = source_and_target()
    state = source.state_dict()
    if layout == "module_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    if layout == "nested":
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    elif layout in ("state_dict", "model"):
        state = {layout: state, "best_acc": 91.0}
    path = tmp_path / "fp.pth"
    torch.save(state, path)
    load_full_precision(target, path)
    assert_same_state(source, target)


def test_load_full_precision_into_a_quantized_model_leaves_quantizers_alone(tmp_path):
    source, target = source_and_target()
    quantized = quantize_model(target, "interval", weight_bits=2, activation_bits=2)
    before = {k: v.clone() for k, v in quantized.state_dict().items() if "quantiz" in k}
    torch.save(source.state_dict(), tmp_path / "fp.pth")
    load_full_precision(quantized, str(tmp_path / "fp.pth"))
    for key, value in source.state_dict().items():
        assert torch.equal(value, quantized.state_dict()[key]), key
    for key, value in before.items():
        assert torch.equal(value, quantized.state_dict()[key])
    assert any("output_scale" in k for k in quantized.state_dict())


def test_load_full_precision_tolerates_missing_num_batches_tracked(tmp_path):
    """torchvision's older ImageNet checkpoints have no ``num_batches_tracked``."""
    source, target = source_and_target()
    state = {k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "old.pth")
    load_full_precision(target, tmp_path / "old.pth")
    assert torch.equal(target[1].running_mean, source[1].running_mean)


def test_load_full_precision_names_a_missing_file(tmp_path):
    missing = tmp_path / "nowhere" / "fp.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_full_precision(digits_cnn(10), missing)


def test_load_full_precision_names_the_file_and_the_keys_that_differ(tmp_path):
    source, target = source_and_target()
    state = source.state_dict()
    del state["3.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "fp.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        load_full_precision(target, path)
    message = str(error.value)
    assert str(path) in message
    assert "missing from the file: 3.weight" in message
    assert "not in the model: extra.weight" in message

    wrong = digits_cnn(10, width=5).state_dict()
    torch.save(wrong, path)
    with pytest.raises(ValueError, match=r"shapes differ: 0\.weight \(file \(5, 1, 3, 3\)"):
        load_full_precision(target, path)

    torch.save(resnet20().state_dict(), path)  # another model altogether
    with pytest.raises(ValueError, match=r"and \d+ more"):
        load_full_precision(target, path)
    # nothing was loaded by the failed attempts
    fresh = source_and_target()[1]
    assert_same_state(fresh, target)


def test_load_full_precision_refuses_what_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="expected a state_dict"):
        load_full_precision(digits_cnn(10), path)
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth: cannot be read"):
        load_full_precision(digits_cnn(10), path)


def test_load_full_precision_refuses_pickled_objects(tmp_path):
    """``weights_only=True``: a file that needs arbitrary unpickling is refused."""
    path = tmp_path / "module.pth"
    torch.save(digits_cnn(10), path)  # a whole pickled module, not a state_dict
    with pytest.raises(ValueError, match="weights_only"):
        load_full_precision(digits_cnn(10), Path(path))


@pytest.mark.parametrize("method", METHODS)
def test_quantizers_are_made_on_the_device_of_the_model(method):
    """Device-agnostic conversion: a model already on a device (``meta`` here, as CUDA
    would be) gets its quantizer parameters and buffers on that device too."""
    with torch.device("meta"):
        model = resnet20()
    quantized = quantize_model(model, method, weight_bits=2, activation_bits=2)
    tensors = [*quantized.parameters(), *quantized.buffers()]
    assert all(t.device.type == "meta" for t in tensors)
    assert any("quantizer" in name for name, _ in quantized.named_parameters()) or (
        method == "dorefa"
    )
