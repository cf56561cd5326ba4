"""EWGS in your own training loop, on torchvision's ResNet-18: quantize, initialise on a
batch, train with the paper's two optimizers, refresh δ with the Hessian estimator
through the δ schedule the Trainer uses, evaluate, export to ONNX and check the export
in onnxruntime. Synthetic data (4 classes of 32×32 images); runs in seconds on a CPU."""

import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import torch.nn.functional as F
import torchvision

from ewgs_plugins import HessianDelta, initialize_quantizers, quantize_model
from ewgs_plugins.callbacks import DeltaSchedule
from ewgs_plugins.export import write_onnx
from ewgs_plugins.train import parameter_groups

torch.manual_seed(0)
CLASSES, STEPS = 4, 8
centres = torch.randn(CLASSES, 3, 1, 1)


def batch(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose mean colour says their class, plus noise."""
    labels = torch.randint(0, CLASSES, (size,))
    return centres[labels] + 0.5 * torch.randn(size, 3, 32, 32), labels


def loss_fn(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, labels = data
    return F.cross_entropy(model(inputs), labels)


# 1. quantize: LSQ at W4A4 (first and last layer full precision), EWGS backward, δ = 0
model = quantize_model(
    torchvision.models.resnet18(num_classes=CLASSES),
    "lsq",
    weight_bits=4,
    activation_bits=4,
    backward="ewgs",
)
# 2. initialise the quantizers (LSQ's steps) on one training batch, in train mode
initialize_quantizers(model, batch()[0])

# 3. the paper's two optimizers: network weights and quantizer parameters
groups = parameter_groups(model)
optimizers = [
    torch.optim.Adam(groups["weights"], lr=1e-3, weight_decay=1e-4),
    torch.optim.Adam(groups["quantizer"], lr=1e-5),
]

# 4. δ from the Hessian (paper Eq. 8-10) every 4 steps, on one batch, through the same
#    schedule object the Trainer runs
delta = DeltaSchedule(HessianDelta(every=4, unit="step", batches=1, probe="kind", samples=2))
history = []
model.train()
for step in range(STEPS):
    loss = loss_fn(model, batch())
    for optimizer in optimizers:
        optimizer.zero_grad()
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    if delta.due(step=step + 1):
        history.append(delta.refresh(model, [batch(16)], loss_fn))
assert len(history) == STEPS // 4 and all(history), "δ was refreshed every 4 steps"
assert all(value >= 0 for deltas in history for value in deltas.values())
print(f"δ after {STEPS} steps: {len(history[-1])} sites, max {max(history[-1].values()):.4f}")

# 5. evaluate (eval mode: BatchNorm running statistics)
model.eval()
test_inputs, test_labels = batch(64)
with torch.no_grad():
    logits = model(test_inputs)
accuracy = float((logits.argmax(1) == test_labels).float().mean())
print(f"test top-1 after {STEPS} steps: {100 * accuracy:.1f}%")

# 6. export to ONNX (quantize/dequantize pairs) and run it in onnxruntime
with tempfile.TemporaryDirectory() as folder:
    path = write_onnx(model, test_inputs[:1], Path(folder) / "resnet18_w4a4.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (exported,) = session.run(None, {"input": test_inputs.numpy()})
agree = float((np.argmax(exported, 1) == logits.argmax(1).numpy()).mean())
print(f"onnxruntime agrees on top-1 for {100 * agree:.1f}% of the test images")
assert agree >= 0.95, agree
