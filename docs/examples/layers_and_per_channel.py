"""Which layers a model keeps in full precision and why, the strict option, and
per-channel LSQ weights exported to ONNX with a per-axis DequantizeLinear."""

import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from ewgs_plugins.export import check_onnx, write_onnx
from ewgs_plugins.methods.lsq import LsqMethod
from ewgs_plugins.quant import (
    LayersLeftInFullPrecision,
    full_precision_layers,
    initialize_quantizers,
    quantize_model,
)


class Tagger(nn.Module):
    """A 1-D convolutional sequence model with an attention block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(4, 16, 3, padding=1)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.norm = nn.BatchNorm1d(16)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.conv(torch.relu(self.stem(x)))))
        x = x.transpose(1, 2)
        x = x + self.attention(x, x, x, need_weights=False)[0]
        return self.head(x.mean(1))


torch.manual_seed(0)
batch = torch.randn(32, 4, 20)

# 1. What stays in full precision, and why (the attention block is also warned about).
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = quantize_model(Tagger(), "lsq", weight_bits=4, activation_bits=4)
for name, why in full_precision_layers(model).items():
    print(f"{name:10} {why}")
assert list(full_precision_layers(model)) == ["stem", "attention", "head"]
assert any("attention" in str(w.message) for w in caught)

# 2. require_all_quantized refuses the model, naming every such layer.
try:
    quantize_model(Tagger(), "lsq", weight_bits=4, activation_bits=4, require_all_quantized=True)
except LayersLeftInFullPrecision as error:
    print(error)
    assert set(error.layers) == {"stem", "attention", "head"}

# 3. Per-channel LSQ weights: one step per output channel.
model = quantize_model(
    Tagger(),
    LsqMethod(granularity="per_channel"),
    weight_bits=4,
    activation_bits=4,
)
initialize_quantizers(model, batch)  # or a first training-mode forward
steps = model.conv.weight_quantizer.step
print("conv steps per channel:", steps.shape, steps.detach()[:4])
assert steps.shape == (16,)
imap = model.conv.weight_quantizer.integer_map()
assert imap.axis == 0 and imap.scale.shape == (16,)

# 4. ONNX: the weight's DequantizeLinear is per axis; onnxruntime agrees with PyTorch.
with tempfile.TemporaryDirectory() as folder:
    path = write_onnx(model.eval(), batch[:1], Path(folder) / "tagger.onnx")
    check = check_onnx(path, model, batch)
    print(check)
    assert check.top1_agreement == 1.0
