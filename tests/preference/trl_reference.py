"""TRL 1.16's preference trainers as the reference for jaxtune's preference objectives.

`trl_trajectory(objective, model_dir, records)` trains a copy of the checkpoint in `model_dir` for a few steps with
TRL's own trainer and returns what that trainer logs at each step. The runs are pinned so the JAX side can replay them
exactly: float32 on CPU, full fine-tuning with plain SGD (no momentum, no weight decay), no gradient clipping, a
constant learning rate, the whole record set as one batch (sequential order), no dropout, no truncation, and the
reference model (DPO, KTO) a fresh copy of the initial policy that TRL loads itself from `model_dir`.

The records are token ids, and every trainer is made to consume exactly those ids (TRL's own tokenisation, BOS/EOS
insertion and truncation are bypassed: see `_dpo`, `_paired_ids_trainer`, `_kto`, `_reward`). The harness proves it on
every run: a forward pre-hook on the policy (and the reference model) compares each batch the model receives, and for
ORPO/SimPO the label tensor TRL builds, with tensors built here from the records alone; the run fails if any differs
or if the expected number of forwards was not seen. It also checks that the reference model starts equal to the policy
and never changes, that the policy does change, and that the config has no dropout.

Objectives and options (defaults are TRL 1.16's config defaults, applied by TRL itself when an option is not given):
  "dpo"     trl.DPOTrainer: loss_type ("sigmoid" | "hinge" | "ipo" | "robust"; default "sigmoid"), beta (0.1),
            label_smoothing (0.0, robust only).
  "orpo"    trl.experimental.orpo.ORPOTrainer: beta (0.1; the paper's lambda).
  "simpo"   trl.experimental.cpo.CPOTrainer with loss_type="simpo", cpo_alpha=0: beta (0.1), simpo_gamma (0.5),
            label_smoothing (0.0).
  "kto"     trl.KTOTrainer (loss_type "kto"): beta (0.1), desirable_weight (1.0), undesirable_weight (1.0).
  "reward"  trl.RewardTrainer: score_weight (the [1, hidden] score head; default `reward_score_weight(model_dir)`),
            center_rewards_coefficient (None). A record's optional "margin" is used as TRL uses it.

Records: pairs {"prompt_ids", "chosen_ids", "rejected_ids"} (dpo, orpo, simpo, reward; reward scores prompt+chosen
and prompt+rejected, plus an optional "margin"), unpaired {"prompt_ids", "completion_ids", "label": bool} (kto).
Completions carry whatever end token the caller wants; nothing is added.

Runs in-process (about 1-2 s per run after TRL's 4-8 s import). For the run, torch's determinism flag is on and
transformers/datasets are quiet (errors only, no progress bars); both are restored afterwards. Hub access is off
(HF_HUB_OFFLINE etc. set if unset, telemetry disabled).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from typing import Any

OBJECTIVES = ("dpo", "orpo", "simpo", "kto", "reward")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
OPTIONS = {
  "dpo": {"loss_type", "beta", "label_smoothing"},
  "orpo": {"beta"},
  "simpo": {"beta", "simpo_gamma", "label_smoothing"},
  "kto": {"beta", "desirable_weight", "undesirable_weight"},
  "reward": {"score_weight", "center_rewards_coefficient"},
}
# Forwards per optimisation step, per model: (policy, reference).
FORWARDS = {"dpo": (1, 1), "orpo": (1, 0), "simpo": (1, 0), "kto": (2, 2), "reward": (1, 0)}
# ORPO and CPO keep `max_length` only for their own tokenize_row (replaced here) and generation; None would make them
# warn and use 512. Large enough never to matter.
NO_TRUNCATION = 1 << 20


def reward_score_weight(model_dir: str | os.PathLike, seed: int = 0, std: float = 0.3):
  """The reward model's default initial score head: [1, hidden_size] float32, N(0, std) from numpy's PCG64(seed).

  Numpy only (reads config.json), so the JAX side can rebuild the same head without torch. transformers would draw
  the head from torch's generator with std = initializer_range (0.02), which makes the first rewards tiny; the
  harness overwrites it with this (or with the `score_weight` option).
  """
  import numpy as np

  hidden = json.loads((pathlib.Path(model_dir) / "config.json").read_text())["hidden_size"]
  return np.random.default_rng(seed).normal(0.0, std, size=(1, hidden)).astype(np.float32)


def tokenizer(config):
  """An in-memory word-level tokenizer over the model's vocabulary: "t<id>" for every id, special tokens from config.

  TRL needs a tokenizer object (pad id, vocab checks), never its encoding: the trainers here are fed ids. pad is
  config.pad_token_id, or eos where the config has none (TRL's own fallback).
  """
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  names = {i: f"t{i}" for i in range(config.vocab_size)}
  pad_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
  special = {"pad_token": pad_id, "bos_token": config.bos_token_id, "eos_token": config.eos_token_id}
  for key, i in special.items():
    if i is not None and names[i].startswith("t"):
      names[i] = f"<{key[:-6]}>"
  vocab = {name: i for i, name in names.items()}
  backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=names[pad_id]))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  kwargs = {key: names[i] for key, i in special.items() if i is not None}
  return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def trl_trajectory(
  objective: str,
  model_dir: str | os.PathLike,
  records: list[dict],
  *,
  steps: int = 3,
  lr: float = 1e-3,
  seed: int = 0,
  dtype: str = "float32",
  **options: Any,
) -> list[dict[str, float]]:
  """TRL's logged metrics for each of the first `steps` optimisation steps of `objective` on `records`.

  Element k holds what the trainer logged at step k + 1 (logging_steps=1), computed with the parameters after k SGD
  updates: "loss" (transformers' Trainer: the step's training loss) and the trainer's own metrics under its own
  names (e.g. "rewards/chosen", "logps/rejected", "kl", "accuracy"), plus Trainer's "grad_norm" (the norm of the
  full unclipped gradient), "learning_rate" and "epoch".

  `dtype` "float64" runs the same in double precision (ORPO still rounds its sequence log-probs to float32, as TRL
  does): the spread between the two runs is float32's own noise on each metric, the floor of any float32 comparison.
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"objective {objective!r} not in {OBJECTIVES}")
  unknown = set(options) - OPTIONS[objective]
  if unknown:
    raise ValueError(f"{objective} takes options {sorted(OPTIONS[objective])}, not {sorted(unknown)}")
  if objective == "dpo" and options.get("loss_type", "sigmoid") not in DPO_LOSS_TYPES:
    raise ValueError(f"dpo loss_type {options['loss_type']!r} not in {DPO_LOSS_TYPES}")
  if dtype not in ("float32", "float64"):
    raise ValueError(f"dtype {dtype!r} is float32 (the reference) or float64 (its noise)")
  import torch

  deterministic = torch.are_deterministic_algorithms_enabled()
  torch.use_deterministic_algorithms(True)
  try:
    with _quiet():
      return _run(
        objective, str(model_dir), _validated(objective, records), steps, lr, seed, getattr(torch, dtype), options
      )
  finally:
    torch.use_deterministic_algorithms(deterministic)


