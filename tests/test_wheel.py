"""The built wheel, installed into a fresh virtual environment, runs the quickstart config with no checkout.

The wheel is built without build isolation and installed without an index, so nothing is
downloaded: the new environment sees this one's packages (jax, transformers, ...) through a .pth
line, but not its editable jaxtune, and runs from a directory outside the repository.
"""

import pathlib
import shutil
import subprocess
import sys
import sysconfig

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_the_wheel_ships_the_configs_and_data_and_its_jaxtune_command_trains(tmp_path):
  source = tmp_path / "source"  # a copy: building in the checkout would leave build/ and *.egg-info there
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, source / name)
  shutil.copytree(REPO / "jaxtune", source / "jaxtune", ignore=shutil.ignore_patterns("__pycache__"))
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
  dist = tmp_path / "dist"
  subprocess.run(
    pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist), str(source)],
    check=True,
    capture_output=True,
  )
  (wheel,) = dist.glob("jaxtune-*.whl")

  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = venv / "bin" / "python"
  site = subprocess.run(
    [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
    check=True,
    capture_output=True,
    text=True,
  ).stdout.strip()
  # This environment's packages, as a plain path: its .pth files (the editable jaxtune's among them) stay unread.
  pathlib.Path(site, "test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  subprocess.run(
    pip + ["--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
    check=True,
    capture_output=True,
  )

  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  where = subprocess.run(
    [str(python), "-c", "import jaxtune.configs, jaxtune.tasks.meeting_json as m; print(jaxtune.configs.HERE, m.DATA)"],
    cwd=elsewhere,
    check=True,
    capture_output=True,
    text=True,
  ).stdout.split()
  assert all(path.startswith(site) for path in where), where  # the installed copy, not the checkout
  assert {p.name for p in pathlib.Path(where[1]).iterdir()} == {"train.jsonl", "validation.jsonl", "test.jsonl"}

  # The quickstart config as shipped, on the tiny random model so that it takes seconds: one token per
  # character makes examples longer than max_seq_len, so keep their ends (the answers).
  run = subprocess.run(
    [
      str(venv / "bin" / "jaxtune"),
      "train",
      "--config",
      "quickstart",
      "--config.model.path=tiny-random",
      f"--config.model.cache_dir={tmp_path / 'models'}",
      "--config.data.cache_dir=",
      "--config.data.truncation=left",
      "--config.output_dir=run",
      "--config.train.steps=2",
      "--config.optim.warmup_steps=1",
      "--config.checkpoint.every=0",
      "--config.logging.progress=false",
      "--config.task.num_examples=2",
      "--config.task.batch_size=2",
      "--config.task.max_new_tokens=4",
      "--config.task.before=false",
      "--config.train.eval=false",
    ],
    cwd=elsewhere,
    env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert f"{where[1]}/train.jsonl" in run.stdout  # the config's data came from the installed package
  assert "pre-flight: 800 training examples" in run.stdout and "devices: 1 x cpu" in run.stdout
  assert (elsewhere / "run" / "checkpoints" / "2").is_dir() and (elsewhere / "run" / "config.json").is_file()
