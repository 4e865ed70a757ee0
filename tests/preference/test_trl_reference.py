"""The TRL reference harness (trl_reference.py): first-step invariants, and TRL_SEMANTICS.md's formulas as an
independent plain-torch implementation that must reproduce TRL's whole logged trajectory.

The fast test runs DPO (sigmoid) on the tiny Llama: about 6 s, most of it `import trl`. The matrix is slow (~30 s):
every objective on both families, each checked against `spec_trajectory` below, which computes the loss and every
metric from the formulas in TRL_SEMANTICS.md and takes the same plain SGD steps.
"""

import math

import pytest
import tiny_models
import trl_reference

# Learning rates at which every metric of steps 2-3 is well above float32's own noise (TRL_SEMANTICS.md, "Choosing
# the learning rate"): float32 against float64 differs by < 2.5e-5 relative on every metric at these.
LR = {"dpo": 1e-2, "ipo": 1e-3, "orpo": 1e-2, "simpo": 3e-2, "kto": 1e-1, "reward": 1e-2}
# KTO's kl is a mean of differences of ~25-nat sequence log-probs (float32 ulp 2e-6): its own noise is absolute.
ABS_TOL = {"kl": 1e-5}
CASES = [
  ("dpo", {"loss_type": "sigmoid"}),
  ("dpo", {"loss_type": "hinge"}),
  ("dpo", {"loss_type": "ipo"}),
  ("dpo", {"loss_type": "robust", "label_smoothing": 0.1}),
  ("dpo", {"loss_type": "sigmoid", "beta": 0.5}),
  ("orpo", {}),
  ("orpo", {"beta": 0.5}),
  ("simpo", {}),
  ("simpo", {"beta": 2.0, "simpo_gamma": 1.0}),
  ("kto", {}),
  ("kto", {"desirable_weight": 0.5, "undesirable_weight": 1.5}),
  ("reward", {}),
  ("reward", {"margins": True}),
  ("reward", {"center_rewards_coefficient": 0.01}),
]


def records_for(objective, margins=False):
  return tiny_models.kto_records() if objective == "kto" else tiny_models.pairs(margins=margins)


