"""GRPO's batches: prompts -> G sampled completions each -> rewards -> advantages -> a train batch.

The loop asks `Rollout.batch(model, step)` for each step's batch instead of reading a data iterator.
Sampling runs `jaxtune.generation.sample` (the jitted KV-cache loop) on the model made from the train
state's own arrays: the same weights, sharding and mesh as the step, no copy. The prompts of
generation g are a fixed function of (seed, g) and its sampling key is fold_in(key(seed), g), so a
resumed run samples what the uninterrupted one did; with num_iterations > 1 the batch being reused
is saved in the checkpoint's data state.

Prompt files are JSONL: {"messages": [...]} chat records (a last assistant turn is the reference
answer, not part of the prompt) or {"prompt": text or messages}; every other field of a record is
passed to the reward functions.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import inspect
import json
import math
import pathlib
import re
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from jaxtune import generation
from jaxtune.errors import ConfigError, UserError
from jaxtune.eval import metrics as metrics_lib
from jaxtune.train import grpo

_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*(?:\.\d+)?")


@dataclasses.dataclass(frozen=True)
class Prompt:
  messages: list[dict]
  reference: str | None  # the record's answer (its last assistant turn), for the built-in rewards
  fields: dict  # the record's other fields, passed to reward functions by name


def load_prompts(paths: Sequence[str]) -> list[Prompt]:
  """The prompts of JSONL files of chat records ({"messages": [...]}) or {"prompt": ...} records."""
  prompts = []
  for path in paths:
    for n, line in enumerate(pathlib.Path(path).read_text().splitlines(), start=1):
      if not line.strip():
        continue
      record = json.loads(line)
      messages = record.pop("messages", None) or record.pop("prompt", None)
      if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
      if not messages:
        raise UserError(f"{path}:{n}: a GRPO record needs 'messages' (a chat) or 'prompt' (text or messages).")
      reference = record.get("answer")
      if messages[-1].get("role") == "assistant":
        reference, messages = messages[-1]["content"], messages[:-1]
      prompts.append(Prompt(messages, reference, record))
  return prompts


# ------------------------------------------------------------------------------------------------
# Rewards


def _json_valid(prediction: str, references: Sequence[str]) -> float:
  """1 when the completion parses as a JSON object."""
  try:
    return float(isinstance(json.loads(prediction.strip()), dict))
  except (json.JSONDecodeError, TypeError):
    return 0.0


def _numbers(text: str) -> list[float]:
  return [float(m.replace(",", "")) for m in _NUMBER.findall(text)]


def _numeric(prediction: str, references: Sequence[str]) -> float:
  """1 when the completion's last number equals the reference's last number."""
  got = _numbers(prediction)
  return float(bool(got) and any(_numbers(r)[-1:] == got[-1:] for r in references))


BUILTIN_REWARDS = {"json_valid": _json_valid, "numeric": _numeric}  # plus format:REGEX and every metric


@dataclasses.dataclass(frozen=True)
class Reward:
  name: str  # logged as rewards/<name>/mean
  fn: Callable[..., Sequence[float]]  # fn(prompts=, completions=, **fields) -> one float per completion


def _per_completion(name: str, score: Callable[[str, Sequence[str]], float]) -> Reward:
  def fn(prompts, completions, reference, **_):
    if any(r is None for r in reference):
      raise UserError(
        f"grpo.reward_funcs: {name} scores against the reference answer; give each record a last assistant turn "
        "or an 'answer' field."
      )
    return [score(c, [r]) for c, r in zip(completions, reference)]

  return Reward(name, fn)


def reward(spec: str) -> Reward:
  """A reward by name: json_valid, numeric, format:REGEX, a metric of jaxtune/eval/metrics.py, or module:function."""
  spec = spec.strip()
  if spec.startswith("format:"):
    pattern = re.compile(spec.removeprefix("format:"), re.DOTALL)
    return Reward("format", lambda prompts, completions, **_: [float(bool(pattern.fullmatch(c))) for c in completions])
  if spec in BUILTIN_REWARDS:
    return _per_completion(spec, BUILTIN_REWARDS[spec])
  if ":" not in spec:
    try:
      return _per_completion(spec, metrics_lib.get(spec).score)
    except metrics_lib.MetricError:
      known = ", ".join(list(BUILTIN_REWARDS) + list(metrics_lib.REGISTRY) + ["format:REGEX", "module:function"])
      raise ConfigError(f"grpo.reward_funcs: unknown reward {spec!r}; valid: {known}.") from None
  module_name, _, attr = spec.partition(":")
  try:
    fn = getattr(importlib.import_module(module_name), attr)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f"grpo.reward_funcs: {spec!r} not found ({e}); give an importable module:function.") from None
  try:
    inspect.signature(fn).bind(prompts=[], completions=[])
  except TypeError:
    raise ConfigError(
      f"grpo.reward_funcs: {spec} must accept fn(prompts, completions, **kwargs) (keyword arguments) and return "
      "one float per completion."
    ) from None
  return Reward(attr, fn)


def rewards(specs: Sequence[str]) -> list[Reward]:
  """`reward` of each spec, named apart for the metrics: a name given twice (two format:REGEX rewards, say) is
  logged as NAME, NAME_2, ..."""
  out, seen = [], collections.Counter()
  for spec in specs:
    r = reward(spec)
    seen[r.name] += 1
    out.append(r if seen[r.name] == 1 else dataclasses.replace(r, name=f"{r.name}_{seen[r.name]}"))
  return out


def score(rewards: Sequence[Reward], prompts: list, completions: list[str], fields: dict) -> np.ndarray:
  """float32 [N, F]: each reward function on every completion; UserError naming a function that fails."""
  out = np.zeros((len(completions), len(rewards)), np.float32)
  for j, r in enumerate(rewards):
    try:
      values = list(r.fn(prompts=prompts, completions=completions, **fields))
    except UserError:
      raise
    except Exception as e:
      raise UserError(
        f"grpo.reward_funcs: {r.name} raised {type(e).__name__}: {e}{_culprit(r, prompts, completions, fields)}"
      ) from e
    if len(values) != len(completions):
      raise UserError(f"grpo.reward_funcs: {r.name} returned {len(values)} values for {len(completions)} completions.")
    for i, v in enumerate(values):
      if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(float(v)):
        raise UserError(
          f"grpo.reward_funcs: {r.name} returned {v!r} (not a finite number) for the completion {completions[i]!r}."
        )
      out[i, j] = float(v)
  return out


def _culprit(r: Reward, prompts: list, completions: list[str], fields: dict) -> str:
  """ ", on the completion '...'": the first completion the function fails on alone (empty if none)."""
  for i, completion in enumerate(completions):
    try:
      r.fn(prompts=prompts[i : i + 1], completions=[completion], **{k: v[i : i + 1] for k, v in fields.items()})
    except Exception:
      return f", on the completion {completion!r}"
  return ""


# ------------------------------------------------------------------------------------------------
# The batches


def completion_lengths(tokens: np.ndarray, stop_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """(tokens of each completion up to and including its first stop token, whether it has one) of [rows, N]."""
  stopped = np.isin(tokens, stop_ids)
  ended = stopped.any(1)
  return np.where(ended, stopped.argmax(1) + 1, tokens.shape[1]), ended


def layout(
  ids: np.ndarray,
  mask: np.ndarray,
  tokens: np.ndarray,
  logps: np.ndarray,
  adv: np.ndarray,
  lengths: np.ndarray,
  ended: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
  """The train batch [rows, P + N] of left-padded prompts (ids, mask [rows, P]) and their completions (tokens and
  sampler log-probs [rows, N], `lengths`): one segment per row, positions as the sampler's, the completion
  trained (not when `ended` is given and False: mask_truncated_completions)."""
  n = tokens.shape[1]
  completion = (np.arange(n)[None] < lengths[:, None]).astype(np.int32)
  trained = completion * (1 if ended is None else ended[:, None])
  seg = np.concatenate([mask, completion], 1).astype(np.int32)
  return {
    "input_ids": np.concatenate([ids, tokens], 1).astype(np.int32),
    "segment_ids": seg,
    "positions": (np.maximum(np.cumsum(seg, 1) - 1, 0) * seg).astype(np.int32),
    "loss_mask": np.concatenate([np.zeros_like(mask), trained], 1).astype(np.int32),
    "old_logps": np.concatenate([np.zeros(mask.shape, np.float32), logps * completion], 1).astype(np.float32),
    "advantages": np.broadcast_to(np.asarray(adv, np.float32)[:, None], seg.shape).copy(),
  }


class Rollout:
  """Makes each GRPO step's batch; stands where a data iterator stands in the run (state, close)."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any, prompts: list[Prompt]):
    g = config.grpo
    self.cfg, self.seed = g, config.train.seed
    self.tokenizer, self.prompts = tokenizer, prompts
    self.per_step = config.data.batch_size // g.num_generations
    if len(prompts) < self.per_step:
      raise ConfigError(
        f"data.batch_size: {config.data.batch_size} completions need {self.per_step} prompts per step, but "
        f"data.train holds {len(prompts)}; lower data.batch_size or add prompts."
      )
    self.rewards = rewards(g.reward_funcs)
    self.weights = np.asarray(g.reward_weights or [1.0] * len(self.rewards), np.float32)
    self.ids = generation.encode_prompts(tokenizer, [p.messages for p in prompts], chat=True)
    # One prompt length for the run (one compiled sampler and step), rounded up to 8.
    self.prompt_len = generation.left_pad([max(self.ids, key=len)], bucket=8)[0].shape[1]
    self.longest_row = self.prompt_len + g.max_completion_length
    if self.longest_row > config.data.max_seq_len:
      longest = max(len(i) for i in self.ids)
      raise ConfigError(
        f"data.max_seq_len: {config.data.max_seq_len} leaves no room for the longest prompt ({longest} tokens, "
        f"padded to {self.prompt_len}) and grpo.max_completion_length={g.max_completion_length}; raise "
        f"data.max_seq_len to {self.longest_row} or shorten the completions."
      )
    self.stop_ids = generation.stop_token_ids(tokenizer)
    self.batches_per_epoch = max(len(prompts) // self.per_step, 1)
    self._cached: tuple[int, dict, dict] | None = None  # (generation, batch, metrics) reused by num_iterations
    self.last: list[tuple[str, str, float]] = []  # (prompt, completion, reward) of the latest generation

  # The data-iterator protocol the run uses.
  def get_state(self) -> dict:
    if self._cached is None or self.cfg.num_iterations == 1:
      return {}
    g, batch, metrics = self._cached
    return {"generation": g, "batch": {k: v.tolist() for k, v in batch.items()}, "metrics": metrics}

  def set_state(self, state: dict) -> None:
    if state and "batch" in state:
      batch = {
        k: np.asarray(v, np.float32 if k in ("old_logps", "advantages") else np.int32)
        for k, v in state["batch"].items()
      }
      self._cached = (state["generation"], batch, state["metrics"])

  def close(self) -> None:
    pass

  def _chosen(self, generation_index: int) -> list[int]:
    """The prompts of one generation: consecutive slices of a permutation drawn per epoch from (seed, epoch)."""
    epoch, i = divmod(generation_index, self.batches_per_epoch)
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))
    return order[i * self.per_step : (i + 1) * self.per_step].tolist()

  def batch(self, model: Any, step: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Step `step`'s batch (int32 / float32 [rows, P + N]) and the rollout's metrics."""
    g = (step - 1) // self.cfg.num_iterations
    if self._cached is not None and self._cached[0] == g:
      return self._cached[1], self._cached[2]
    model.set_attributes(deterministic=True, raise_if_not_found=False)
    batch, metrics = self.generate(model, self._chosen(g), jax.random.fold_in(jax.random.key(self.seed), g))
    self._cached = (g, batch, metrics)
    return batch, metrics

  def lower(self, model: Any) -> jax.stages.Lowered:
    """The sampler's program for one step's rows, lowered: the memory pre-flight reads its KV cache from it."""
    cfg = self.cfg
    return generation.lower_sample(
      model,
      self.per_step * cfg.num_generations,
      self.prompt_len,
      stop_ids=self.stop_ids,
      max_new_tokens=cfg.max_completion_length,
      temperature=cfg.temperature,
      top_k=cfg.top_k,
      top_p=cfg.top_p,
      log_probs=True,
    )

  def generate(self, model: Any, chosen: list[int], key: jax.Array) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Samples G completions of each chosen prompt, scores them, and lays out the train batch."""
    cfg, G, N = self.cfg, self.cfg.num_generations, self.cfg.max_completion_length
    rows = [i for i in chosen for _ in range(G)]
    ids, mask = generation.left_pad([self.ids[i] for i in rows], self.prompt_len, bucket=8)
    start = time.perf_counter()
    out = generation.sample(
      model,
      ids,
      mask,
      key,
      max_new_tokens=N,
      temperature=cfg.temperature,
      top_k=cfg.top_k,
      top_p=cfg.top_p,
      stop_ids=self.stop_ids,
      log_probs=True,
    )
    tokens, logps, steps = (np.asarray(x) for x in jax.device_get(tuple(out)))
    seconds = time.perf_counter() - start
    lengths, ended = completion_lengths(tokens, self.stop_ids)
    texts = [self.tokenizer.decode(t[:n], skip_special_tokens=True).strip() for t, n in zip(tokens, lengths)]

    prompts = [self.prompts[i] for i in rows]
    fields = {k: [p.fields.get(k) for p in prompts] for k in {k for p in prompts for k in p.fields}}
    fields["reference"] = [p.reference for p in prompts]
    per_func = score(self.rewards, [p.messages for p in prompts], texts, fields)
    total = per_func @ self.weights
    adv, group_std = grpo.advantages(total, G, cfg.scale_rewards, cfg.advantage)

    batch = layout(ids, mask, tokens, logps, adv, lengths, ended if cfg.mask_truncated_completions else None)
    metrics = {
      "reward": float(total.mean()),
      "reward_std": float(np.std(total, ddof=1)),
      "frac_reward_zero_std": float(np.mean(np.isclose(group_std, 0.0))),
      "completions/mean_length": float(lengths.mean()),
      "completions/min_length": float(lengths.min()),
      "completions/max_length": float(lengths.max()),
      "completions/clipped_ratio": float(1.0 - ended.mean()),
      # decode slots spent on rows that had already stopped: the batch runs until its longest row ends
      "wasted_tokens": float(len(rows) * int(steps) - lengths.sum()),
      "rollout_tokens_per_s": float(lengths.sum() / max(seconds, 1e-9)),
      "time/generation_s": seconds,
    }
    for j, r in enumerate(self.rewards):
      metrics[f"rewards/{r.name}/mean"] = float(per_func[:, j].mean())
      metrics[f"rewards/{r.name}/std"] = float(np.std(per_func[:, j], ddof=1))
    self.last = [(prompts[i].messages[-1]["content"], texts[i], float(total[i])) for i in range(len(rows))]
    return batch, metrics
