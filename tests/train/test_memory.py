"""The memory check before the first step: XLA's numbers, free memory, the refusal and its advice."""

import logging

import jax
import jax.numpy as jnp
import pytest

from jaxtune.train import loop, memory

import tiny_runs

GIB = 2**30


def test_compiled_memory_counts_arguments_outputs_and_donation():
  f = jax.jit(lambda x, y: (x + 1.0, jnp.tanh(y @ y).sum()), donate_argnums=0)
  x, y = jnp.ones((1024, 256)), jnp.ones((256, 256))
  m = memory.of_compiled(f.lower(x, y).compile())
  assert m.arguments == x.nbytes + y.nbytes
  assert m.outputs >= x.nbytes + 4 and m.aliased == x.nbytes  # x + 1 is written into the donated x
  assert m.extra == m.outputs - m.aliased + m.temporaries + m.code


def test_host_memory_from_meminfo(tmp_path):
  meminfo = tmp_path / "meminfo"
  meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n")
  free = memory.device_free(jax.devices("cpu")[0], local_devices=8, meminfo=str(meminfo))
  assert (free.bytes, free.limit, free.sharers) == (20000000 * 1024, 24000000 * 1024, 8)
  assert memory.device_free(jax.devices("cpu")[0], 1, meminfo=str(tmp_path / "missing")) is None


def test_a_step_that_cannot_fit_is_refused_with_numbers_and_advice():
  step = memory.StepMemory(arguments=3 * GIB, outputs=2 * GIB, aliased=2 * GIB, temporaries=5 * GIB, code=0)
  memory.check(step, memory.Free(6 * GIB, 16 * GIB, "TPU v5 lite (tpu)"), shape=(1, 8, 2048), method="full")
  with pytest.raises(memory.DoesNotFitError) as e:
    memory.check(step, memory.Free(4 * GIB, 16 * GIB, "TPU v5 lite (tpu)"), shape=(1, 8, 2048), method="full")
  message = str(e.value)
  for part in (
    "[1, 8, 2048]",
    "5.00 GiB per device",
    "temporaries 5.00",
    "4.00 GiB free of 16.00",
    "data.batch_size",
    "train.grad_accum",
    "model.remat=full",
    "peft.method=lora",
    "dry_run",
  ):
    assert part in message, (part, message)
  with pytest.raises(memory.DoesNotFitError, match="2 devices x"):  # CPU devices share the host's memory
    memory.check(step, memory.Free(8 * GIB, 24 * GIB, "this host's RAM", sharers=2), shape=(1, 8, 2048), method="lora")


def test_the_loop_checks_before_the_first_step(tmp_path, monkeypatch, capsys, caplog):
  cache = tmp_path / "cache"
  config = tiny_runs.tiny(tmp_path / "fits", cache, **{"train.steps": 2, "train.eval": False, "train.eval_every": 0})
  with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
    loop.train(config)
  assert "train step: 0.0" in capsys.readouterr().out  # the tiny step's figures, reported before training
  # The check's compilation is the one the steps use (every packed row is 128 tokens long).
  assert sum(r.getMessage().startswith("Compiling jit(step)") for r in caplog.records) == 1

  monkeypatch.setattr(memory, "device_free", lambda *a, **k: memory.Free(1000, 2000, "a small device"))
  config = tiny_runs.tiny(tmp_path / "tight", cache, **{"train.steps": 2, "train.eval": False, "train.eval_every": 0})
  with pytest.raises(memory.DoesNotFitError, match=r"batches of shape \[2, 4, 128\].* a small device has 0.00 GiB"):
    loop.train(config)
  assert not tiny_runs.metrics(tmp_path / "tight") and not tiny_runs.complete_steps(tmp_path / "tight")
