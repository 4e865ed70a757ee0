"""What a merge refuses, and how: `jaxtune merge` exits with code 2 and one line naming the key, tensor or file."""

import json
import pathlib
import shutil

import numpy as np
import pytest
import yaml

from jaxtune.merge.__main__ import main as merge_main

from merge_helpers import fine_tune, write_adapter, write_tiny_llama


def one_line_error(capsys, recipe, tmp_path: pathlib.Path) -> str:
  path = tmp_path / "merge.yml"
  path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
  capsys.readouterr()  # what building the models printed
  code = merge_main(["--config", str(path), "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert code == 2, err
  assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
  assert not (tmp_path / "out").exists()
  return err[len("error: ") : -1]


def ties(base, *models) -> dict:
  entries = [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in models]
  return {"merge_method": "ties", "base_model": str(base), "models": entries}


def test_different_shapes_name_the_tensor(zoo, tmp_path, capsys):
  def narrower(tensors):
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:64]
    return tensors

  other = fine_tune(zoo["base"], tmp_path / "narrow", seed=5, change=narrower)
  msg = one_line_error(capsys, ties(zoo["base"], zoo["a"], other), tmp_path)
  assert "tensor model.layers.1.mlp.up_proj.weight: shape (128, 64)" in msg and "(64, 64)" in msg


def test_different_vocabularies_are_refused(zoo, tmp_path, capsys):
  other = write_tiny_llama(tmp_path / "vocab300", vocab_size=300, seed=4)
  msg = one_line_error(capsys, ties(zoo["base"], zoo["a"], other), tmp_path)
  assert "tensor model.embed_tokens.weight" in msg and "vocab_size 288 and 300" in msg


def test_same_size_other_tokens_are_refused(zoo, tmp_path, capsys):
  other = fine_tune(zoo["base"], tmp_path / "retokenized", seed=6)
  tok = json.loads((other / "tokenizer.json").read_text())
  vocab = tok["model"]["vocab"]
  first, second = list(vocab)[:2]
  vocab[first], vocab[second] = vocab[second], vocab[first]
  (other / "tokenizer.json").write_text(json.dumps(tok))
  msg = one_line_error(capsys, ties(zoo["base"], zoo["a"], other), tmp_path)
  assert f"{other / 'tokenizer.json'}: a different vocabulary" in msg


@pytest.mark.parametrize(
  ("change", "expected"),
  [
    (lambda r: r | {"merge_methd": "ties"}, "unknown key 'merge_methd'; did you mean 'merge_method'?"),
    (lambda r: r | {"merge_method": "tie"}, "unknown merge_method 'tie'; did you mean 'ties'?"),
    (
      lambda r: r | {"parameters": {"lamda": 0.5}},
      "parameters: unknown parameter of ties 'lamda'; did you mean 'lambda'?",
    ),
    (lambda r: r | {"slices": []}, "slices: layer slices (frankenmerges) are not supported"),
    (lambda r: r | {"tokenizer_source": "union"}, "tokenizer_source: union is not supported"),
    (lambda r: r | {"tokenizer": {"source": "base", "tokens": {}}}, "tokenizer: tokens: only tokenizer.source"),
    (lambda r: {k: v for k, v in r.items() if k != "base_model"}, "base_model is required by ties"),
  ],
  ids=["key", "method", "parameter", "slices", "union", "tokenizer_tokens", "no_base"],
)
def test_recipe_mistakes_name_the_key(zoo, tmp_path, capsys, change, expected):
  assert expected in one_line_error(capsys, change(ties(zoo["base"], zoo["a"], zoo["b"])), tmp_path)


def test_model_parameter_typos_and_missing_weights(zoo, tmp_path, capsys):
  recipe = ties(zoo["base"], zoo["a"])
  recipe["models"][0]["parameters"] = {"wieght": 1.0}
  assert "models[0].parameters: unknown parameter of ties 'wieght'; did you mean 'weight'?" in one_line_error(
    capsys, recipe, tmp_path
  )
  recipe["models"][0]["parameters"] = {"density": 0.5}
  assert "parameter weight is required for tensor model.embed_tokens.weight" in one_line_error(capsys, recipe, tmp_path)


def test_invalid_yaml_names_the_line(tmp_path, capsys):
  assert "merge.yml:2: invalid YAML" in one_line_error(capsys, "merge_method: ties\nbase_model: a: b\n", tmp_path)


def test_adapter_for_another_base(zoo, tmp_path, capsys):
  from safetensors.numpy import load_file, save_file

  adapter = write_adapter(zoo["base"], tmp_path / "wrong", seed=7)
  tensors = load_file(adapter / "adapter_model.safetensors")
  name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
  tensors[name] = np.zeros((4, 32), np.float32)
  save_file(tensors, str(adapter / "adapter_model.safetensors"))
  msg = one_line_error(capsys, ties(zoo["base"], zoo["a"], adapter), tmp_path)
  assert f"tensors '{name}' (4, 32)" in msg and "the adapter was made for another base model" in msg

  shutil.rmtree(adapter)
  adapter = write_adapter(zoo["base"], tmp_path / "wrong", seed=7)
  tensors = {
    k.replace("layers.1.", "layers.7."): v for k, v in load_file(adapter / "adapter_model.safetensors").items()
  }
  save_file(tensors, str(adapter / "adapter_model.safetensors"))
  msg = one_line_error(capsys, ties(zoo["base"], f"{zoo['base']}+{adapter}"), tmp_path)
  assert "adapts model.layers.7.self_attn.q_proj.weight, which" in msg and "another base model" in msg


def test_unsupported_adapter_option(zoo, tmp_path, capsys):
  adapter = write_adapter(zoo["base"], tmp_path / "ranks", seed=8, rank_pattern={"q_proj": 8})
  msg = one_line_error(capsys, ties(zoo["base"], adapter), tmp_path)
  assert f"{adapter / 'adapter_config.json'}: rank_pattern is {{'q_proj': 8}}: a rank per module" in msg


def test_bare_adapter_applies_to_the_base(zoo, tmp_path):
  """A bare adapter directory is the base with the adapter folded in, as BASE+ADAPTER writes it."""
  from safetensors.numpy import load_file

  outs = []
  for i, ref in enumerate((str(zoo["lora"]), f"{zoo['base']}+{zoo['lora']}")):
    recipe = {
      "merge_method": "task_arithmetic",
      "base_model": str(zoo["base"]),
      "models": [{"model": ref, "parameters": {"weight": 1.0}}],
    }
    (tmp_path / f"{i}.yml").write_text(yaml.safe_dump(recipe))
    assert merge_main(["--config", str(tmp_path / f"{i}.yml"), "--out", str(tmp_path / str(i))]) == 0
    outs.append(load_file(tmp_path / str(i) / "model.safetensors"))
  base = load_file(zoo["base"] / "model.safetensors")
  q = "model.layers.0.self_attn.q_proj.weight"
  assert not np.array_equal(outs[0][q], base[q])
  for name in outs[0]:
    np.testing.assert_array_equal(outs[0][name], outs[1][name])


def test_output_may_not_be_an_input(zoo, tmp_path, capsys):
  adapter = write_adapter(zoo["base"], tmp_path / "adapter", seed=9)
  recipe = tmp_path / "merge.yml"
  recipe.write_text(yaml.safe_dump(ties(zoo["base"], zoo["a"], adapter)))
  capsys.readouterr()
  assert merge_main(["--config", str(recipe), "--out", str(adapter), "--overwrite"]) == 2
  assert "is the source checkpoint directory itself" in capsys.readouterr().err
  assert (adapter / "adapter_config.json").is_file()
