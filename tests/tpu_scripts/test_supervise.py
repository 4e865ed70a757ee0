"""supervise.sh through whole scenarios against the fake gcloud: every gcloud call it makes, in order.

Time is the fake's: each poll sleeps POLL_SECONDS (60 by default), each restart its backoff, and the
TPU, queued request and run change state at the seconds the scenario gives (fake_gcloud/gcloud.py).
A word per call (gcloud_harness.word): list-tpu / list-qr read states, check is the run check over
ssh, install / mkdir / scp / launch bring the run up, types and bucket are the checks made first.
"""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gcloud_harness import BASE, CONFIG, GIT, Fake, assert_unattended, command_of, words

SUPERVISE = BASE + ["--source", GIT, "--config", CONFIG, "--output-dir", "gs://b/run"]
FIRST = ["bucket", "types"]  # checked before anything is created
SET_UP = ["install", "mkdir", "scp", "bucket", "launch"]  # install.sh, copy_config.sh, launch.sh
UPDATE_NOTICE = (
  "\nUpdates are available for some Google Cloud CLI components.  To install them,\nplease run:\n"
  "  $ gcloud components update\n\nWARNING: You do not appear to have access to project [proj] or it does not exist."
)


@pytest.fixture
def fake(tmp_path: pathlib.Path) -> Fake:
  return Fake(tmp_path)


def supervise(fake: Fake, mode: str, *args: str, returncode: int = 0, **env: str) -> str:
  """Runs supervise.sh to its end; returns its log (stderr). No call ever asks a question."""
  result = fake.run("supervise.sh", *SUPERVISE, "--mode", mode, *args, **env)
  assert result.returncode == returncode, result.stderr
  assert_unattended(fake.calls())
  return result.stderr


def launches(fake: Fake) -> list[str]:
  return [command_of(c) for c in fake.calls() if c[4] == "ssh" and "jaxtune.train" in command_of(c)]


def test_brings_up_a_new_tpu_and_exits_when_training_is_done(fake):
  log = supervise(fake, "spot", FAKE_RUNS="RUNNING@0,DONE@120")
  assert (
    words(fake.calls())
    == FIRST
    + ["list-tpu", "types", "create-tpu", "list-tpu", "check", *SET_UP]
    + [
      "list-tpu",
      "check",
    ]
    * 2
  )
  assert "--spot" in fake.calls()[4] and "resume" not in launches(fake)[0]
  assert fake.slept() == [60, 60, 60] and "restart" not in log
  assert "==> TPU tune MISSING -> create it\n" in log and "TPU tune READY, run DONE -> training finished" in log


@pytest.mark.parametrize("lost", ["PREEMPTED", "TERMINATED"])
def test_recreates_a_preempted_spot_vm_and_resumes(fake, lost):
  log = supervise(
    fake, "spot", FAKE_UP="node", FAKE_NODES=f"READY@0,{lost}@90;READY@0", FAKE_RUNS="RUNNING@0;RUNNING@0,DONE@60"
  )
  assert words(fake.calls()) == FIRST + ["list-tpu", "check"] * 2 + ["list-tpu", "delete-tpu", "types"] + [
    "create-tpu",
    "list-tpu",
    "check",
    *SET_UP,
    "list-tpu",
    "check",
  ]
  assert fake.slept() == [60, 60, 60, 60, 60]  # polls, and the first restart's 60 s backoff
  assert f"TPU tune {lost} -> delete it and create it again (restart 1/5, in 60 s)" in log
  assert "--config.resume=auto" in launches(fake)[0]


def test_a_restart_or_repair_is_waited_out_and_the_lost_run_relaunched(fake):
  log = supervise(
    fake,
    "on-demand",
    FAKE_UP="node",
    FAKE_NODES="READY@0,RESTARTING@30,REPAIRING@90,READY@150",
    FAKE_RUNS="RUNNING@0,GONE@30;RUNNING@0,DONE@60",
  )
  assert words(fake.calls()) == FIRST + ["list-tpu", "check", "list-tpu", "list-tpu"] + [
    "list-tpu",
    "check",
    "bucket",
    "launch",
    "list-tpu",
    "check",
  ]
  assert "TPU tune RESTARTING -> wait" in log and "TPU tune REPAIRING -> wait" in log
  assert "TPU tune READY, run GONE -> relaunch (restart 1/5, in 60 s)" in log