def expected_batches(objective: str, records: list[dict], pad_id: int) -> dict[str, dict[str, list[list[int]]]]:
  """What the model must receive, built from the records alone: {"main": ..., "KL": ... (kto)} of
  {"input_ids", "attention_mask", "labels"} as nested lists (labels: the id where a completion token is scored,
  -100 elsewhere; reward: no labels). Right padding with `pad_id` to the longest row, attention 0 there.
  """
  if objective == "kto":
    n = len(records)
    main = [(r["prompt_ids"], r["completion_ids"]) for r in records]
    # TRL's KL pairs: prompt i with the completion of record i - 1 (record 0 with the last), kto_trainer.py:1150.
    kl = [(records[i]["prompt_ids"], records[(i - 1) % n]["completion_ids"]) for i in range(n)]
    return {"main": _rows(main, pad_id), "KL": _rows(kl, pad_id)}
  rows = [(r["prompt_ids"], r["chosen_ids"]) for r in records] + [(r["prompt_ids"], r["rejected_ids"]) for r in records]
  batch = _rows(rows, pad_id)
  if objective == "reward":
    del batch["labels"]
  return {"main": batch}


def _rows(pairs, pad_id):
  width = max(len(p) + len(c) for p, c in pairs)
  out = {"input_ids": [], "attention_mask": [], "labels": []}
  for p, c in pairs:
    fill = width - len(p) - len(c)
    out["input_ids"].append(p + c + [pad_id] * fill)
    out["attention_mask"].append([1] * (len(p) + len(c)) + [0] * fill)
    out["labels"].append([-100] * len(p) + c + [-100] * fill)
  return out


