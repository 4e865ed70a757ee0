"""Every deterministic merge method gives mergekit 0.1.5's tensors, on tiny Llamas built here (CPU).

Each recipe runs through mergekit's own `run_merge` and through `jaxtune merge`, and every tensor
of the two outputs is compared in float32. DARE is random in both, so its drops are checked by
their statistics (the kept fraction, the L1 rescaling) and against TIES and task arithmetic at
density 1, where nothing is dropped.
"""

import pathlib

import numpy as np
import pytest
import yaml

from jaxtune.merge import config, run
from jaxtune.merge.__main__ import main as merge_main

RTOL, ATOL = 1e-6, 1e-6


def read(directory: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  out = {}
  for path in sorted(directory.glob("*.safetensors")):
    out.update(load_file(path))
  return out


def mergekit_merge(recipe: dict, out: pathlib.Path) -> dict[str, np.ndarray]:
  from mergekit.config import MergeConfiguration
  from mergekit.merge import MergeOptions, run_merge

  options = MergeOptions(
    quiet=True, write_model_card=False, random_seed=0, lora_merge_cache=str(out.parent / "lora-cache")
  )
  run_merge(MergeConfiguration.model_validate(recipe), str(out), options=options)
  return read(out)


def jaxtune_merge(recipe: dict, out: pathlib.Path) -> dict[str, np.ndarray]:
  path = out.with_suffix(".yml")
  path.write_text(yaml.safe_dump(recipe))
  assert merge_main(["--config", str(path), "--out", str(out)]) == 0
  return read(out)


def weighted(*pairs, **extra):
  return [{"model": m, "parameters": {"weight": w, **extra}} for m, w in pairs]


RECIPES = {
  "linear": lambda z: {"merge_method": "linear", "models": weighted((z["a"], 0.7), (z["b"], 0.5))},
  "linear_unnormalized": lambda z: {
    "merge_method": "linear",
    "models": weighted((z["base"], 1.0), (z["a"], 0.5), (z["b"], -0.25)),
    "parameters": {"normalize": False},
  },
  "slerp": lambda z: {  # attention tensors nearly parallel (the linear fallback), the rest not
    "merge_method": "slerp",
    "base_model": z["base"],
    "models": [{"model": z["base"]}, {"model": z["a"]}],
    "parameters": {
      "t": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"filter": "mlp", "value": 0.3}, {"value": 0.6}]
    },
  },
  "task_arithmetic": lambda z: {
    "merge_method": "task_arithmetic",
    "base_model": z["base"],
    "models": weighted((z["a"], 0.8), (z["b"], 0.4)),
    "parameters": {"lambda": 0.9},
  },
  "task_arithmetic_lora": lambda z: {
    "merge_method": "task_arithmetic",
    "base_model": z["base"],
    "models": weighted((f"{z['base']}+{z['lora']}", 1.0), (z["a"], 0.5)),
    "parameters": {"normalize": True},
  },
  "ties": lambda z: {
    "merge_method": "ties",
    "base_model": z["base"],
    "models": [
      {"model": z["a"], "parameters": {"weight": 0.7, "density": 0.5}},
      {"model": z["b"], "parameters": {"weight": [0.2, 0.6], "density": 0.3}},
    ],
  },
  "ties_rescaled_unnormalized": lambda z: {
    "merge_method": "ties",
    "base_model": z["base"],
    "models": weighted((z["a"], 0.7), (z["b"], 0.3), density=0.4),
    "parameters": {"normalize": False, "rescale": True, "int8_mask": True},
  },
}


@pytest.fixture(scope="module")
def recipes(zoo):
  return {name: make({k: str(v) for k, v in zoo.items()}) for name, make in RECIPES.items()}


@pytest.mark.parametrize("name", RECIPES)
def test_same_tensors_as_mergekit(name, recipes, tmp_path):
  want = mergekit_merge(recipes[name], tmp_path / "mergekit")
  got = jaxtune_merge(recipes[name], tmp_path / "jaxtune")
  assert sorted(got) == sorted(want)
  for tensor in want:
    np.testing.assert_allclose(got[tensor], want[tensor], rtol=RTOL, atol=ATOL, err_msg=tensor)


def test_slerp_meets_both_branches(zoo):
  """The recipe above is a real test of the fallback: some of its tensor pairs are nearly parallel, some not."""
  from jaxtune.merge.methods import SLERP_DOT_THRESHOLD

  base, a = read(zoo["base"]), read(zoo["a"])
  cos = {n: np.dot(base[n].ravel(), a[n].ravel()) / np.linalg.norm(base[n]) / np.linalg.norm(a[n]) for n in base}
  assert any(c > SLERP_DOT_THRESHOLD for c in cos.values()) and any(c < SLERP_DOT_THRESHOLD for c in cos.values())


def dare(zoo, method, density, tmp_path, **parameters) -> dict[str, np.ndarray]:
  recipe = {
    "merge_method": method,
    "base_model": str(zoo["base"]),
    "models": weighted((str(zoo["a"]), 0.6), (str(zoo["b"]), 0.4), density=density),
    **({"parameters": parameters} if parameters else {}),
  }
  return jaxtune_merge(recipe, tmp_path / f"{method}-{density}-{len(parameters)}")