def test_a_suspended_queued_spot_request_is_deleted_and_queued_again(fake):
  log = supervise(
    fake,
    "queued-spot",
    FAKE_UP="qr",
    FAKE_QRS="ACTIVE@0,SUSPENDING@90,SUSPENDED@150;WAITING_FOR_RESOURCES@0,PROVISIONING@240,ACTIVE@300",
    FAKE_RUNS="RUNNING@0;RUNNING@0,DONE@60",
  )
  assert words(fake.calls()) == FIRST + ["list-qr", "list-tpu", "check"] * 2 + ["list-qr"] * 2 + [
    "delete-qr",
    "types",
    "create-qr",
    *["list-qr"] * 5,
    "list-tpu",
    "check",
    *SET_UP,
    "list-qr",
    "list-tpu",
    "check",
  ]
  (delete,) = [c for c in fake.calls() if c[4] == "delete"]
  (create,) = [c for c in fake.calls() if c[4] == "create"]
  assert "--force" in delete and "--spot" in create
  assert "queued resource tune SUSPENDING -> wait" in log
  assert "queued resource tune SUSPENDED -> delete it and create it again (restart 1/5, in 60 s)" in log
  assert "queued resource tune PROVISIONING -> keep the place in the queue (waited 180 s)" in log
  assert "--config.resume=auto" in launches(fake)[0]


def test_a_long_wait_in_the_queue_keeps_the_request(fake):
  """Eight hours of WAITING_FOR_RESOURCES (and no TPU node all along): polled, never deleted."""
  log = supervise(
    fake,
    "queued",
    "--poll-seconds",
    "1800",
    FAKE_QRS="ACCEPTED@0,WAITING_FOR_RESOURCES@30,PROVISIONING@28800,ACTIVE@28860",
    FAKE_RUNS="RUNNING@0,DONE@600",
  )
  assert words(fake.calls()) == FIRST + ["list-qr", "types", "create-qr"] + ["list-qr"] * 16 + [
    "list-qr",
    "list-tpu",
    "check",
    *SET_UP,
    "list-qr",
    "list-tpu",
    "check",
  ]
  assert "queued resource tune WAITING_FOR_RESOURCES -> keep the place in the queue (waited 25200 s)" in log
  assert "queued resource tune PROVISIONING -> keep the place in the queue (waited 27000 s)" in log
  assert "restart" not in log and set(fake.slept()) == {1800}


def test_gcloud_notices_on_stderr_are_not_states(fake):
  """gcloud's update notice and warnings go to stderr on every call; a READY TPU stays READY."""
  log = supervise(fake, "on-demand", FAKE_UP="node", FAKE_NOTICE=UPDATE_NOTICE, FAKE_RUNS="RUNNING@0,DONE@120")
  assert words(fake.calls()) == FIRST + ["list-tpu", "check"] * 3
  assert log.count("TPU tune READY, run RUNNING -> nothing to do") == 2


def test_a_flaky_ssh_relaunches_only_after_three_failed_checks_in_a_row(fake):
  log = supervise(fake, "spot", FAKE_UP="node", FAKE_SSH_FAILS="2,3,5,6,7", FAKE_RUNS="RUNNING@0;DONE@0")
  assert words(fake.calls()) == FIRST + ["list-tpu", "check"] * 7 + ["bucket", "launch", "list-tpu", "check"]
  assert log.count("-> check again (1 of 3 failed checks in a row)") == 2
  assert log.count("-> check again (2 of 3 failed checks in a row)") == 2
  assert "[/usr/bin/ssh] exited with return code [255].) -> check again" in log
  assert "3 run checks in a row failed (" in log and ": relaunch (restart 1/5, in 60 s)" in log


def test_a_hung_trainer_is_relaunched_and_the_relaunch_frees_the_tpu(fake):
  log = supervise(
    fake,
    "spot",
    "--hang-timeout",
    "300",
    FAKE_UP="node",
    FAKE_RUNS="RUNNING@0,HUNG@60;RUNNING@0,DONE@60",
  )
  assert words(fake.calls()) == FIRST + ["list-tpu", "check"] * 7 + ["bucket", "launch", "list-tpu", "check"]
  assert "run RUNNING -> its log has been silent for 300 s: relaunch (restart 1/5, in 60 s)" in log
  (relaunch,) = launches(fake)
  assert "--config.resume=auto" in relaunch
  for step in ("kill -KILL", "lsof -t /dev/accel* /dev/vfio/[0-9]*", "rm -f /tmp/libtpu_lockfile"):
    assert step in relaunch


