"""bench.cpu_products: a rate per library and shape, and the table that prints them."""

from bench import cpu_products


def test_smoke_rows_have_every_library_and_a_ratio(capsys):
  rows = cpu_products.main(["--smoke"])
  assert [r["shape"] for r in rows] == [(64, 32, 48), (128, 64, 16)]
  for r in rows:
    assert all(r[lib] > 0 for lib in ("xla", "torch", "numpy")), r
  lines = capsys.readouterr().out.splitlines()
  assert lines[1].split()[:5] == ["product", "M", "x", "K", "x"]
  assert len(lines) == 2 + len(rows)
  assert float(lines[2].split()[-1]) == round(rows[0]["xla"] / rows[0]["torch"], 2)


def test_rate_is_flop_over_median_time(monkeypatch):
  calls = []
  clock = iter([0.0, 1.0, 1.0, 3.0, 3.0, 7.0])  # timed calls of 1, 2 and 4 s: median 2 s

  def fn():
    calls.append(1)

  monkeypatch.setattr(cpu_products.time, "perf_counter", lambda: next(clock))
  assert cpu_products.rate(fn, 8e9, reps=3) == 4.0
  assert len(calls) == 5  # two warm-up calls, three timed