def _validated(objective, records):
  if not records:
    raise ValueError("no records")
  keys = ("prompt_ids", "completion_ids") if objective == "kto" else ("prompt_ids", "chosen_ids", "rejected_ids")
  out = []
  for r in records:
    v = {k: [int(t) for t in r[k]] for k in keys}
    if not v["prompt_ids"] or not all(v[k] for k in keys[1:]):
      raise ValueError(f"empty prompt or completion in {r}")  # TRL scores position t from t - 1: a prompt is needed
    if objective == "kto":
      v["label"] = bool(r["label"])
    if objective == "reward" and "margin" in r:
      v["margin"] = float(r["margin"])
    out.append(v)
  if objective == "reward" and len({"margin" in r for r in out}) > 1:
    raise ValueError("either every record has a margin or none has")
  return out


@contextlib.contextmanager
def _quiet():
  """Offline and silent for the run: no telemetry thread, no hub lookups, no progress bars, no info logs."""
  for key in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(key, "1")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO and CPO live in trl.experimental
  import warnings

  import datasets
  import huggingface_hub.constants
  import transformers
  from transformers.utils import logging as hf_logging

  huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY = True  # read at call time; the env var only at import
  verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
  dataset_bars = datasets.is_progress_bar_enabled()
  datasets.disable_progress_bars()
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", FutureWarning)  # transformers 5.25's gradient -> activation checkpointing renames
      yield
  finally:
    transformers.logging.set_verbosity(verbosity)
    if bars:
      transformers.logging.enable_progress_bar()
    if dataset_bars:
      datasets.enable_progress_bars()


