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


@pytest.mark.parametrize("environ, glibc, thp", [
    ({"JAXTUNE_HUGEPAGES": "0"}, GLIBC, THP),  # opted out
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, THP),  # the user's own value wins
    ({"JAXTUNE_REEXECUTED": "1"}, GLIBC, THP),  # already the re-executed process
    ({}, None, THP),  # not glibc
    ({}, (2, 34), THP),  # glibc without the tunable
    ({}, GLIBC, "always"),  # every large mapping gets huge pages already
    ({}, GLIBC, "never"),
    ({}, GLIBC, None),  # no THP file
])
def test_nothing_to_add(environ, glibc, thp):
  assert host.huge_page_environ(environ, glibc=glibc, thp=thp) is None


def test_thp_mode_reads_the_bracketed_word(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert host.thp_mode(str(f)) == "madvise"
  assert host.thp_mode(str(tmp_path / "missing")) is None


def test_reexec_keeps_argv_and_sets_the_tunable_once():
  """A real re-execution: the child sees its own arguments again and the tunable, and does not loop."""
  code = ("import os, sys; from jaxtune.train import host; print('start', flush=True); "
          "host.reexec_with_huge_pages(); print(sys.argv[1:], os.environ.get('GLIBC_TUNABLES'))")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXTUNE_REEXECUTED", "JAXTUNE_HUGEPAGES")}
  out = subprocess.run([sys.executable, "-c", code, "a", "b"], env=env, capture_output=True, text=True, check=True,
                       timeout=60).stdout.splitlines()
  expected = host.huge_page_environ(env, glibc=host.glibc_version(), thp=host.thp_mode())
  if expected is None:  # this machine needs nothing: the process runs on as it is
    assert out == ["start", "['a', 'b'] None"]
  else:  # 'start' twice: once before and once after the exec
    assert out == ["start", "start", "['a', 'b'] glibc.malloc.hugetlb=1"]
