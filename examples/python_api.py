"""The Python API on your own pipeline: load → plan → inject → (train your way) → report → save → load.

surgeon rewrites the module in place: after inject() it is the same object, its masked weights are
parametrized, and any training loop you already have keeps working. Run: python examples/python_api.py
"""

import torch

import surgeon
from surgeon.models import presets

model = presets.build("tiny-unet")  # or surgeon.load_model("path/to/diffusers/folder")
plan = surgeon.plan(model, sparsity=0.8, distribution="erk")  # per-layer densities from the ERK budget
surgeon.inject(model, plan, init="magnitude")  # keeps the largest |w| of each layer

# your own training step: the forward sees w ⊙ mask, gradients reach the kept weights only
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
x, t = torch.randn(4, 1, 16, 16), torch.randint(0, 1000, (4,))
loss = model(x, t).sample.pow(2).mean()
loss.backward()
opt.step()

rep = surgeon.report(model)
totals = rep.to_dict()["totals"]
print(f"sparsity {totals['sparsity']:.3f}: {totals['kept']:,} of {totals['target_params']:,} target weights kept")
surgeon.save(model, "runs/example-api", force=True)  # packed masks: ≈ kept values + 1 bit per weight
restored = surgeon.load("runs/example-api")
assert torch.equal(restored(x, t).sample, model(x, t).sample)
print("saved and restored: identical outputs")