def _run(objective, model_dir, records, steps, lr, seed, dtype, options):
  import datasets
  import transformers

  config = transformers.AutoConfig.from_pretrained(model_dir)
  dropouts = {k: v for k, v in config.to_dict().items() if "dropout" in k and v}
  if dropouts:
    raise ValueError(f"{model_dir}: dropout in the config {dropouts} (TRL only zeroes nn.Dropout modules)")
  tok = tokenizer(config)
  pad_id = tok.pad_token_id
  expected = expected_batches(objective, records, pad_id)
  if objective == "reward":
    # transformers' *ForSequenceClassification scores the rightmost token whose id is not pad_token_id
    # (modeling_layers.py GenericForSequenceClassification.forward): a sequence ending in the pad id is scored
    # elsewhere. The hook below also checks the pooled position of every row.
    ends = [ids[n - 1] for ids, n in zip(expected["main"]["input_ids"], _lengths(expected["main"]), strict=True)]
    if pad_id in ends:
      raise ValueError(f"a reward sequence ends in the pad id {pad_id}: the score would pool an earlier token")

  with tempfile.TemporaryDirectory(prefix="trl-reference-") as out:
    common = dict(
      output_dir=out,
      max_steps=steps,
      learning_rate=lr,
      lr_scheduler_type="constant",
      warmup_steps=0,
      optim="sgd",  # torch.optim.SGD(lr): momentum 0, dampening 0, nesterov False; weight decay below
      weight_decay=0.0,
      max_grad_norm=0.0,  # Trainer clips only `if args.max_grad_norm > 0` (None would raise there)
      per_device_train_batch_size=len(records),
      gradient_accumulation_steps=1,
      train_sampling_strategy="sequential",
      logging_steps=1,
      save_strategy="no",
      eval_strategy="no",
      report_to="none",
      use_cpu=True,
      bf16=False,
      fp16=False,
      activation_checkpointing=False,  # transformers 5.25's name; TRL's configs default gradient_checkpointing=True
      disable_dropout=True,
      seed=seed,
      data_seed=seed,
      disable_tqdm=True,
      dataloader_num_workers=0,
    )
    load = dict(dtype=dtype, attn_implementation="eager")
    dataset = datasets.Dataset.from_list(records)
    trainer = _TRAINERS[objective](model_dir, dataset, tok, common, load, options)
    watch = _Watch(objective, expected, pad_id)
    policy, ref = trainer.model, getattr(trainer, "ref_model", None)
    if (ref is not None) != bool(FORWARDS[objective][1]):
      raise AssertionError(f"{objective}: reference model {'missing' if ref is None else 'unexpected'}")
    if ref is not None and (ref is policy or not _same(ref, policy)):
      raise AssertionError(f"{objective}: TRL's reference model is not a separate copy of the initial policy")
    initial = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    handles = [policy.register_forward_pre_hook(watch.hook("policy"), with_kwargs=True)]
    if ref is not None:
      handles.append(ref.register_forward_pre_hook(watch.hook("ref"), with_kwargs=True))
    logs = []
    trainer.remove_callback(transformers.PrinterCallback)  # disable_tqdm=True would print every log
    trainer.add_callback(_recorder(logs))
    try:
      trainer.train()
    finally:
      for h in handles:
        h.remove()
    watch.check_counts(steps)
    if getattr(trainer, "_checked_batches", steps) != steps:
      raise AssertionError(f"{objective}: {trainer._checked_batches} concatenated batches checked in {steps} steps")
    if ref is not None and not _same(ref, initial):
      raise AssertionError(f"{objective}: the reference model changed during training")
    if lr and _same(policy, initial):
      raise AssertionError(f"{objective}: the policy did not change")
    if len(logs) != steps:
      raise AssertionError(f"{objective}: {len(logs)} training logs for {steps} steps")
  return logs


def _lengths(batch):
  return [sum(m) for m in batch["attention_mask"]]


