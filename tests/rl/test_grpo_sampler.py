"""The rollout sampler: old log-probs equal the training forward's, greedy output equals generate's, rewards."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxtune import generation
from jaxtune.errors import ConfigError, UserError
from jaxtune.hf.load import init_model
from jaxtune.models.config import from_hf_dict
from jaxtune.peft import lora
from jaxtune.train import grpo, rollout

import tiny_configs

N = 10


@pytest.fixture(scope="module")
def model():
  m = init_model(from_hf_dict(tiny_configs.LLAMA), seed=0)
  lora.apply_lora(m, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
  for _, module in nnx.iter_modules(m):  # non-zero adapters: the merged weights differ from the base
    if isinstance(module, lora.LoRA):
      module.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(2), module.lora_b.shape))
  m.set_attributes(deterministic=True, raise_if_not_found=False)
  return m


def _prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(3, 128, size=n).tolist() for n in (5, 17, 9, 30)]


@pytest.mark.parametrize("temperature", [0.7])
def test_sampler_log_probs_equal_the_training_forward(model, temperature):
  ids, mask = generation.left_pad(_prompts(), 40)
  kwargs = dict(max_new_tokens=N, temperature=temperature, log_probs=True)
  free = np.asarray(generation.sample(model, ids, mask, jax.random.key(3), **kwargs).tokens)
  stop = next(int(t) for t in free[0, 2:] if not np.isin(t, free[1:]).all())  # ends row 0 early, not every row
  out = generation.sample(model, ids, mask, jax.random.key(3), stop_ids=[stop], **kwargs)
  tokens, logps = np.asarray(out.tokens), np.asarray(out.log_probs)
  lengths, ended = rollout.completion_lengths(tokens, [stop])
  assert ended.any() and not ended.all()  # rows stopping early and rows running to N, in one batch
  batch = rollout.layout(ids, mask, tokens, logps, np.zeros(len(ids)), lengths)
  forward, _ = grpo.completion_log_probs(model, batch, N, temperature)
  completion = batch["loss_mask"][:, -N:] > 0
  np.testing.assert_allclose(np.asarray(forward)[completion], logps[completion], atol=1e-5, rtol=0)
  assert np.all(logps[~completion] == 0)


def test_greedy_rollout_equals_generate(model):
  prompts = _prompts()
  ids, mask = generation.left_pad(prompts, 64)  # padded longer than generate pads them
  out = generation.sample(model, ids, mask, jax.random.key(0), max_new_tokens=N, stop_ids=[2, 7])
  tokens = np.asarray(out.tokens)
  lengths, _ = rollout.completion_lengths(tokens, [2, 7])
  want = generation.generate_ids(model, prompts, max_new_tokens=N, stop_ids=[2, 7])
  assert [row[:n].tolist() for row, n in zip(tokens, lengths)] == want
  assert int(out.steps) == max(len(w) for w in want)  # the loop stops once every row has


def bad_reward(prompts, completions, **kwargs):
  return [1.0 if "{" in c else "no" for c in completions]


def raising_reward(prompts, completions, **kwargs):
  return [json_len(c) for c in completions]


def json_len(c):
  if c == "boom":
    raise ValueError("cannot score")
  return float(len(c))


def two_args(completion, reference):
  return 1.0


def test_rewards_builtin_and_user_functions():
  fields = {"reference": ['{"a": 1, "b": 2}'] * 3}
  completions = ['{"a": 1, "b": 3}', "not json", "Answer: 42"]
  funcs = [rollout.reward(s) for s in ("json_valid", "json_fields", "exact", "format:Answer: \\d+", "numeric")]
  got = rollout.score(funcs, [[]] * 3, completions, fields)
  np.testing.assert_array_equal(got[:, 0], [1, 0, 0])
  np.testing.assert_array_equal(got[:, 1], [0.5, 0, 0])
  np.testing.assert_array_equal(got[:, 2], [0, 0, 0])
  np.testing.assert_array_equal(got[:, 3], [0, 0, 1])
  np.testing.assert_array_equal(rollout.score([funcs[4]], [[]], ["the sum is 2"], {"reference": ["x = 2"]}), [[1]])
  named = [r.name for r in rollout.rewards(["format:a", "json_valid", "format:b", "format:c"])]
  assert named == ["format", "json_valid", "format_2", "format_3"]  # apart in the metrics
  with pytest.raises(UserError, match=r"bad_reward returned 'no' .* completion 'not json'"):
    rollout.score([rollout.reward(f"{__name__}:bad_reward")], [[]] * 2, ["{", "not json"], {})
  with pytest.raises(UserError, match=r"raising_reward raised ValueError: cannot score, on the completion 'boom'"):
    rollout.score([rollout.reward(f"{__name__}:raising_reward")], [[]] * 2, ["ok", "boom"], {})


@pytest.mark.parametrize(
  "spec, message",
  [
    ("nosuch", r"grpo.reward_funcs: unknown reward 'nosuch'"),
    ("nosuch_module_xyz:f", r"grpo.reward_funcs: 'nosuch_module_xyz:f' not found"),
    (f"{__name__}:two_args", r"must accept fn\(prompts, completions, \*\*kwargs\)"),
  ],
)
def test_bad_reward_specs_name_the_key(spec, message):
  with pytest.raises(ConfigError, match=message):
    rollout.reward(spec)


def _config(**grpo_settings):
  from jaxtune.train.config import default_config

  c = default_config()
  c.objective = "grpo"
  c.data.batch_size = 8
  c.grpo.update(grpo_settings)
  return c


@pytest.mark.parametrize(
  "settings, message",
  [
    (dict(num_generations=1), r"grpo.num_generations: 1; .*2 or more"),
    (dict(num_generations=3), r"data.batch_size: 8 completions .* multiple of 3"),
    (dict(loss_type="ppo"), r"grpo.loss_type: 'ppo' is not one of"),
    (dict(reward_weights=(1.0, 2.0)), r"grpo.reward_weights: 2 weights for 1 reward_funcs"),
    (dict(beta=0.1), None),
  ],
)
def test_bad_grpo_settings_name_the_key(settings, message):
  config = _config(**settings)
  if message is None:
    grpo.validate(config)
    config.peft.method = "full"
    message = r"grpo.beta: a KL term needs the reference"
  with pytest.raises(ConfigError, match=message):
    grpo.validate(config)


def test_a_prompt_longer_than_the_room_left_fails_naming_the_key():
  class Tokenizer:  # one token per character
    eos_token_id, name_or_path, chat_template = 2, "", None

    def __call__(self, text, add_special_tokens=False):
      return {"input_ids": [ord(c) % 100 + 3 for c in text]}

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
      return "".join(m["content"] for m in messages)

    def get_vocab(self):
      return {}

  config = _config(max_completion_length=64)
  config.data.max_seq_len = 96
  prompts = [rollout.Prompt([{"role": "user", "content": "x" * n}], None, {}) for n in (10, 50)]
  with pytest.raises(ConfigError, match=r"data.max_seq_len: 96 leaves no room for the longest prompt \(50 tokens"):
    rollout.Rollout(ml_collections.ConfigDict(config), Tokenizer(), prompts)


def test_quickstart_time_reward_gives_credit_for_the_hour_and_the_minutes():
  from jaxtune.tasks import meeting_json

  ref = meeting_json.answer("Nora", "Monday", "14:30")
  completions = [ref, '{"time": "02:30"}', '{"time": "14:00"}', '{"time": "2:30"}', '{"person": "Nora"}', "{", "[1]"]
  got = rollout.score(
    rollout.rewards(["jaxtune.tasks.meeting_json:time_reward"]), [[]] * 7, completions, {"reference": [ref] * 7}
  )
  np.testing.assert_array_equal(got[:, 0], [1.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
