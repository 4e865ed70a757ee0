"""A grid over train.steps on the tiny config, judged by validation loss; the sweep tests' example.

    python -m jaxtune.sweep --config configs/tiny.py --sweep configs/sweeps/tiny_steps.py --out runs/sweep_tiny
"""


def get_sweep() -> dict:
  return dict(
    method="grid",
    objective="eval/loss",
    direction="minimize",
    trials=3,
    pruner="none",
    params={"train.steps": dict(values=[3, 5, 20])},
  )