def _same(model, other) -> bool:
  import torch

  theirs = other if isinstance(other, dict) else other.state_dict()
  mine = model.state_dict()
  return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def _recorder(logs):
  from transformers import TrainerCallback

  class Recorder(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
      if logs and "loss" in logs:  # the per-step training log, not the end-of-training summary ("train_loss")
        into.append({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})

  into = logs
  return Recorder()


class _Watch:
  """Checks every forward of the watched models against the batches built from the records."""

  def __init__(self, objective, expected, pad_id):
    self.objective, self.expected, self.pad_id = objective, expected, pad_id
    self.seen = {"policy": [], "ref": []}

  def hook(self, who):
    def pre_hook(module, args, kwargs):
      import torch

      input_ids = args[0] if args else kwargs.get("input_ids")
      got = {"input_ids": input_ids, "attention_mask": kwargs.get("attention_mask")}
      if self.objective in ("dpo", "kto"):
        # DPO and KTO pass the scored positions to the fused LM head as labels; ORPO/CPO compute log-probs from the
        # logits with their own label tensor (checked in their concatenated_inputs), the reward model has none.
        got["labels"] = kwargs.get("labels")
      for name, batch in self.expected.items():
        if all(v is not None and torch.equal(v.cpu(), torch.tensor(batch[k], dtype=v.dtype)) for k, v in got.items()):
          self.seen[who].append(name)
          break
      else:
        shown = {k: (None if v is None else v.tolist()) for k, v in got.items()}
        raise AssertionError(f"{self.objective} {who} forward got {shown}, expected one of {self.expected}")
      if self.objective == "reward":
        ids = input_ids
        last = (torch.arange(ids.shape[1]) * (ids != self.pad_id)).argmax(-1)
        if last.tolist() != [n - 1 for n in _lengths(self.expected["main"])]:
          raise AssertionError(f"reward pooling at {last.tolist()}, not at each sequence's last token")

    return pre_hook

  def check_counts(self, steps):
    per_step = dict(zip(("policy", "ref"), FORWARDS[self.objective], strict=True))
    for who, n in per_step.items():
      seen = self.seen[who]
      if len(seen) != n * steps:
        raise AssertionError(f"{self.objective}: {len(seen)} {who} forwards in {steps} steps, expected {n * steps}")
      if self.objective == "kto" and sorted(seen) != sorted(["main", "KL"] * steps):
        raise AssertionError(f"kto {who} forwards {seen}: expected a main and a KL forward per step")


# --- One builder per objective: (model_dir, dataset, tokenizer, common TrainingArguments, load kwargs, options) ---


def _dpo(model_dir, dataset, tok, common, load, options):
  import transformers
  from trl import DPOConfig, DPOTrainer

  class IdsDPOTrainer(DPOTrainer):
    # dpo_trainer.py:1036 `_prepare_dataset` extracts the prompt, appends EOS to the text and tokenises; the
    # records already are its output columns (prompt_ids, chosen_ids, rejected_ids), which DataCollatorForPreference
    # (dpo_trainer.py:146) concatenates as they are.
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
      return dataset

  args = DPOConfig(**common, max_length=None, precompute_ref_log_probs=False, **options)
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **load)
  return IdsDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)


def _paired_ids_row(feature, model=None):
  """ORPO/CPO `tokenize_row` for ids: the decoder-only output of orpo_trainer.py:458 (cpo_trainer.py:476) without its
  tokenisation, BOS prepending, EOS appending and truncation. Labels: -100 over the prompt, the ids over the
  completion."""
  p, c, r = feature["prompt_ids"], feature["chosen_ids"], feature["rejected_ids"]
  return {
    "chosen_input_ids": p + c,
    "chosen_attention_mask": [1] * (len(p) + len(c)),
    "chosen_labels": [-100] * len(p) + c,
    "rejected_input_ids": p + r,
    "rejected_attention_mask": [1] * (len(p) + len(r)),
    "rejected_labels": [-100] * len(p) + r,
    "prompt_input_ids": p,
    "prompt_attention_mask": [1] * len(p),
  }


def _paired_ids_trainer(base):
  """`base` (ORPOTrainer or CPOTrainer) fed ids, with the concatenated batch checked against the records."""

  class IdsTrainer(base):
    def tokenize_row(self, feature, model=None):
      return _paired_ids_row(feature, model)

    def concatenated_inputs(self, batch, is_encoder_decoder=False, padding_value=0, device=None):
      out = base.concatenated_inputs(batch, is_encoder_decoder, padding_value, device)
      expected = self._expected_batch
      for mine in ("input_ids", "attention_mask", "labels"):
        theirs = f"concatenated_{mine}"
        if out[theirs].tolist() != expected[mine]:
          raise AssertionError(f"{base.__name__} {theirs} {out[theirs].tolist()} != {expected[mine]}")
      self._checked_batches += 1
      return out

  return IdsTrainer


def _orpo(model_dir, dataset, tok, common, load, options):
  import transformers
  from trl.experimental.orpo import ORPOConfig, ORPOTrainer

  args = ORPOConfig(**common, max_length=NO_TRUNCATION, remove_unused_columns=False, **options)
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **load)
  trainer = _paired_ids_trainer(ORPOTrainer)(model=model, args=args, train_dataset=dataset, processing_class=tok)
  return _with_batch_check(trainer, dataset, tok)


