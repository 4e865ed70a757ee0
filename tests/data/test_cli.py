"""`python -m jaxtune.data`: statistics, highlighted examples and a dump that matches the pipeline."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from jaxtune.data import pipeline

from test_pipeline_helpers import data_cfg, tiny_tokenizer, write_chats

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_cli_prints_statistics_shows_examples_and_dumps_them(tmp_path):
  tokenizer_dir = tmp_path / "tokenizer"
  tiny_tokenizer().save_pretrained(tokenizer_dir)
  source = write_chats(tmp_path / "chats.jsonl", 12)
  config = tmp_path / "config.py"
  config.write_text(
    "import ml_collections\n"
    "from jaxtune.data.config import data_config\n"
    "def get_config():\n"
    "  c = ml_collections.ConfigDict()\n"
    f"  c.tokenizer = {str(tokenizer_dir)!r}\n"
    "  c.data = data_config()\n"
    f"  c.data.train = ({str(source)!r},)\n"
    f"  c.data.cache_dir = {str(tmp_path / 'cache')!r}\n"
    "  c.data.batch_size = 2\n"
    "  return c\n"
  )
  dump = tmp_path / "dump.jsonl"
  command = [
    sys.executable,
    "-m",
    "jaxtune.data",
    f"--config={config}",
    "--config.data.max_seq_len=96",
    "--show=2",
    "--tokens",
    f"--dump={dump}",
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  for text in ("records 12", "trainable tokens", "truncated to max_seq_len", "packing efficiency"):
    assert text in out
  assert out.count("\n--- ") == 2 and "[[" in out and "\x1b[" not in out

  tokenizer = tiny_tokenizer()
  expected = pipeline.load_split(data_cfg(tmp_path, train=(str(source),), max_seq_len=96), tokenizer)
  rows = [json.loads(line) for line in dump.read_text().splitlines()]
  examples = expected.examples[0]
  assert len(rows) == len(examples) == 12
  for i, row in enumerate(rows):
    ids, mask = examples[i]
    assert row["location"] == examples.locations[i]
    assert row["input_ids"] == ids.tolist() and row["loss_mask"] == mask.tolist()
    assert set(row["loss_mask"]) == {0, 1}
  # The first example's trained text, as shown, is what the dump marks as trained.
  trained = np.asarray(rows[0]["input_ids"])[np.asarray(rows[0]["loss_mask"], bool)]
  assert tokenizer.decode(trained.tolist()).split("<|im_end|>")[0] in out


def test_example_config_builds():
  spec = importlib.util.spec_from_file_location("data_example", REPO / "configs" / "data_example.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert set(config.keys()) == {"tokenizer", "data"}
  assert config.data.train and config.data.max_seq_len > 0
