import torch
from torch import nn

from ewgs_plugins import estimate_hessian_deltas, initialize_quantizers, quantize_model, set_deltas

model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 30 * 30, 10))
model = quantize_model(model, "lsq", weight_bits=2, activation_bits=2, backward="ewgs")
images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
initialize_quantizers(model, images)  # the quantizers' first-forward initialisation


def loss_fn(m, batch):
    return nn.functional.cross_entropy(m(batch[0]), batch[1])


set_deltas(model, estimate_hessian_deltas(model, [(images, labels)], loss_fn))  # δ per site
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
losses = []
for _ in range(20):  # an ordinary training loop: EWGS acts in the backward pass
    optimizer.zero_grad()
    loss = loss_fn(model, (images, labels))
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
assert losses[-1] < losses[0], losses