def test_dpo_sigmoid_first_step_and_movement(tiny_dirs):
  logs = trl_reference.trl_trajectory("dpo", tiny_dirs["llama"], tiny_models.pairs(), steps=3, lr=1e-2)
  assert len(logs) == 3
  first = logs[0]
  assert abs(first["loss"] - math.log(2)) < 1e-6
  for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
    assert first[key] == 0.0, (key, first[key])
  assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
  assert logs[2]["loss"] < logs[1]["loss"] < logs[0]["loss"]
  assert logs[2]["rewards/margins"] > logs[1]["rewards/margins"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("objective,options", CASES, ids=[f"{o}-{'-'.join(map(str, p.values()))}" for o, p in CASES])
def test_trajectory_matches_the_written_semantics(tiny_dirs, family, objective, options):
  options = dict(options)
  records = records_for(objective, options.pop("margins", False))
  lr = LR["ipo" if options.get("loss_type") == "ipo" else objective]
  trl = trl_reference.trl_trajectory(objective, tiny_dirs[family], records, lr=lr, **options)
  spec = spec_trajectory(objective, tiny_dirs[family], records, steps=3, lr=lr, **options)
  first_step_invariants(objective, options, records, trl[0])
  for step, (got, want) in enumerate(zip(trl, spec, strict=True), 1):
    assert set(want) <= set(got), sorted(set(want) - set(got))
    for key, value in want.items():
      assert math.isclose(got[key], value, rel_tol=2e-5, abs_tol=ABS_TOL.get(key, 2e-7)), (step, key, got[key], value)


def first_step_invariants(objective, options, records, first):
  beta = options.get("beta", 0.1)
  if objective == "dpo":
    loss = {"sigmoid": math.log(2), "hinge": 1.0, "ipo": (1 / (2 * beta)) ** 2, "robust": math.log(2)}
    assert abs(first["loss"] - loss[options["loss_type"]]) < 1e-6 * loss[options["loss_type"]]
  if objective in ("dpo", "kto"):
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
  if objective == "kto":
    dw, uw = options.get("desirable_weight", 1.0), options.get("undesirable_weight", 1.0)
    n_d = sum(r["label"] for r in records)
    assert first["kl"] == 0.0
    assert abs(first["loss"] - 0.5 * (dw * n_d + uw * (len(records) - n_d)) / len(records)) < 1e-7


def spec_trajectory(objective, model_dir, records, *, steps, lr, **o):
  """TRL_SEMANTICS.md in plain torch: the same metrics for `steps` SGD steps (no TRL involved)."""
  import copy

  import torch
  import torch.nn.functional as F
  import transformers

  torch.manual_seed(0)
  config = transformers.AutoConfig.from_pretrained(model_dir)
  pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
  load = dict(dtype=torch.float32, attn_implementation="eager")
  if objective == "reward":
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, **load)
    with torch.no_grad():
      model.score.weight.copy_(torch.as_tensor(trl_reference.reward_score_weight(model_dir)))
  else:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **load)
  ref = copy.deepcopy(model).requires_grad_(False)
  batches = {
    k: {n: torch.tensor(v) for n, v in b.items()}
    for k, b in trl_reference.expected_batches(objective, records, pad).items()
  }
  beta = o.get("beta", 0.1)
  mean = lambda t: t.mean().item()

  def seq_logps(m, b):  # per-token log-probs of the labelled (completion) tokens: position t scores token t + 1
    logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
    labels = b["labels"][:, 1:]
    mask = labels != -100
    lp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    return lp.sum(1), mask.sum(1), logits

  out = []
  for _ in range(steps):
    metrics = {}
    if objective == "dpo":
      s, n, _ = seq_logps(model, batches["main"])
      with torch.no_grad():
        rs, _, _ = seq_logps(ref, batches["main"])
      c, r = s.chunk(2)
      rc, rr = rs.chunk(2)
      lc, lr_ = n.chunk(2)
      d = (c - rc) - (r - rr)
      kind, ls = o.get("loss_type", "sigmoid"), o.get("label_smoothing", 0.0)
      if kind == "sigmoid":
        losses = -F.logsigmoid(beta * d)
      elif kind == "hinge":
        losses = torch.relu(1 - beta * d)
      elif kind == "ipo":  # log-ratios divided by the completion lengths
        losses = ((c - rc) / lc - (r - rr) / lr_ - 1 / (2 * beta)) ** 2
      else:  # robust
        losses = (-(1 - ls) * F.logsigmoid(beta * d) + ls * F.logsigmoid(-beta * d)) / (1 - 2 * ls)
      loss = losses.mean()
      wc, wr = beta * (c - rc).detach(), beta * (r - rr).detach()
      metrics |= {"rewards/chosen": mean(wc), "rewards/rejected": mean(wr), "rewards/margins": mean(wc - wr)}
      metrics |= {"rewards/accuracies": mean((wc > wr).float()), "logps/chosen": mean(c), "logps/rejected": mean(r)}
    elif objective in ("orpo", "simpo"):
      s, n, logits = seq_logps(model, batches["main"])
      avg = s / n
      ac, ar = avg.chunk(2)
      if objective == "orpo":
        b = batches["main"]
        half = b["input_ids"].shape[0] // 2
        tokens = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)[:half, 1:]  # prompt and completion
        nll = F.cross_entropy(logits[:half].reshape(-1, logits.shape[-1]), tokens.reshape(-1), ignore_index=-100)

        def log1mexp(x):
          return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))

        log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
        ratio = F.logsigmoid(log_odds)
        loss = nll - (beta * ratio).mean()
        metrics |= {"nll_loss": nll.item(), "log_odds_ratio": mean(ratio), "log_odds_chosen": mean(log_odds)}
      else:
        gamma, ls = o.get("simpo_gamma", 0.5), o.get("label_smoothing", 0.0)
        z = beta * (ac - ar) - gamma
        loss = (-(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)).mean()
      wc, wr = beta * ac.detach(), beta * ar.detach()
      metrics |= {"rewards/chosen": mean(wc), "rewards/rejected": mean(wr), "rewards/margins": mean(wc - wr)}
      metrics |= {"rewards/accuracies": mean((wc > wr).float()), "logps/chosen": mean(ac), "logps/rejected": mean(ar)}
    elif objective == "kto":
      s, _, _ = seq_logps(model, batches["main"])
      with torch.no_grad():
        kl_s, _, _ = seq_logps(model, batches["KL"])
        rs, _, _ = seq_logps(ref, batches["main"])
        kl_rs, _, _ = seq_logps(ref, batches["KL"])
      kl = (kl_s - kl_rs).mean().clamp(min=0)
      label = torch.tensor([r["label"] for r in records])
      ratio = s - rs
      dw, uw = o.get("desirable_weight", 1.0), o.get("undesirable_weight", 1.0)
      losses = torch.where(
        label, dw * (1 - torch.sigmoid(beta * (ratio - kl))), uw * (1 - torch.sigmoid(beta * (kl - ratio)))
      )
      loss = losses.mean()
      w = beta * ratio.detach()
      metrics |= {"kl": kl.item(), "rewards/chosen": mean(w[label]), "rewards/rejected": mean(w[~label])}
      metrics |= {"logps/chosen": mean(s[label]), "logps/rejected": mean(s[~label])}
      metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    else:  # reward: the score of the last token's final hidden state
      b = batches["main"]
      hidden = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
      last = b["attention_mask"].sum(1) - 1
      rewards = model.score(hidden[torch.arange(len(last)), last])[:, 0]
      rc, rr = rewards.chunk(2)
      margin = torch.tensor([r.get("margin", 0.0) for r in records])
      loss = -F.logsigmoid(rc - rr - margin).mean()
      if o.get("center_rewards_coefficient") is not None:
        loss = loss + o["center_rewards_coefficient"] * ((rc + rr) ** 2).mean()
      w = rewards.detach()
      metrics |= {"min_reward": w.min().item(), "mean_reward": mean(w), "max_reward": w.max().item()}
      metrics |= {"accuracy": mean((rc > rr).float()), "margin": mean(rc - rr)}
    model.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    metrics["grad_norm"] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
    metrics["loss"] = loss.item()
    with torch.no_grad():
      for p in params:
        p.sub_(lr * p.grad)
    out.append(metrics)
  return out
