"""Pruning in your own training loop: your data, model, optimizer, schedule and step.

    python problems/own_loop.py          # ~10 s on 2 CPU cores

The formulation (here ``slr``) takes your optimizer (SGD with momentum under a cosine schedule),
adds a penalty gradient and dual steps around your step, and hands the model back hard-pruned at
90 % with a user constraint (the first layer's weight norm) held. Between ``backward`` and
``optimizer.step()`` the step is yours: gradient clipping here.
"""

import torch
from sklearn.datasets import load_digits
from torch import nn

from constrainedsparse import (
    SparsityConfig,
    SparsityProblem,
    Targets,
    UserConstraint,
    achieved_sparsity,
    hard_prune,
    make,
)

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
y = torch.tensor(digits.target)
train, test = slice(0, 1400), slice(1400, None)
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))


def accuracy() -> float:
    with torch.no_grad():
        return float((model(x[test]).argmax(1) == y[test]).float().mean())


def batches(epoch: int):
    order = torch.randperm(1400, generator=torch.Generator().manual_seed(epoch))
    return [(x[train][order[i : i + 64]], y[train][order[i : i + 64]]) for i in range(0, 1400, 64)]


# dense training, all yours
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
for epoch in range(10):
    for xb, yb in batches(epoch):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
print(f"dense accuracy       {accuracy():.3f}, first-layer norm {model[0].weight.norm():.2f}")

# pruning: what (90 %), where (every Linear weight), how (slr), plus a constraint of yours
targets = Targets().resolve(model, SparsityConfig(sparsity=0.9))
norm_budget = UserConstraint(lambda m: m[0].weight.norm() - 8.0, "<=")
problem = SparsityProblem(model, nn.functional.cross_entropy, targets, {"norm_budget": norm_budget})
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=15)
f = make("slr", problem, optimizer=optimizer, dual_lr=0.05, rho=0.05, interval=20, interval_unit="step")
f.setup(num_epochs=15, steps_per_epoch=22, reference_batch=(x[train][:128], y[train][:128]))
for epoch in range(15):
    f.start_epoch(epoch)
    for batch in batches(100 + epoch):
        optimizer.zero_grad()
        step = f.backward(batch)  # the Lagrangian on your batch, backward
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)  # your step
        optimizer.step()
        f.post_step(step)  # dual step, W = Z coordination
    f.end_epoch(epoch)
    schedule.step()
masks = f.hard_masks()
f.finalize()
hard_prune(targets, masks)
print(f"hard-pruned accuracy {accuracy():.3f} at sparsity {achieved_sparsity(targets):.3f}")
print(f"first-layer norm     {model[0].weight.norm():.2f} (budget 8)")