def test_no_capacity_is_retried_with_backoff_and_nothing_deleted(fake):
  log = supervise(fake, "on-demand", FAKE_STOCKOUTS="2", FAKE_RUNS="RUNNING@0,DONE@60")
  assert words(fake.calls()) == FIRST + ["list-tpu", "types", "create-tpu"] * 3 + ["list-tpu", "check", *SET_UP] + [
    "list-tpu",
    "check",
  ]
  assert fake.slept() == [60, 60, 60, 120, 60, 60]  # polls, backoffs of 60 and 120 s
  assert log.count("create it: failed; looking again in 60 s") == 2
  assert "There is no more capacity in the zone" in log and "restart 2/5" in log


def test_an_unknown_state_is_waited_out_then_the_tpu_recreated(fake):
  log = supervise(
    fake,
    "spot",
    "--unknown-timeout",
    "180",
    FAKE_UP="node",
    FAKE_NODES="READY@0,UNKNOWN@30;READY@0",
    FAKE_RUNS="RUNNING@0;RUNNING@0,DONE@60",
  )
  assert words(fake.calls()) == FIRST + ["list-tpu", "check"] + ["list-tpu"] * 4 + ["delete-tpu", "types"] + [
    "create-tpu",
    "list-tpu",
    "check",
    *SET_UP,
    "list-tpu",
    "check",
  ]
  for waited in (0, 60, 120):
    assert f"TPU tune UNKNOWN -> wait (for {waited} s of at most 180)" in log
  assert "TPU tune UNKNOWN -> no usable state for 180 s: treat it as lost, delete it and create it again" in log


def test_a_stopped_tpu_is_left_to_its_owner(fake):
  log = supervise(fake, "spot", FAKE_UP="node", FAKE_NODES="READY@0,STOPPED@30", returncode=1)
  assert words(fake.calls()) == FIRST + ["list-tpu", "check", "list-tpu"]
  assert "error: supervise.sh: TPU tune STOPPED: someone stopped it" in log
  assert "gcloud compute tpus tpu-vm start tune --zone=us-west4-a --project=proj" in log


def test_a_request_that_fails_before_the_run_ever_ran_stops_with_the_fix(fake):
  log = supervise(fake, "queued", FAKE_QRS="ACCEPTED@0,FAILED@60", returncode=2)
  assert words(fake.calls()) == FIRST + ["list-qr", "types", "create-qr", "list-qr"]  # FAILED: left to inspect
  (line,) = [s for s in log.splitlines() if s.startswith("error: ")]
  assert line.startswith("error: supervise.sh: queued resource tune FAILED before the run ever ran: see why with: ")
  assert "gcloud compute tpus queued-resources describe tune --zone=us-west4-a --project=proj" in line
  assert "--accelerator-type v5litepod-8 in --zone us-west4-a" in line


def test_gives_up_after_max_restarts(fake):
  log = supervise(fake, "on-demand", "--max-restarts", "2", FAKE_NODES="READY@0,PREEMPTED@30", returncode=1)
  assert words(fake.calls()).count("create-tpu") == 3  # the bring-up, then 2 restarts
  assert "TPU tune PREEMPTED -> delete it and create it again: gave up after 2 restarts" in log


def test_dry_run_prints_the_checks_the_polls_and_every_action(fake):
  result = fake.run("supervise.sh", *SUPERVISE, "--mode", "queued-spot", "--dry-run")
  assert result.returncode == 0, result.stderr
  commands = [line for line in result.stdout.splitlines() if not line.startswith("#")]
  kinds = [" ".join(c.split()[1:5]) for c in commands]
  assert kinds[:5] == [
    "storage buckets describe gs://b",
    "compute tpus tpu-vm accelerator-types",
    "compute tpus queued-resources list",
    "compute tpus tpu-vm list",
    "compute tpus tpu-vm ssh",
  ]
  assert "compute tpus queued-resources delete" in kinds and "compute tpus queued-resources create" in kinds
  relaunch = commands[-1]
  assert "jaxtune.train" in relaunch and "--config.resume=auto" in relaunch and fake.calls() == []
