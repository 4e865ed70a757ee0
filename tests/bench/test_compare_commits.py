"""bench.compare_commits: the settings parser, the before/after summary, and one smoke run of HEAD against the tree."""

import json
import pathlib
import subprocess

import pytest

from bench import compare_commits


def test_parse_settings_reads_setting_dtype_pairs():
  assert compare_commits.parse_settings("lora:float32,full:bfloat16") == [("lora", "float32"), ("full", "bfloat16")]
  assert compare_commits.parse_settings("full") == [("full", "float32")]  # a bare setting is float32
  assert len(compare_commits.parse_settings(compare_commits.DEFAULT_SETTINGS)) == 4
  with pytest.raises(ValueError, match="'lora:fp16' is not setting:dtype"):
    compare_commits.parse_settings("lora:fp16")
  with pytest.raises(ValueError, match="twice"):
    compare_commits.parse_settings("lora,lora:float32")


def test_summarize_is_after_speed_over_before_speed_of_the_medians():
  row = compare_commits.summarize([1.0, 9.0, 2.0], [1.0, 1.0, 5.0, 0.5, 1.0])
  assert (row["before_s"], row["after_s"]) == (2.0, 1.0)
  assert row["ratio"] == pytest.approx(2.0) and row["meets_target"]  # after takes half the time: twice as fast
  slower = compare_commits.summarize([1.0] * 5, [1.04] * 5)
  assert slower["ratio"] == pytest.approx(1 / 1.04) and not slower["meets_target"]  # 0.9615 < 0.97
  with pytest.raises(ValueError, match="positive"):
    compare_commits.summarize([1.0], [])


def _dump(directory, body: str) -> str:
  directory.mkdir()
  (directory / "module_0054.jit_step.cpu_after_optimizations.txt").write_text(body)
  return str(directory)


def test_same_program_compares_instructions_without_source_metadata(tmp_path):
  hlo = 'HloModule jit_step\n\nENTRY %main {\n  %p = f32[4]{0} parameter(0), metadata={op_name="a" source_file="SRC"}\n'
  hlo += "  ROOT %n = f32[4]{0} negate(%p), metadata={stack_frame_id=FRAME}\n}\n"
  before = _dump(tmp_path / "b", hlo.replace("SRC", "/old/jaxtune/x.py").replace("FRAME", "3"))
  after = _dump(tmp_path / "a", hlo.replace("SRC", "/new/jaxtune/y.py").replace("FRAME", "7"))
  assert compare_commits.same_program(before, after) == {"identical": True, "lines": [3, 3], "differing": 0}
  changed = _dump(tmp_path / "c", hlo.replace("negate", "abs"))
  assert compare_commits.same_program(before, changed)["differing"] == 1
  assert compare_commits.same_program(before, str(tmp_path))["identical"] is None  # no dump: not compared


def test_main_refuses_fewer_than_five_steps_and_worker_flags_it_sets(capsys):
  with pytest.raises(SystemExit):
    compare_commits.main(["--before", "HEAD", "--rounds", "2", "--steps", "2"])
  assert "at least 5" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    compare_commits.main(["--before", "HEAD", "--dtype", "bfloat16"])
  assert "use --settings" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    compare_commits.main(["--before", "no-such-ref-anywhere", "--smoke"])
  assert "is not a commit" in capsys.readouterr().err


IN_GIT = (
  subprocess.run(["git", "-C", compare_commits.HERE, "rev-parse", "HEAD"], capture_output=True, check=False).returncode
  == 0
)


@pytest.mark.skipif(not IN_GIT, reason="needs the repository's git history (a git checkout)")
def test_smoke_run_compares_head_against_the_working_tree(tmp_path, capsys):
  out = tmp_path / "result.json"
  result = compare_commits.main(
    ["--smoke", "--before", "HEAD", "--settings", "lora:float32", "--rounds", "1", "--steps", "1", "--json", str(out)]
  )
  assert json.loads(out.read_text())["settings"][0]["ratio"] == result["settings"][0]["ratio"]
  head = subprocess.run(
    ["git", "log", "-1", "--format=%h"], capture_output=True, text=True, check=True, cwd=compare_commits.HERE
  ).stdout.strip()
  assert result["commits"]["before"]["commit"].startswith(head + " ")
  assert result["commits"]["after"]["ref"] == "working tree"
  assert "/jaxtune-compare-" in result["commits"]["before"]["imports"]["jaxtune"]  # the worktree's own package
  assert result["commits"]["after"]["imports"]["jaxtune"].startswith(compare_commits.HERE)
  [row] = result["settings"]
  assert (row["setting"], row["dtype"]) == ("lora", "float32")
  for side in ("before", "after"):
    got = row["sides"][side]
    assert len(got["times"]) == 1 and got["step_s"] > 0 and got["peak_rss_gb"] > 0
  assert row["ratio"] == pytest.approx(row["before_s"] / row["after_s"])
  assert len(row["machine_gflops"]) == 2 and min(row["machine_gflops"]) > 0
  program = row["same_program"]
  assert program["identical"] is not None and min(program["lines"]) > 100  # both steps' optimised HLO was read
  clean = not subprocess.run(
    ["git", "status", "--porcelain", "--", "jaxtune", "bench"], capture_output=True, text=True, cwd=compare_commits.HERE
  ).stdout
  if clean:  # HEAD against an unchanged tree: one program
    assert program["identical"], program
  printed = capsys.readouterr().out
  assert "cpu: " in printed and "command: python -m bench.compare_commits --smoke" in printed
  assert "after/before >= 0.97: " in printed
  # The temporary worktree is gone again, from disk and from git's list (other worktrees may move meanwhile).
  before_root = result["commits"]["before"]["imports"]["jaxtune"].rsplit("/jaxtune/", 1)[0]
  assert not pathlib.Path(before_root).exists()
  assert (
    before_root
    not in subprocess.run(
      ["git", "worktree", "list"], capture_output=True, text=True, check=True, cwd=compare_commits.HERE
    ).stdout
  )
