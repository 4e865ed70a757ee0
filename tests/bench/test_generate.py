"""bench.generate: both samplers on the tiny model, each row with its rates and peak RSS."""

from bench import generate


def test_smoke_measures_both_sides_with_the_same_tokens(capsys):
  rows = generate.main(["--smoke"])
  assert [(r["side"], r["batch"], r["new"]) for r in rows] == [("jaxtune", 2, 16), ("transformers", 2, 16)]
  for r in rows:
    assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["peak_rss_gib"] > 0, r
  out = capsys.readouterr().out
  assert out.startswith("cpu: ") and "jaxtune / transformers: decode " in out


def test_profile_reports_prefill_and_decoding(tmp_path, capfd):
  generate.main(["--smoke", "--profile", str(tmp_path / "profile"), "--top", "5"])
  out = capfd.readouterr().out
  assert out.count("== batch 2, ") == 2 and "prefill (a 1-token generation)" in out
  assert "16-token generation, per generated token" in out and "GFLOP/s of wall" in out, out
