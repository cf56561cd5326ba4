"""Models by name (the ``ewgs_models`` hook) and loading full-precision weights.

- ``resnet20`` (and ``resnet32``, ``resnet44``, ``resnet56``, ``resnet110``,
  ``resnet1202``): the ResNets for CIFAR (He et al. 2016, Sec. 4.2) with option-A shortcuts
  (parameter-free: stride-2 subsampling and zero-padded channels), in the common public
  layout ``conv1, bn1, layer1..3, linear`` (``layerK.J.{conv1,bn1,conv2,bn2}``), so
  public full-precision checkpoints load. ``bn_before_linear`` adds the
  ``BatchNorm1d(64)`` (named ``bn2``) that the EWGS paper's code puts before the linear
  layer; off by default.
- ``resnet18``, ``resnet34``, ``resnet101``, ``mobilenet_v2``: torchvision's, without weights (load
  them with ``load_full_precision``). Their downsample 1×1 convs are plain
  ``nn.Conv2d`` and get quantized by ``quantize_model`` like every other conv.
- ``digits_cnn``: a small CNN for scikit-learn's 1×8×8 digits (the offline demo).

Every factory takes ``num_classes`` and typed options.

Published full-precision weights by name (the ``ewgs_weights`` hook, ``PUBLISHED``): the
CIFAR-10 ResNets of github.com/akamaster/pytorch_resnet_cifar10 (``resnet20`` ...
``resnet1202``) and torchvision's ImageNet weights (``resnet18``, ``resnet34``,
``resnet101``, ``mobilenet_v2``: their ``IMAGENET1K_V1``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from . import weights
from .errors import load_failure
from .hookspecs import hookimpl
from .quant import QUANT_LAYERS, Quantizer
from .weights import PublishedWeights


def _check_classes(num_classes: int) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")


# ---------------------------------------------------------------------------- ResNet-20


class PadShortcut(nn.Module):
    """Option-A shortcut: keep every other pixel and zero-pad the new channels
    (``planes // 4`` on each side, as the public CIFAR ResNets do). No parameters."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3×3 convs with BN and ReLU, plus the shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        changes_shape = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = PadShortcut(planes) if changes_shape else nn.Sequential()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-6n+2 for 32×32 inputs: 16, 32, 64 channels, ``n`` blocks per stage."""

    def __init__(
        self, blocks_per_stage: int, num_classes: int = 10, bn_before_linear: bool = False
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for index, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks = []
            for block_stride in [stride] + [1] * (blocks_per_stage - 1):
                blocks.append(BasicBlock(in_planes, planes, block_stride))
                in_planes = planes
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
        self.bn2 = nn.BatchNorm1d(64) if bn_before_linear else None
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        if self.bn2 is not None:
            out = self.bn2(out)
        return self.linear(out)


def resnet20(num_classes: int = 10, bn_before_linear: bool = False) -> nn.Module:
    """ResNet-20 for CIFAR (option-A shortcuts, 0.27 M parameters at 10 classes)."""
    _check_classes(num_classes)
    return CifarResNet(3, num_classes, bn_before_linear)


def _cifar_resnet(depth: int) -> Callable[..., nn.Module]:
    def factory(num_classes: int = 10, bn_before_linear: bool = False) -> nn.Module:
        _check_classes(num_classes)
        return CifarResNet((depth - 2) // 6, num_classes, bn_before_linear)

    factory.__name__ = f"resnet{depth}"
    factory.__doc__ = f"ResNet-{depth} for CIFAR (option-A shortcuts, as ``resnet20``)."
    return factory


#: the deeper CIFAR ResNets (6n+2 layers) of the same layout as ``resnet20``
CIFAR_RESNETS = {f"resnet{d}": _cifar_resnet(d) for d in (32, 44, 56, 110, 1202)}


# ---------------------------------------------------------------------------- ImageNet


def resnet18(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-18, no weights."""
    _check_classes(num_classes)
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


def resnet34(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-34, no weights."""
    _check_classes(num_classes)
    return torchvision.models.resnet34(weights=None, num_classes=num_classes)


def resnet101(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-101, no weights (PROFIT's distillation teacher)."""
    _check_classes(num_classes)
    return torchvision.models.resnet101(weights=None, num_classes=num_classes)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> nn.Module:
    """torchvision's MobileNet-V2, no weights."""
    _check_classes(num_classes)
    if not width_mult > 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    return torchvision.models.mobilenet_v2(
        weights=None, num_classes=num_classes, width_mult=width_mult
    )


# ---------------------------------------------------------------------------- digits


def digits_cnn(num_classes: int = 10, width: int = 16, in_channels: int = 1) -> nn.Module:
    """A small CNN for 8×8 images: three 3×3 convs with BN and ReLU (the second one
    halves the resolution), global average pooling and a linear head. With the first
    and last layers kept full precision, the two middle convs are quantized."""
    _check_classes(num_classes)
    if width < 1 or in_channels < 1:
        raise ValueError(f"width and in_channels must be >= 1, got {width}, {in_channels}")
    wide = 2 * width
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, wide, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(wide),
        nn.ReLU(inplace=True),
        nn.Conv2d(wide, wide, 3, padding=1, bias=False),
        nn.BatchNorm2d(wide),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(wide, num_classes),
    )


@hookimpl
def ewgs_models() -> Mapping[str, Callable[..., Any]]:
    return {
        "resnet20": resnet20,
        **CIFAR_RESNETS,
        "resnet18": resnet18,
        "resnet34": resnet34,
        "resnet101": resnet101,
        "mobilenet_v2": mobilenet_v2,
        "digits_cnn": digits_cnn,
    }


# ---------------------------------------------------------------------------- weights

_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models"
_TORCHVISION = "https://download.pytorch.org/models"

#: weights name -> where it is published and its SHA-256 (whole where it was checked,
#: else the file name's 8 hex digits)
PUBLISHED: dict[str, PublishedWeights] = {
    "resnet20": PublishedWeights(
        f"{_AKAMASTER}/resnet20-12fca82f.th",
        "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
        "resnet20",
    ),
    **{
        f"resnet{depth}": PublishedWeights(
            f"{_AKAMASTER}/resnet{depth}-{prefix}.th", prefix, f"resnet{depth}"
        )
        for depth, prefix in (
            (32, "d509ac18"),
            (44, "014dd654"),
            (56, "4bfd9763"),
            (110, "1d1ed7c2"),
            (1202, "f3b1deed"),
        )
    },
    "resnet18": PublishedWeights(f"{_TORCHVISION}/resnet18-f37072fd.pth", "f37072fd", "resnet18"),
    "resnet34": PublishedWeights(f"{_TORCHVISION}/resnet34-b627a593.pth", "b627a593", "resnet34"),
    "resnet101": PublishedWeights(
        f"{_TORCHVISION}/resnet101-63fe2227.pth", "63fe2227", "resnet101"
    ),
    "mobilenet_v2": PublishedWeights(
        f"{_TORCHVISION}/mobilenet_v2-b0353104.pth", "b0353104", "mobilenet_v2"
    ),
}


@hookimpl
def ewgs_weights() -> Mapping[str, Callable[..., Any]]:
    return dict(PUBLISHED)


def _quantizer_keys(model: nn.Module) -> set[str]:
    """State-dict keys a full-precision file cannot have: the quantizers' parameters
    and buffers, and the quantized layers' own (``output_scale``, ``quant_initialized``)."""
    keys = set()
    for key in model.state_dict():
        owner = ""
        for part in key.split(".")[:-1]:
            owner = f"{owner}.{part}" if owner else part
            if isinstance(model.get_submodule(owner), Quantizer):
                keys.add(key)
                break
    for name, layer in model.named_modules():
        if isinstance(layer, QUANT_LAYERS):
            prefix = f"{name}." if name else ""
            keys.update(f"{prefix}{own}" for own in ("output_scale", "quant_initialized"))
    return keys


def _listed(keys: set[str] | list[str], limit: int = 10) -> str:
    ordered = sorted(keys)
    more = f" (and {len(ordered) - limit} more)" if len(ordered) > limit else ""
    return ", ".join(ordered[:limit]) + more


def load_full_precision(model: nn.Module, path: str | Path) -> None:
    """Load full-precision weights from the local file ``path``, or from the file of the
    registered weights name ``path`` (``weights.resolve``: fetched into the hub cache and
    verified), into ``model`` (a full-precision model, or one already converted by
    ``quantize_model``).

    The file holds a state_dict (``torch.save(model.state_dict(), path)``) or a dict
    holding one under ``state_dict`` or ``model`` (a training checkpoint); keys may carry
    the ``module.`` prefix of (Distributed)DataParallel. It is read with
    ``torch.load(weights_only=True)``. Quantizer parameters and buffers absent from the
    file keep their values, and so may BatchNorm's ``num_batches_tracked`` (torchvision's
    older checkpoints lack it). Any other key missing from the file or unknown to the
    model, or a shape that differs, is a ``ValueError`` naming the file and the keys;
    a missing file is a ``FileNotFoundError`` naming it.
    """
    if isinstance(path, str) and weights.is_registered(path):
        path = weights.resolve(path)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"full-precision weights file not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{path}: cannot be read as a state_dict with torch.load(weights_only=True): "
            f"{load_failure(error)}"
        ) from None
    state = loaded
    if isinstance(loaded, Mapping):
        for holder in ("state_dict", "model"):
            if isinstance(loaded.get(holder), Mapping):
                state = loaded[holder]
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"{path}: expected a state_dict (a mapping of names to tensors) or a dict "
            f"holding one under 'state_dict' or 'model', got {type(loaded).__name__}"
        )
    state = {k.removeprefix("module."): v for k, v in state.items()}

    expected = model.state_dict()
    optional = _quantizer_keys(model)
    optional.update(k for k in expected if k.endswith(".num_batches_tracked"))
    missing = set(expected) - set(state) - optional
    unexpected = set(state) - set(expected)
    shapes = [
        f"{k} (file {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing from the file: {_listed(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_listed(unexpected)}")
    if shapes:
        problems.append(f"shapes differ: {_listed(shapes)}")
    if problems:
        raise ValueError(
            f"{path}: the weights do not match the model ({type(model).__name__}): "
            + "; ".join(problems)
        )
    model.load_state_dict(state, strict=False)