def test_dare_keeps_its_density_and_rescales_to_the_l1_norm(zoo, tmp_path):
  """dare_linear, one model: about `density` of δ kept, scaled by ‖δ‖₁ / ‖kept δ‖₁ (mergekit's rescale)."""
  base, a = read(zoo["base"]), read(zoo["a"])
  recipe = {
    "merge_method": "dare_linear",
    "base_model": str(zoo["base"]),
    "models": [{"model": str(zoo["a"]), "parameters": {"weight": 1.0, "density": 0.3}}],
  }
  got = jaxtune_merge(recipe, tmp_path / "dare")
  name = "model.layers.0.mlp.up_proj.weight"
  delta, merged = a[name] - base[name], got[name] - base[name]
  kept = merged != 0
  assert abs(kept.mean() - 0.3) < 0.01  # 8192 entries: 4.6 standard deviations
  scale = np.abs(delta).sum() / np.abs(delta[kept]).sum()
  np.testing.assert_allclose(merged[kept], delta[kept] * scale, rtol=1e-4, atol=1e-6)
  assert 1 / 0.3 * 0.8 < scale < 1 / 0.3 * 1.25  # about 1/density, as DARE's paper rescales
  again = jaxtune_merge(recipe, tmp_path / "again")
  np.testing.assert_array_equal(again[name], got[name])  # the same seed drops the same entries


@pytest.mark.parametrize(("dare_method", "same_as"), [("dare_linear", "task_arithmetic"), ("dare_ties", "ties")])
def test_dare_at_density_one_is_its_deterministic_twin(zoo, tmp_path, dare_method, same_as):
  got = dare(zoo, dare_method, 1.0, tmp_path)
  want = dare(zoo, same_as, 1.0, tmp_path, normalize=False)
  for tensor in want:
    np.testing.assert_array_equal(got[tensor], want[tensor], err_msg=tensor)


def test_dare_ties_matches_mergekit_in_distribution(zoo, tmp_path):
  """Random drops differ between the two; what the drops do on average (the L1 size of the change) does not."""
  recipe = {
    "merge_method": "dare_ties",
    "base_model": str(zoo["base"]),
    "models": weighted((str(zoo["a"]), 0.6), (str(zoo["b"]), 0.4), density=0.5),
  }
  want, got, base = mergekit_merge(recipe, tmp_path / "mk"), jaxtune_merge(recipe, tmp_path / "jt"), read(zoo["base"])
  name = "model.layers.1.mlp.down_proj.weight"
  change = lambda m: np.abs(m[name] - base[name])
  assert abs((change(got) > 0).mean() - (change(want) > 0).mean()) < 0.02
  assert abs(change(got).sum() / change(want).sum() - 1) < 0.05


def test_merged_model_loads_in_transformers_with_the_chosen_tokenizer(zoo, tmp_path):
  import torch
  import transformers

  out = tmp_path / "merged"
  recipe = {
    "merge_method": "ties",
    "base_model": str(zoo["base"]),
    "models": weighted((str(zoo["a"]), 0.5), (str(zoo["b"]), 0.5), density=0.5),
    "dtype": "bfloat16",
    "tokenizer_source": str(zoo["a"]),
  }
  jaxtune_merge(recipe, out)
  model = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert model.dtype == torch.bfloat16
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  ids = tokenizer.apply_chat_template(
    [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt"
  )
  ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
  with torch.no_grad():
    logits = model(ids).logits
  assert torch.isfinite(logits).all()
  assert (out / "chat_template.jinja").read_text() == (zoo["a"] / "chat_template.jinja").read_text()


def test_flags_make_the_same_merge_as_the_yaml(zoo, tmp_path):
  recipe = RECIPES["ties"]({k: str(v) for k, v in zoo.items()})
  recipe["models"][1]["parameters"]["weight"] = 0.6  # flags give one number per model
  want = jaxtune_merge(recipe, tmp_path / "yaml")
  argv = ["--method", "ties", "--base", str(zoo["base"]), "--out", str(tmp_path / "flags")]
  for m in recipe["models"]:
    argv += [
      "--model",
      m["model"],
      "--weight",
      str(m["parameters"]["weight"]),
      "--density",
      str(m["parameters"]["density"]),
    ]
  assert merge_main(argv) == 0
  got = read(tmp_path / "flags")
  for tensor in want:
    np.testing.assert_array_equal(got[tensor], want[tensor], err_msg=tensor)


def test_sharded_output_reads_back_whole(zoo, tmp_path):
  cfg = config.parse({"merge_method": "linear", "models": weighted((str(zoo["a"]), 1.0), (str(zoo["b"]), 1.0))})
  out = run.merge(cfg, tmp_path / "sharded", max_shard_bytes=100_000)
  assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
  merged, a, b = read(out), read(zoo["a"]), read(zoo["b"])
  for tensor in a:
    np.testing.assert_allclose(merged[tensor], (a[tensor] + b[tensor]) / 2, rtol=1e-6, atol=1e-7)