def _simpo(model_dir, dataset, tok, common, load, options):
  import transformers
  from trl.experimental.cpo import CPOConfig, CPOTrainer

  args = CPOConfig(
    **common, max_length=NO_TRUNCATION, remove_unused_columns=False, loss_type="simpo", cpo_alpha=0.0, **options
  )
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **load)
  trainer = _paired_ids_trainer(CPOTrainer)(model=model, args=args, train_dataset=dataset, processing_class=tok)
  return _with_batch_check(trainer, dataset, tok)


def _with_batch_check(trainer, dataset, tok):
  trainer._expected_batch = expected_batches("dpo", list(dataset), tok.pad_token_id)["main"]
  trainer._checked_batches = 0
  return trainer


def _kto(model_dir, dataset, tok, common, load, options):
  import transformers
  from trl import KTOConfig, KTOTrainer

  class IdsKTOTrainer(KTOTrainer):
    # kto_trainer.py:1044 `_prepare_dataset` extracts/unpairs, appends EOS to the text and tokenises into
    # prompt_ids/completion_ids (the records), then adds the KL completions; only that last step is kept, as TRL
    # writes it (kto_trainer.py:1150-1156): each batch of per_device_train_batch_size rotated by one.
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
      def add_kl_completion_ids(examples):
        examples["KL_completion_ids"] = [examples["completion_ids"][-1]] + examples["completion_ids"][:-1]
        return examples

      return dataset.map(add_kl_completion_ids, batched=True, batch_size=args.per_device_train_batch_size)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
      _check_column("kto label", inputs["label"], [r["label"] for r in dataset])
      return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

  args = KTOConfig(**common, max_length=None, precompute_ref_log_probs=False, loss_type="kto", **options)
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **load)
  return IdsKTOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)


def _reward(model_dir, dataset, tok, common, load, options):
  import torch
  import transformers
  from trl import RewardConfig, RewardTrainer
  from trl.trainer.reward_trainer import suppress_seqcls_warning

  options = dict(options)
  weight = options.pop("score_weight", None)
  weight = reward_score_weight(model_dir) if weight is None else weight
  # reward_trainer.py:649 skips tokenisation when the dataset has chosen_ids and rejected_ids: the reward model
  # reads prompt + completion as one sequence.
  dataset = dataset.map(
    lambda r: {"chosen_ids": r["prompt_ids"] + r["chosen_ids"], "rejected_ids": r["prompt_ids"] + r["rejected_ids"]},
    remove_columns=["prompt_ids"],
  )
  args = RewardConfig(**common, max_length=None, **options)
  with suppress_seqcls_warning():  # score.weight missing, lm_head.weight unused: expected
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, **load)
  lm = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **load)
  with torch.no_grad():
    model.score.weight.copy_(torch.as_tensor(weight).to(model.dtype).reshape(model.score.weight.shape))
  backbone = {f"model.{k}": v for k, v in lm.model.state_dict().items()}
  if not _same_subset(model, backbone):
    raise AssertionError("the reward model's backbone is not the causal LM's")
  margins = [r["margin"] for r in dataset] if "margin" in dataset.column_names else None

  class CheckedRewardTrainer(RewardTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
      _check_column("reward margin", inputs.get("margin"), margins)
      return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

  return CheckedRewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)


def _check_column(name, got, want):
  """A per-record column of the collated batch (KTO's label, the reward margin) against the records."""
  import torch

  same = (
    got is None if want is None else got is not None and torch.equal(got.cpu(), torch.tensor(want, dtype=got.dtype))
  )
  if not same:
    raise AssertionError(f"{name}: batch has {None if got is None else got.tolist()}, records say {want}")


def _same_subset(model, weights):
  import torch

  mine = {k: v for k, v in model.state_dict().items() if not k.startswith("score.")}
  return mine.keys() == weights.keys() and all(torch.equal(mine[k], weights[k]) for k in mine)


_TRAINERS = {"dpo": _dpo, "orpo": _orpo, "simpo": _simpo, "kto": _kto, "reward": _reward}
