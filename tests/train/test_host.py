"""The CLI's re-execution with glibc's hugetlb tunable (jaxtune/train/host.py)."""

import os
import subprocess
import sys

import pytest

from jaxtune.train import host

GLIBC, THP = (2, 36), "madvise"


def test_adds_the_tunable_and_a_marker():
  env = host.huge_page_environ({"PATH": "/bin"}, glibc=GLIBC, thp=THP)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  assert env["PATH"] == "/bin" and env["JAXTUNE_REEXECUTED"] == "1"


def test_keeps_the_users_other_tunables():
  env = host.huge_page_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, glibc=GLIBC, thp=THP)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
  "environ, glibc, thp",
  [
    ({"JAXTUNE_HUGEPAGES": "0"}, GLIBC, THP),  # opted out
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, THP),  # the user's own value wins
    ({"JAXTUNE_REEXECUTED": "1"}, GLIBC, THP),  # already the re-executed process
    ({}, None, THP),  # not glibc
    ({}, (2, 34), THP),  # glibc without the tunable
    ({}, GLIBC, "always"),  # every large mapping gets huge pages already
    ({}, GLIBC, "never"),
    ({}, GLIBC, None),  # no THP file
  ],
)
def test_nothing_to_add(environ, glibc, thp):
  assert host.huge_page_environ(environ, glibc=glibc, thp=thp) is None


def test_thp_mode_reads_the_bracketed_word(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert host.thp_mode(str(f)) == "madvise"
  assert host.thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.parametrize(
  "module, argv, want",
  [
    ("jaxtune.train", ["python", "-m", "jaxtune.train", "--config", "c.py"], True),
    ("jaxtune.train", ["python", "-X", "dev", "-m", "jaxtune.train"], True),
    ("jaxtune.train", ["python", "-mjaxtune.train"], True),
    ("jaxtune.train", ["python", "-m", "ipykernel_launcher", "-f", "k.json"], False),  # a notebook kernel
    ("jaxtune.train", ["python", "script.py", "jaxtune.train"], False),
    ("jaxtune", ["/venv/bin/python", "/venv/bin/jaxtune", "train"], True),  # the console script
    ("jaxtune", ["python", "-m", "jaxtune", "train"], True),
    ("jaxtune", ["python", "/venv/bin/jaxtune-other", "train"], False),
  ],
)
def test_launched_as(module, argv, want):
  assert host.launched_as(module, argv) is want


def test_reexec_keeps_argv_and_sets_the_tunable_once(tmp_path):
  """A real re-execution of `python -m module`: the child sees its arguments again and the tunable, once."""
  (tmp_path / "reexec_probe.py").write_text(
    "import os, sys\nfrom jaxtune.train import host\nprint('start', flush=True)\n"
    "host.reexec_with_huge_pages('reexec_probe')\nprint(sys.argv[1:], os.environ.get('GLIBC_TUNABLES'))\n"
  )
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXTUNE_REEXECUTED", "JAXTUNE_HUGEPAGES")}
  env["PYTHONPATH"] = os.pathsep.join([str(tmp_path)] + sys.path)

  def run(*argv):
    return subprocess.run(
      [sys.executable, *argv], env=env, capture_output=True, text=True, check=True, timeout=60, cwd=tmp_path
    ).stdout.splitlines()

  expected = host.huge_page_environ(env, glibc=host.glibc_version(), thp=host.thp_mode())
  if expected is None:  # this machine needs nothing: the process runs on as it is
    assert run("-m", "reexec_probe", "a", "b") == ["start", "['a', 'b'] None"]
  else:  # 'start' twice: once before and once after the exec
    assert run("-m", "reexec_probe", "a", "b") == ["start", "start", "['a', 'b'] glibc.malloc.hugetlb=1"]
  # Not started as `-m reexec_probe` (here: as a script): never re-executed.
  assert run(str(tmp_path / "reexec_probe.py"), "a") == ["start", "['a'] None"]
