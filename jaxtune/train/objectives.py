"""Training objectives: supervised fine-tuning and the preference losses, one train step for all.

An objective turns one micro-batch into (loss, metric sums). Supervised fine-tuning is the
token-mean cross-entropy of step.py; every other objective works on whole sequences, so it
reads per-token log-probabilities and sums them per sequence.

Preference batches (jaxtune/data/packing.py) hold two-sequence examples: a pair's chosen and
rejected sequences (DPO, ORPO, SimPO, reward models), or a KTO example's completion and its
mismatched KL sequence, laid out as consecutive segments 2k+1 and 2k+2 of a row. Rows may be
packed: sums run per (row, segment), so packing never mixes sequences.

The definitions follow TRL 1.16 (`trl/trainer/dpo_trainer.py`, `kto_trainer.py`,
`reward_trainer.py`, `trl/experimental/orpo`, `trl/experimental/cpo`); where a formula differs
from TRL's the docstring says why. Every mean over pairs or examples is taken over the whole
batch (all micro-batches), counted before the forward pass like the SFT token count, so
gradient accumulation updates exactly like one large batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from jaxtune.errors import ConfigError
from jaxtune.train import grpo
from jaxtune.train.cross_entropy import token_log_probs

OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "kto", "reward", "grpo")
PAIRED = ("dpo", "orpo", "simpo", "reward")  # data: prompt / chosen / rejected pairs
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "robust")
REFERENCE = ("auto", "live", "precomputed")
PER_MICRO_BATCH = ("kl",)  # metrics that are a micro-batch's mean, not a share of the batch's sum
# Metrics that are extremes over the batch: micro-batches and evaluation batches combine them by min / max.
EXTREMES = {"min_reward": (jnp.minimum, jnp.inf), "max_reward": (jnp.maximum, -jnp.inf)}  # (combine, start)
# Objectives that compare the policy with a frozen reference model.
WITH_REFERENCE = ("dpo", "kto")
# The log-probability ORPO's log1mexp sees is kept at most this far below 0: at exactly 0 (a
# sequence the model is certain of, common in low precision) log(1 - p) is -inf and the
# log-odds of two such sequences is inf - inf = NaN. The clamp changes nothing elsewhere.
_MAX_AVG_LOGP = -1e-6


def objective_config() -> ml_collections.ConfigDict:
  """The `objective` key and the settings of each preference objective (TRL 1.16's defaults)."""
  c = ml_collections.ConfigDict()
  c.objective = "sft"  # what the run minimises: sft | dpo | orpo | simpo | kto | reward | grpo
  # Where DPO's and KTO's reference log-probs come from. live: a second forward per step, the
  # same weights with the adapters off (LoRA only: full fine-tuning holds no reference weights).
  # precomputed: one pass over the data before training with the initial model, cached with the
  # tokenised data (keyed on model and data). auto: precomputed under full fine-tuning, and under
  # LoRA when the run sees every example at least once (so the pass costs no more than it saves).
  c.reference = "auto"
  c.dpo = ml_collections.ConfigDict(
    dict(
      loss_type="sigmoid",  # sigmoid | hinge | ipo | robust
      beta=0.1,  # the strength of the implicit KL penalty to the reference (IPO: its regulariser tau)
      label_smoothing=0.0,  # robust: the assumed share of flipped labels, in [0, 0.5)
    )
  )
  c.orpo = ml_collections.ConfigDict(dict(beta=0.1))  # the weight of the odds-ratio term (the paper's lambda)
  # SimPO: TRL's CPO defaults; the SimPO paper tunes beta in 2..10 with gamma / beta around 0.5.
  c.simpo = ml_collections.ConfigDict(
    dict(
      beta=0.1,  # the scale of the length-normalised reward margin
      gamma=0.5,  # the target reward margin (TRL's simpo_gamma)
    )
  )
  c.kto = ml_collections.ConfigDict(
    dict(
      beta=0.1,  # the strength of the implicit KL penalty to the reference
      desirable_weight=1.0,  # loss weight of desirable (label true) completions
      undesirable_weight=1.0,  # loss weight of undesirable (label false) completions
    )
  )
  # center_rewards: TRL's center_rewards_coefficient (0: off), pulls the mean reward to 0.
  c.reward = ml_collections.ConfigDict(dict(center_rewards=0.0))
  # GRPO: batches sampled each step from data.train's prompts (train/grpo.py, train/rollout.py).
  c.grpo = grpo.grpo_config()
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the objective settings; raises ConfigError naming the key."""
  if config.objective not in OBJECTIVES:
    raise ConfigError(f"objective: {config.objective!r} is not one of {', '.join(OBJECTIVES)}.")
  if config.reference not in REFERENCE:
    raise ConfigError(f"reference: {config.reference!r} is not one of {', '.join(REFERENCE)}.")
  if config.dpo.loss_type not in DPO_LOSSES:
    raise ConfigError(f"dpo.loss_type: {config.dpo.loss_type!r} is not one of {', '.join(DPO_LOSSES)}.")
  if not 0.0 <= config.dpo.label_smoothing < 0.5:
    raise ConfigError(f"dpo.label_smoothing: {config.dpo.label_smoothing} must be in [0, 0.5).")
  for key in ("dpo.beta", "orpo.beta", "simpo.beta", "kto.beta"):
    section, name = key.split(".")
    if not config[section][name] > 0:
      raise ConfigError(f"{key}: {config[section][name]} must be positive.")
  if config.objective == "grpo":
    grpo.validate(config)
  if config.objective in WITH_REFERENCE and config.reference == "live":
    if config.peft.method not in ("lora", "ia3"):
      raise ConfigError(
        f"reference: 'live' computes the reference with the adapters off, which needs peft.method=lora or ia3; under "
        f"{config.peft.method!r} fine-tuning set reference=precomputed (or auto)."
      )
    if config.model.adapter:
      raise ConfigError(
        "reference: 'live' would be the base without model.adapter's adapter, not the model training starts "
        "from; set reference=precomputed (or auto)."
      )


# ------------------------------------------------------------------------------------------------
# Per-sequence sums


def segment_sums(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Sums of `values` [b, T - 1] (one per target position) per (row, segment): [b, T + 1].

  A target at position t belongs to the segment of input token t; bin 0 collects padding.
  """
  b, n = values.shape
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, n))
  return jnp.zeros((b, n + 2), values.dtype).at[rows, segment_ids[:, 1:]].add(values)


