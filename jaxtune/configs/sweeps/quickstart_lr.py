"""Bayesian search (TPE) over learning rate and LoRA rank/alpha for the quickstart, median pruning.

    python -m jaxtune.sweep --config configs/quickstart.py --sweep configs/sweeps/quickstart_lr.py \
      --out runs/sweep_quickstart --config.train.eval_every=10
"""


def get_sweep() -> dict:
  return dict(
    method="bayes",
    objective="eval/loss",
    direction="minimize",
    trials=12,
    pruner="median",
    seed=0,
    params={
      "optim.lr": dict(low=2e-4, high=5e-3, log=True),
      "peft.lora.rank,peft.lora.alpha": dict(values=[[8, 16.0], [16, 32.0], [32, 64.0]]),
    },
  )
