"""δ pooled over refreshes: the first refresh is the plain estimate, later ones pool the
per-batch ratios of the last three, and each δ comes with its standard error."""

import torch
import torch.nn.functional as F

from ewgs_plugins import HessianDelta, quantize_model
from ewgs_plugins.models import digits_cnn

torch.manual_seed(0)
model = quantize_model(
    digits_cnn(10, width=8), "dorefa", weight_bits=1, activation_bits=1, backward="ewgs"
)
teacher = torch.randn(64, 10)  # a learnable task: the labels are a function of the input


def fresh_batches(count=3):
    inputs = [torch.randn(64, 1, 8, 8) for _ in range(count)]
    return [(x, (x.flatten(1) @ teacher).argmax(1)) for x in inputs]


def loss_fn(m, batch):
    return F.cross_entropy(m(batch[0]), batch[1])


model(fresh_batches(1)[0][0])  # the first forward initialises the quantizers
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for batch in fresh_batches(40):  # a short warm-up (δ = 0: straight-through)
    optimizer.zero_grad()
    loss_fn(model, batch).backward()
    optimizer.step()


plain = HessianDelta(average="none")  # the paper: each refresh alone
pooled = HessianDelta()  # the default: average "window", window 3
site = "3.weight"  # the second conv (the first and last layers stay full precision)
errors = []
for refresh in range(4):
    batches = fresh_batches()
    torch.manual_seed(100 + refresh)  # the same probes for both
    alone = plain.estimate(model, batches, loss_fn)
    torch.manual_seed(100 + refresh)
    together = pooled.estimate(model, batches, loss_fn)
    errors.append(pooled.standard_errors()[site])
    print(
        f"refresh {refresh}: δ alone {alone[site]:.4f}, pooled {together[site]:.4f} "
        f"± {errors[-1]:.4f}"
    )
    if refresh == 0:
        assert together == alone  # one refresh: the same δ
assert len(pooled.pool.refreshes) == 3  # the window keeps the last three
assert errors[-1] < errors[0]  # nine batches' ratios against three