def pair_slots(sums: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(first, second) sequence of every two-sequence example: bins 2k+1 and 2k+2, flattened to [b * K]."""
  k = (sums.shape[1] - 1) // 2
  return sums[:, 1 : 2 * k : 2].reshape(-1), sums[:, 2 : 2 * k + 1 : 2].reshape(-1)


def example_starts(segment_ids: jax.Array) -> jax.Array:
  """bool [..., T]: the first token of each two-sequence example (of every odd segment)."""
  before = jnp.pad(segment_ids, [(0, 0)] * (segment_ids.ndim - 1) + [(1, 0)])[..., :-1]
  return (segment_ids % 2 == 1) & (segment_ids != before)


@dataclasses.dataclass(frozen=True)
class Sequences:
  """Per-sequence statistics of one micro-batch, flattened over the (row, pair) slots [b * K]."""

  valid: jax.Array  # float32: 1 for a slot that holds an example
  logps: tuple[jax.Array, jax.Array]  # summed completion log-probs of the first / second sequence
  tokens: tuple[jax.Array, jax.Array]  # completion tokens of each

  def average(self, i: int) -> jax.Array:
    return self.logps[i] / jnp.maximum(self.tokens[i], 1.0)


def sequences(token_logps: jax.Array, weights: jax.Array, segment_ids: jax.Array) -> Sequences:
  """Sums per pair slot of the completion tokens' log-probs ([b, T - 1], masked by `weights`)."""
  logps = pair_slots(segment_sums(token_logps * weights, segment_ids))
  tokens = pair_slots(segment_sums(weights, segment_ids))
  return Sequences((tokens[0] > 0).astype(jnp.float32), logps, tokens)


# ------------------------------------------------------------------------------------------------
# Losses: per example, from per-sequence log-probs. Each returns (per-example loss, per-example
# metrics); the step averages both over the batch's examples.


def _log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - exp(x)) for x < 0, stable at both ends (branch at -ln 2); both branches NaN-free for gradients."""
  t = -math.log(2.0)
  near = jnp.minimum(x, -1e-30)  # the branch not taken must not produce inf, or its gradient poisons the sum
  far = jnp.minimum(x, t)
  return jnp.where(x < t, jnp.log1p(-jnp.exp(far)), jnp.log(-jnp.expm1(near)))


def _reward_metrics(chosen: jax.Array, rejected: jax.Array, logps: tuple[jax.Array, jax.Array]) -> dict:
  return {
    "rewards/chosen": chosen,
    "rewards/rejected": rejected,
    "rewards/margins": chosen - rejected,
    "rewards/accuracies": (chosen > rejected).astype(jnp.float32),
    "logps/chosen": logps[0],
    "logps/rejected": logps[1],
  }


def dpo_loss(cfg: ml_collections.ConfigDict, policy: Sequences, ref: Sequences) -> tuple[jax.Array, dict]:
  """DPO and its variants on summed completion log-probs (TRL's DPOTrainer)."""
  beta = cfg.beta
  chosen = policy.logps[0] - ref.logps[0]
  rejected = policy.logps[1] - ref.logps[1]
  delta = chosen - rejected
  if cfg.loss_type == "sigmoid":
    loss = -jax.nn.log_sigmoid(beta * delta)
  elif cfg.loss_type == "hinge":
    loss = jax.nn.relu(1.0 - beta * delta)
  elif cfg.loss_type == "ipo":  # length-normalised (TRL, agreed with the IPO authors)
    avg = chosen / jnp.maximum(policy.tokens[0], 1.0) - rejected / jnp.maximum(policy.tokens[1], 1.0)
    loss = (avg - 1.0 / (2.0 * beta)) ** 2
  elif cfg.loss_type == "robust":
    eps = cfg.label_smoothing
    clean = -(1.0 - eps) * jax.nn.log_sigmoid(beta * delta)
    flipped = -eps * jax.nn.log_sigmoid(-beta * delta)
    loss = (clean - flipped) / (1.0 - 2.0 * eps)
  else:
    raise ConfigError(f"dpo.loss_type: unknown {cfg.loss_type!r}.")
  metrics = _reward_metrics(beta * jax.lax.stop_gradient(chosen), beta * jax.lax.stop_gradient(rejected), policy.logps)
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def simpo_loss(cfg: ml_collections.ConfigDict, policy: Sequences) -> tuple[jax.Array, dict]:
  """SimPO: -log sigmoid(beta * (avg_c - avg_r) - gamma), no reference, no NLL (TRL's CPO, loss_type=simpo, alpha 0)."""
  avg = (policy.average(0), policy.average(1))
  loss = -jax.nn.log_sigmoid(cfg.beta * (avg[0] - avg[1]) - cfg.gamma)
  metrics = _reward_metrics(cfg.beta * avg[0], cfg.beta * avg[1], avg)
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def orpo_loss(cfg: ml_collections.ConfigDict, policy: Sequences) -> tuple[jax.Array, dict]:
  """ORPO's odds-ratio term on length-averaged log-probs, float32 with a stable log1mexp (the NLL comes apart)."""
  avg = tuple(jnp.minimum(policy.average(i).astype(jnp.float32), _MAX_AVG_LOGP) for i in (0, 1))
  log_odds = (avg[0] - avg[1]) - (_log1mexp(avg[0]) - _log1mexp(avg[1]))
  ratio = jax.nn.log_sigmoid(log_odds)
  metrics = _reward_metrics(cfg.beta * avg[0], cfg.beta * avg[1], (policy.average(0), policy.average(1)))
  metrics |= {"log_odds_ratio": ratio, "log_odds_chosen": log_odds}
  return -cfg.beta * ratio, jax.tree.map(jax.lax.stop_gradient, metrics)


def reward_loss(
  cfg: ml_collections.ConfigDict, chosen: jax.Array, rejected: jax.Array, margin: jax.Array | None = None
) -> tuple[jax.Array, dict]:
  """Bradley-Terry: -log sigmoid(r_c - r_r - margin), plus TRL's optional centring term."""
  diff = chosen - rejected - (0.0 if margin is None else margin)
  loss = -jax.nn.log_sigmoid(diff)
  if cfg.center_rewards:  # TRL: coefficient * mean over pairs of (r_c + r_r)^2
    loss = loss + cfg.center_rewards * (chosen + rejected) ** 2
  metrics = {
    "accuracy": (chosen > rejected).astype(jnp.float32),
    "margin": chosen - rejected,
    "mean_reward": 0.5 * (chosen + rejected),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def kto_loss(
  cfg: ml_collections.ConfigDict, policy: Sequences, ref: Sequences, desirable: jax.Array, kl: jax.Array
) -> tuple[jax.Array, dict]:
  """KTO per example (first sequence: the completion; `kl` the batch's detached, clamped KL estimate)."""
  ratio = policy.logps[0] - ref.logps[0]
  good = 1.0 - jax.nn.sigmoid(cfg.beta * (ratio - kl))
  bad = 1.0 - jax.nn.sigmoid(cfg.beta * (kl - ratio))
  loss = jnp.where(desirable, cfg.desirable_weight * good, cfg.undesirable_weight * bad)
  reward = cfg.beta * jax.lax.stop_gradient(ratio)
  logps = jax.lax.stop_gradient(policy.logps[0])
  metrics = {
    "rewards/chosen": jnp.where(desirable, reward, 0.0),
    "rewards/rejected": jnp.where(desirable, 0.0, reward),
    "logps/chosen": jnp.where(desirable, logps, 0.0),
    "logps/rejected": jnp.where(desirable, 0.0, logps),
  }
  return loss, metrics


LossFn = Callable[..., tuple[jax.Array, dict]]


def settings(config: ml_collections.ConfigDict) -> Any:
  """The section of `config` that parameterises its objective (static, hashable values)."""
  name = config.objective
  return ml_collections.FrozenConfigDict(config[name]) if name in config and name != "sft" else None


# ------------------------------------------------------------------------------------------------
# One micro-batch of a sequence-level objective


def _within(segment_ids: jax.Array) -> jax.Array:
  """float32 [..., T - 1]: 1 where the target is in the same (non-padding) segment as the token before it."""
  seg = segment_ids
  return ((seg[..., 1:] == seg[..., :-1]) & (seg[..., 1:] != 0)).astype(jnp.float32)


def _first_sequence(segment_ids: jax.Array) -> jax.Array:
  """float32 [..., T - 1]: targets in the first sequence of a two-sequence example (odd segments)."""
  return _within(segment_ids) * (segment_ids[..., 1:] % 2 == 1).astype(jnp.float32)


def batch_totals(name: str, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """What the objective's means divide by, counted over the whole batch [A, b, T] before any forward pass
  (raw counts: `sequence_loss` divides by at least 1)."""
  seg, mask = batch["segment_ids"], batch["loss_mask"][..., 1:].astype(jnp.float32)
  first = _first_sequence(seg)
  starts = example_starts(seg)
  totals = {"examples": jnp.sum(starts).astype(jnp.float32), "chosen_tokens": jnp.sum(mask * first)}
  if name == "orpo":  # TRL's ORPO NLL: the token mean over the chosen sequences, prompt included
    totals["nll_tokens"] = jnp.sum(first)
  if name == "kto":
    labels = batch["labels"]
    totals["desirable"] = jnp.sum(starts & (labels == 1)).astype(jnp.float32)
    totals["undesirable"] = jnp.sum(starts & (labels == 2)).astype(jnp.float32)
  return totals


def last_scored(ids: jax.Array, segment_ids: jax.Array, pad_id: int) -> jax.Array:
  """float32 [b, T]: each segment's last token that is not `pad_id`, where transformers'
  *ForSequenceClassification pools (it looks for the last non-pad token, so a sequence ending in a
  pad-valued EOS is scored one token earlier, there and here alike)."""
  b, t = ids.shape
  scored = (segment_ids != 0) & (ids != pad_id)
  where = jnp.where(scored, jnp.arange(t)[None, :], -1)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  last = jnp.full((b, t + 2), -1, jnp.int32).at[rows, segment_ids].max(where)
  return (scored & (jnp.take_along_axis(last, segment_ids, axis=1) == jnp.arange(t)[None, :])).astype(jnp.float32)


def sequence_loss(
  name: str,
  cfg: Any,
  model: Any,
  reference: Any,
  mb: dict[str, jax.Array],
  totals: dict[str, jax.Array],
  *,
  chunk: int,
  pad_id: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, metric sums) of one micro-batch [b, T]; both already divided by the whole batch's totals.

  reference: the reference model for DPO / KTO when its log-probs are not in the batch (`ref_logps`).
  """
  totals = {k: jnp.maximum(v, 1.0) for k, v in totals.items()}
  ids, seg = mb["input_ids"], mb["segment_ids"]
  hidden, _ = model.hidden_states(ids, segment_ids=seg, positions=mb.get("positions"))
  if name == "reward":
    scores = model.scores(hidden)[..., 0] * last_scored(ids, seg, pad_id)
    b, t = ids.shape
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    chosen, rejected = pair_slots(jnp.zeros((b, t + 2), jnp.float32).at[rows, seg].add(scores))
    valid = pair_slots(segment_sums(_within(seg), seg))[0] > 0
    margin = None
    if "margins" in mb:  # the pair's margin on each of its tokens: its mean over the chosen sequence's targets
      within = _within(seg)
      margin = pair_slots(segment_sums(mb["margins"][:, 1:] * within, seg))[0]
      margin = margin / jnp.maximum(pair_slots(segment_sums(within, seg))[0], 1.0)
    loss, metrics = reward_loss(cfg, chosen, rejected, margin)
    total, sums = _reduce(loss, metrics, valid, totals["examples"])
    rewards = jax.lax.stop_gradient(jnp.stack([chosen, rejected]))
    sums["min_reward"] = jnp.min(jnp.where(valid, rewards, jnp.inf))
    sums["max_reward"] = jnp.max(jnp.where(valid, rewards, -jnp.inf))
    return total, sums

  weights = mb["loss_mask"][:, 1:].astype(jnp.float32) * _within(seg)
  needed = _first_sequence(seg) + weights if name == "orpo" else weights  # ORPO's NLL reads the chosen prompts too
  logp, top1 = _token_log_probs(model, hidden, ids, needed, chunk)
  policy = sequences(logp, weights, seg)
  valid = policy.valid
  first = _first_sequence(seg) * weights
  accuracy = jnp.sum(top1 * first) / totals["chosen_tokens"]

  if name in WITH_REFERENCE:
    if "ref_logps" in mb:  # precomputed: log p_ref(token t | tokens < t) stored at position t
      ref_logp = mb["ref_logps"][:, 1:].astype(jnp.float32)
    else:
      ref_hidden, _ = reference.hidden_states(ids, segment_ids=seg, positions=mb.get("positions"))
      ref_logp = jax.lax.stop_gradient(_token_log_probs(reference, ref_hidden, ids, weights, chunk)[0])
    ref = sequences(ref_logp, weights, seg)

  if name == "dpo":
    loss, metrics = dpo_loss(cfg, policy, ref)
  elif name == "simpo":
    loss, metrics = simpo_loss(cfg, policy)
  elif name == "orpo":
    loss, metrics = orpo_loss(cfg, policy)
    nll = -jnp.sum(logp * _first_sequence(seg)) / totals["nll_tokens"]
    total, sums = _reduce(loss, metrics, valid, totals["examples"])
    return total + nll, sums | {"nll_loss": jax.lax.stop_gradient(nll), "accuracy": accuracy}
  elif name == "kto":
    return _kto(cfg, policy, ref, mb, seg, totals, accuracy)
  else:
    raise ConfigError(f"objective: unknown {name!r}.")
  total, sums = _reduce(loss, metrics, valid, totals["examples"])
  return total, sums | {"accuracy": accuracy}


def _token_log_probs(
  model: Any, hidden: jax.Array, ids: jax.Array, needed: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
  return token_log_probs(model.logits, hidden[:, :-1], ids[:, 1:], needed, chunk=chunk)


def _reduce(loss: jax.Array, metrics: dict, valid: jax.Array, count: jax.Array) -> tuple[jax.Array, dict]:
  valid = valid.astype(jnp.float32)
  return jnp.sum(loss * valid) / count, {k: jnp.sum(v * valid) / count for k, v in metrics.items()}


def _kto(cfg, policy, ref, mb, seg, totals, accuracy):
  """KTO: the KL estimate is the mean over this micro-batch's mismatched (second) sequences, detached,
  clamped at 0 (TRL computes it per batch: equal when the batch is one micro-batch)."""
  valid = policy.valid
  n = jnp.maximum(jnp.sum(valid), 1.0)
  kl = jnp.maximum(jnp.sum((policy.logps[1] - ref.logps[1]) * valid) / n, 0.0)
  kl = jax.lax.stop_gradient(kl)
  labels = mb["labels"][:, 1:]
  desirable = pair_slots(segment_sums((labels == 1).astype(jnp.float32) * _within(seg), seg))[0] > 0
  loss, metrics = kto_loss(cfg, policy, ref, desirable, kl)
  total = jnp.sum(loss * valid) / totals["examples"]
  sums = {
    "rewards/chosen": jnp.sum(metrics["rewards/chosen"] * valid) / totals["desirable"],
    "rewards/rejected": jnp.sum(metrics["rewards/rejected"] * valid) / totals["undesirable"],
    "logps/chosen": jnp.sum(metrics["logps/chosen"] * valid) / totals["desirable"],
    "logps/rejected": jnp.sum(metrics["logps/rejected"] * valid) / totals["undesirable"],
    "kl": kl,  # one value per micro-batch: the step averages it (PER_MICRO_BATCH)
    "accuracy": accuracy,
  }
  return total, sums


def reference_log_probs(model: Any, batch: dict[str, jax.Array], *, chunk: int = 128) -> jax.Array:
  """float32 [b, T]: log p(token t | tokens < t of its segment) under `model` at every trained (completion)
  token, 0 elsewhere: the `ref_logps` a batch carries when the reference is precomputed."""
  ids, seg = batch["input_ids"], batch["segment_ids"]
  hidden, _ = model.hidden_states(ids, segment_ids=seg, positions=batch.get("positions"))
  needed = batch["loss_mask"][:, 1:].astype(jnp.float32) * _within(seg)
  logp, _ = _token_log_probs(model, hidden, ids, needed, chunk)
  return jnp.pad(logp, [(0, 0), (1, 0)])


# ------------------------------------------------------------------------------------------------
# Evaluation: exact means over a whole split, batch by batch

_DIVISOR = {"accuracy": "chosen_tokens", "nll_loss": "nll_tokens"}
_KTO_DIVISOR = {"rewards/chosen": "desirable", "logps/chosen": "desirable"} | {
  "rewards/rejected": "undesirable",
  "logps/rejected": "undesirable",
}


def _divisor(name: str, key: str) -> str:
  return (_KTO_DIVISOR.get(key) if name == "kto" else None) or _DIVISOR.get(key, "examples")


def combine(sums: dict, more: dict) -> dict:
  """Two micro-batches' (or evaluation batches') metric sums as one: added, or min / max for EXTREMES."""
  return {k: EXTREMES[k][0](v, more[k]) if k in EXTREMES else v + more[k] for k, v in sums.items()}


def no_sums(shapes: dict) -> dict:
  """What `combine` starts from: zeros, and +-inf for the EXTREMES (shapes: ShapeDtypeStructs by key)."""
  return {k: jnp.full(x.shape, EXTREMES[k][1] if k in EXTREMES else 0, x.dtype) for k, x in shapes.items()}


def eval_sums(name: str, loss: jax.Array, means: dict, totals: dict) -> dict:
  """One batch's means turned back into sums (each times its divisor), plus the divisors."""
  sums = {"loss": loss * totals["examples"]}
  for key, value in means.items():
    extreme = key in PER_MICRO_BATCH or key in EXTREMES
    sums[key] = value if extreme else value * totals[_divisor(name, key)]
  sums["batches"] = jnp.ones((), jnp.float32)
  return sums | {f"total/{k}": v for k, v in totals.items()}


def eval_means(name: str, sums: dict) -> dict[str, float]:
  """The split's means from the summed `eval_sums` of all its batches."""
  totals = {k.removeprefix("total/"): float(v) for k, v in sums.items() if k.startswith("total/")}
  out = {}
  for key, value in sums.items():
    if key.startswith("total/") or key == "batches":
      continue
    if key in EXTREMES:
      out[key] = float(value)
    elif key in PER_MICRO_BATCH:
      out[key] = float(value) / max(float(sums["batches"]), 1.0)
    else:
      out[key] = float(value) / max(totals[_divisor(name, key) if key != "loss" else "examples"], 1.0)
  if "rewards/chosen" in out and "rewards/margins" not in out:
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
  out["examples"] = totals["examples"]
  return out
