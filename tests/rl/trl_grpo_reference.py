"""TRL 1.16's GRPO advantage and loss code, run on fixed tensors without a trainer, model or generation.

`trl_advantages` executes the advantage block of `GRPOTrainer._generate_and_score_completions` (or of
`RLOOTrainer`'s) as TRL's source has it: the block is cut out of the installed method's source between two marker
lines and run on the given rewards, so any change to TRL's formula shows up here. `trl_loss` calls
`GRPOTrainer._compute_loss` itself on a stand-in trainer whose `_get_per_token_logps_and_entropies` returns the
given per-token log-probs, and returns TRL's loss, its gradient with respect to those log-probs and the metrics
TRL logs.
"""

from __future__ import annotations

import inspect
import textwrap
import types
from collections import defaultdict

import numpy as np
import torch
from trl.trainer import grpo_trainer, rloo_trainer
from trl.trainer.utils import nanstd


def _block(method, start: str, end: str) -> str:
  """The source lines of `method` from the line containing `start` up to (not including) the one containing `end`."""
  lines = inspect.getsource(method).splitlines()
  first = next(i for i, line in enumerate(lines) if start in line)
  last = next(i for i in range(first + 1, len(lines)) if end in lines[i])
  return textwrap.dedent("\n".join(lines[first:last]))


def trl_advantages(
  rewards_per_func: np.ndarray, weights: np.ndarray, num_generations: int, scale_rewards: str = "group", rloo=False
) -> np.ndarray:
  """TRL's advantages [N] from per-function rewards [N, F] (float32)."""
  rewards_per_func = torch.tensor(rewards_per_func, dtype=torch.float32)
  env = {"torch": torch, "nanstd": nanstd, "rewards_per_func": rewards_per_func, "num_generations": num_generations}
  if rloo:
    env["rewards"] = (rewards_per_func * torch.tensor(weights, dtype=torch.float32)).nansum(dim=1)
    env["self"] = types.SimpleNamespace(normalize_advantages=False)
    code = _block(
      rloo_trainer.RLOOTrainer._generate_and_score_completions, "grouped_rewards = rewards.view", "# Unscorable"
    )
  else:
    env["self"] = types.SimpleNamespace(
      multi_objective_aggregation="sum_then_normalize",
      reward_weights=torch.tensor(weights, dtype=torch.float32),
      scale_rewards=scale_rewards,
    )
    env["device"] = "cpu"
    env["unscorable_mask"] = torch.isnan(rewards_per_func).all(dim=1)
    code = _block(
      grpo_trainer.GRPOTrainer._generate_and_score_completions,
      'if self.multi_objective_aggregation == "sum_then_normalize"',
      "# Unscorable completions",
    )
  exec(code, env)
  return torch.nan_to_num(env["advantages"], nan=0.0).numpy()


class _Accelerator:
  num_processes = 1

  def gather(self, x):
    return x

  def gather_for_metrics(self, x):
    return x

  def reduce(self, x, reduction="sum"):
    return x


def trl_loss(
  logps: np.ndarray,
  old_logps: np.ndarray,
  ref_logps: np.ndarray | None,
  advantages: np.ndarray,
  mask: np.ndarray,
  *,
  loss_type: str,
  beta: float = 0.0,
  epsilon: float = 0.2,
  epsilon_high: float | None = None,
  importance_sampling_level: str = "token",
  max_completion_length: int | None = None,
) -> tuple[float, np.ndarray, dict[str, float]]:
  """(loss, d loss / d logps [N, L], TRL's logged metrics) of `GRPOTrainer._compute_loss` on one micro-batch."""
  n, length = logps.shape
  policy = torch.tensor(logps, dtype=torch.float32, requires_grad=True)
  mask_t = torch.tensor(mask, dtype=torch.long)
  trainer = types.SimpleNamespace(
    _get_per_token_logps_and_entropies=lambda *a, **k: (policy, torch.zeros_like(policy), None),
    top_entropy_quantile=1.0,
    off_policy_mask_threshold=None,
    importance_sampling_level=importance_sampling_level,
    beta=beta,
    loss_type=loss_type,
    epsilon_low=epsilon,
    epsilon_high=epsilon if epsilon_high is None else epsilon_high,
    args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
    use_vllm=False,
    vllm_importance_sampling_correction=False,
    model=types.SimpleNamespace(training=True),
    current_gradient_accumulation_steps=1,
    max_completion_length=max_completion_length or length,
    accelerator=_Accelerator(),
    _entropy_bonus_enabled=False,
    aux_loss_enabled=False,
    _metrics={"train": defaultdict(list)},
  )
  inputs = {
    "prompt_ids": torch.zeros((n, 1), dtype=torch.long),
    "prompt_mask": torch.ones((n, 1), dtype=torch.long),
    "completion_ids": torch.zeros((n, length), dtype=torch.long),
    "completion_mask": mask_t,
    "advantages": torch.tensor(advantages, dtype=torch.float32),
    "old_per_token_logps": torch.tensor(old_logps, dtype=torch.float32),
    "num_items_in_batch": mask_t.sum(),
  }
  if ref_logps is not None:
    inputs["ref_per_token_logps"] = torch.tensor(ref_logps, dtype=torch.float32)
  loss = grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)
  loss.backward()
  metrics = {k: float(v[-1]) for k, v in trainer._metrics["train"].items()}
  return float(loss.detach()), policy.grad.numpy(), metrics
