"""jaxtune vs transformers + PEFT on CPU: one train step, same shape, batch, LoRA and optimizer.

    python -m bench.train_cpu --setting lora     # LoRA r=16, alpha=32, all linear layers
    python -m bench.train_cpu --setting dora     # the same adapters with DoRA (use_dora) on both sides
    python -m bench.train_cpu --setting full     # full fine-tuning
    python -m bench.train_cpu --setting lora --smoke   # tiny shape, 1 round of 1 step: seconds

Each side runs in its own worker process (clean peak RSS), both built from the same HF
config dict (SmolLM2-135M shape, random weights), float32 (`--dtype bfloat16`: bf16 compute on
both sides, see jax_side and hf_side), AdamW (weight decay 0, clip 1.0),
batch 4 x 256 random tokens, loss on every token (`--trained-fraction F`: each row is four
64-token examples whose first (1 - F) x 64 tokens are an untrained prompt, as in chat data; HF
gets labels -100 there). After warm-up the parent asks the
workers in turn for `--steps` steps, `--rounds` times, alternating which goes first, and
reports the median step time over all measured steps. Each turn starts with `--settle`
unmeasured steps on either side (default 1): the first jaxtune step after HF's turn is 1.5-2.6 s
slower, because the kernel compacts the memory HF's turn fragmented to find huge pages again.
A training run that has the machine to itself never pays that;
`--settle 0` measures it too. The jaxtune worker runs with
glibc.malloc.hugetlb=1, as `python -m jaxtune.train` does (jaxtune/train/host.py);
`--hugepages none|both` are the ablations. Before each turn the parent measures the machine's
own float32 product rate (`machine_rate`) and prints it with the turn: it drifts by ~10% here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from jaxtune.train import host

SMOLLM2_135M = dict(
  architectures=["LlamaForCausalLM"],
  model_type="llama",
  vocab_size=49152,
  hidden_size=576,
  intermediate_size=1536,
  num_hidden_layers=30,
  num_attention_heads=9,
  num_key_value_heads=3,
  head_dim=64,
  hidden_act="silu",
  rms_norm_eps=1e-5,
  max_position_embeddings=8192,
  tie_word_embeddings=True,
  rope_theta=100000.0,
  bos_token_id=1,
  eos_token_id=2,
)
SMOKE = dict(
  SMOLLM2_135M,
  vocab_size=256,
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=16,
)
LORA = dict(rank=16, alpha=32.0)
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 1e-4


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def random_tokens(batch: int, seq: int, vocab: int, seed: int = 0):
  import numpy as np

  return np.random.default_rng(seed).integers(0, vocab, (batch, seq), dtype=np.int32)


def loss_mask(batch: int, seq: int, trained_fraction: float, example: int = 64):
  """[batch, seq] int32: 1 where the token is a target. Each `example`-token span starts with its untrained prompt."""
  import numpy as np

  prompt = round((1.0 - trained_fraction) * example)
  return np.broadcast_to((np.arange(seq) % example >= prompt).astype(np.int32), (batch, seq)).copy()


# ---------------------------------------------------------------------------------------------- jaxtune side
def jaxtune_step(
  cfg,
  options,
  setting: str,
  batch: int,
  seq: int,
  loss_chunk: int,
  lr: float = LR,
  trained_fraction: float = 1.0,
  segments: int = 1,
):
  """(run, n_trainable, n_frozen): run() does one real jaxtune train step on random tokens and blocks on it.

  segments: examples packed into each row, of seq / segments tokens each (1: one sequence per row, as HF sees)."""
  import jax
  import numpy as np
  from flax import nnx

  from jaxtune.hf.load import init_model
  from jaxtune.peft.lora import apply_lora
  from jaxtune.train import optim, step

  model = init_model(cfg, seed=0, options=options)
  if setting != "full":  # lora | dora
    apply_lora(model, rank=LORA["rank"], alpha=LORA["alpha"], dropout=0.0, use_dora=setting == "dora", rngs=nnx.Rngs(1))
  ocfg = optim.optim_config()
  ocfg.lr, ocfg.schedule, ocfg.weight_decay, ocfg.clip_norm = lr, "constant", 0.0, 1.0
  tx = optim.make_optimizer(ocfg, total_steps=10**6)
  graphdef, frozen, state = step.init_train_state(model, tx, method="full" if setting == "full" else "lora")
  del model
  n_trainable = sum(x.size for x in jax.tree.leaves(state.params))
  n_frozen = sum(x.size for x in jax.tree.leaves(frozen.weights))
  train_step = step.make_train_step(graphdef, frozen, tx, loss_chunk=loss_chunk)
  ids = random_tokens(batch, seq, cfg.vocab_size)[None]
  if seq % segments:
    raise ValueError(f"{segments} segments do not divide a row of {seq} tokens")
  slot = np.arange(seq, dtype=np.int32)
  data = {
    "input_ids": ids,
    "loss_mask": loss_mask(batch, seq, trained_fraction)[None],
    "segment_ids": np.broadcast_to(1 + slot // (seq // segments), ids.shape).copy(),
    "positions": np.broadcast_to(slot % (seq // segments), ids.shape).copy(),
  }
  holder = {"state": state}

  def run() -> float:
    holder["state"], metrics = train_step(holder["state"], data)
    return float(metrics["loss"])  # blocks until the step is done

  return run, n_trainable, n_frozen


def jax_side(
  hf_cfg: dict,
  setting: str,
  batch: int,
  seq: int,
  loss_chunk: int = 128,
  remat: str = "dots_no_batch",
  trained_fraction: float = 1.0,
  dtype: str = "float32",
  attention: str = "chunked",
  kernels: str = "auto",
):
  """(step_fn, n_trainable): step_fn() runs one real jaxtune train step.

  dtype bfloat16: bf16 compute; float32 trained weights; under LoRA the frozen base is bf16 too
  (the training CLI's param_dtype="auto", and bench/train_gpu.py's setting). attention and kernels:
  as the training CLI's model.attention_impl and model.kernels (their CPU defaults here)."""
  from jaxtune.models.config import from_hf_dict

  options = jax_options(setting, dtype, remat, attention, kernels)
  run, n_trainable, _ = jaxtune_step(
    from_hf_dict(hf_cfg), options, setting, batch, seq, loss_chunk, trained_fraction=trained_fraction
  )
  return run, n_trainable


def jax_options(
  setting: str = "lora",
  dtype: str = "float32",
  remat: str = "dots_no_batch",
  attention: str = "chunked",
  kernels: str = "auto",
):
  """The model options of the jaxtune side (see jax_side), for any benchmark that builds a jaxtune model."""
  import jax

  from jaxtune.models import options as options_lib

  param_dtype = "bfloat16" if dtype == "bfloat16" and setting != "full" else "float32"
  return options_lib.for_platform(
    jax.default_backend(), kernels=kernels, dtype=dtype, param_dtype=param_dtype, attention_impl=attention, remat=remat
  )


# --------------------------------------------------------------------------------------------- HF + PEFT side
def hf_side(
  hf_cfg: dict,
  setting: str,
  batch: int,
  seq: int,
  attn: str = "sdpa",
  trained_fraction: float = 1.0,
  dtype: str = "float32",
):
  """(step_fn, n_trainable): one transformers (+ PEFT) step: forward with labels, backward, clip, AdamW.

  dtype bfloat16: the forward under torch.autocast(bfloat16); under LoRA the base weights are
  bf16 (PEFT keeps its adapters in float32), for full fine-tuning float32 (bench/train_gpu.py's setting)."""
  import contextlib

  import torch
  import transformers

  torch.manual_seed(0)
  config = transformers.LlamaConfig(**hf_cfg)
  config._attn_implementation = attn
  bf16 = dtype == "bfloat16"
  model = transformers.LlamaForCausalLM(config).to(torch.bfloat16 if bf16 and setting != "full" else torch.float32)
  if setting != "full":
    import peft

    model = peft.get_peft_model(
      model,
      peft.LoraConfig(
        r=LORA["rank"],
        lora_alpha=LORA["alpha"],
        lora_dropout=0.0,
        target_modules=HF_TARGETS,
        task_type="CAUSAL_LM",
        use_dora=setting == "dora",
      ),
    )
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
  ids = torch.from_numpy(random_tokens(batch, seq, hf_cfg["vocab_size"]).astype("int64"))
  labels = torch.where(torch.from_numpy(loss_mask(batch, seq, trained_fraction)) > 0, ids, -100)

  def run() -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
      loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  return run, sum(p.numel() for p in params)


# ------------------------------------------------------------------------------------------------ the worker
class _NoCheckpoint:
  """The jax module with jax.checkpoint as the identity (ablation of the cross-entropy remat)."""

  def __init__(self, jax_module):
    self._jax = jax_module

  def __getattr__(self, name):
    return (lambda f, *a, **k: f) if name == "checkpoint" else getattr(self._jax, name)


def worker(args) -> None:
  """Builds one side, warms up, then serves `run N` requests on stdin with JSON lines on stdout."""
  hf_cfg = SMOKE if args.smoke else SMOLLM2_135M
  t0 = time.perf_counter()
  if args.no_ce_remat and args.worker == "jaxtune":
    import jax

    from jaxtune.train import step as step_lib

    step_lib.jax = _NoCheckpoint(jax)
  if args.worker == "jaxtune":
    run, n = jax_side(
      hf_cfg,
      args.setting,
      args.batch,
      args.seq,
      args.loss_chunk,
      args.remat,
      args.trained_fraction,
      args.dtype,
      args.attention,
      args.kernels,
    )
  else:
    run, n = hf_side(hf_cfg, args.setting, args.batch, args.seq, args.hf_attn, args.trained_fraction, args.dtype)
  build = time.perf_counter() - t0
  t0 = time.perf_counter()
  loss = run()
  first = time.perf_counter() - t0
  for _ in range(args.warmup - 1):
    loss = run()
  if args.profile and args.worker == "jaxtune":
    import jax

    with jax.profiler.trace(args.profile, create_perfetto_trace=True):
      run()
  print(json.dumps({"build_s": build, "first_step_s": first, "trainable": n, "loss": loss}), flush=True)
  serve(run)
  print(json.dumps({"peak_rss_gb": peak_rss_gb()}), flush=True)


def serve(run) -> None:
  """Answers `run N [S]` lines on stdin (S unmeasured steps, then N measured ones) with
  {"times": [s per step], "loss": last, "page_faults": per step, "sys_s": kernel CPU s per step,
  "settle_times": [s]} until `quit`."""
  for line in sys.stdin:
    if line.strip() == "quit":
      break
    words = line.split()
    settle = [time.perf_counter()]
    for _ in range(int(words[2]) if len(words) > 2 else 0):
      run()
      settle.append(time.perf_counter())
    settle_times = [b - a for a, b in zip(settle, settle[1:])]
    before = resource.getrusage(resource.RUSAGE_SELF)
    times, loss = [], None
    for _ in range(int(words[1])):
      t0 = time.perf_counter()
      loss = run()
      times.append(time.perf_counter() - t0)
    after, n = resource.getrusage(resource.RUSAGE_SELF), max(len(times), 1)
    print(
      json.dumps(
        {
          "times": times,
          "loss": loss,
          "page_faults": (after.ru_minflt - before.ru_minflt) / n,
          "sys_s": (after.ru_stime - before.ru_stime) / n,
          "settle_times": settle_times,
        }
      ),
      flush=True,
    )


def _start(side: str, args) -> subprocess.Popen:
  cmd = [
    sys.executable,
    "-m",
    "bench.train_cpu",
    "--worker",
    side,
    "--setting",
    args.setting,
    "--batch",
    str(args.batch),
    "--seq",
    str(args.seq),
    "--warmup",
    str(args.warmup),
    "--loss-chunk",
    str(args.loss_chunk),
    "--remat",
    args.remat,
    "--hf-attn",
    args.hf_attn,
    "--profile",
    args.profile,
    "--trained-fraction",
    str(args.trained_fraction),
    "--dtype",
    args.dtype,
    "--attention",
    args.attention,
    "--kernels",
    args.kernels,
  ]
  cmd += ["--smoke"] if args.smoke else []
  cmd += ["--no-ce-remat"] if args.no_ce_remat else []
  return spawn(cmd, jaxtune=side == "jaxtune", hugepages=args.hugepages, xla_flags=args.xla_flags)


def spawn(cmd: list[str], *, jaxtune: bool, hugepages: str = "cli", xla_flags: str = "") -> subprocess.Popen:
  """A worker process speaking `serve`'s protocol on its stdin / stdout, run from the repository root.

  hugepages: cli gives a jaxtune worker the environment the training CLI runs in, both gives it every worker,
  none none. xla_flags: extra XLA_FLAGS for a jaxtune worker."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  if jaxtune and xla_flags:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
  if hugepages == "both" or (hugepages == "cli" and jaxtune):
    # What `python -m jaxtune.train` re-executes itself with (jaxtune/train/host.py).
    env = host.huge_page_environ(env, glibc=host.glibc_version(), thp=host.thp_mode()) or env
  return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root, env=env)


def cpu_model() -> str:
  """The CPU's model name and the vector extensions that decide float32 product speed, from /proc/cpuinfo.

  Printed with every run because the ratio depends on the CPU: where torch's float32 products outrun
  XLA's (Intel Xeons with AVX-512 and AMX) it is lower than where both reach the FMA peak (AMD EPYC)
  (docs/benchmarks.md)."""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return "unknown"
  name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
  flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
  vector = [f for f in ("avx2", "fma", "avx512f", "amx_bf16") if f in flags]
  return f"{name} x {os.cpu_count()} ({', '.join(vector) or 'no AVX2'})"


def machine_rate(seconds: float = 0.5) -> float:
  """GFLOP/s of a float32 1024^3 product (numpy) looped for `seconds` here, while both workers wait.

  A 2-vCPU VM's speed drifts by ~10% within minutes, with nothing else running. jaxtune's step
  runs near the product rate and follows that drift, so every turn is printed with the rate
  measured just before it. A ratio is only clean when the rates of its turns agree."""
  import numpy as np

  a = np.ones((1024, 1024), np.float32)
  a @ a
  n, t0 = 0, time.perf_counter()
  while (elapsed := time.perf_counter() - t0) < seconds:
    a @ a
    n += 1
  return 2 * 1024**3 * n / elapsed / 1e9


def _ask(proc: subprocess.Popen, line: str | None = None) -> dict:
  if line is not None:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
  out = proc.stdout.readline()
  if not out:
    raise RuntimeError(f"benchmark worker exited with {proc.wait()}; see its stderr above.")
  return json.loads(out)


def parser() -> argparse.ArgumentParser:
  """The command line, also how bench/dpo_cpu.py sets up the SFT workers it runs beside its own."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--setting", choices=("lora", "dora", "full"), default="lora")
  p.add_argument("--sides", default="jaxtune,hf", help="comma list: jaxtune, hf")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=3, help="measured steps per side per round")
  p.add_argument("--warmup", type=int, default=2, help="unmeasured steps (the first compiles)")
  p.add_argument("--settle", type=int, default=1, help="unmeasured steps at the start of every turn, both sides")
  p.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="compute dtype of both sides; float32 is the issue's setting, bfloat16 an extra one "
    "(CPUs with bf16 units, such as AMX)",
  )
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument(
    "--trained-fraction",
    type=float,
    default=1.0,
    help="share of each 64-token example that is a target (chat data: the rest is the prompt)",
  )
  p.add_argument(
    "--loss-chunk",
    type=int,
    default=128,
    help="jaxtune cross-entropy chunk (positions); at T=256, 128 splits the logits in two, "
    "0.2 GB less peak RSS than one chunk at the same speed",
  )
  p.add_argument(
    "--remat",
    default="dots_no_batch",
    help="jaxtune remat policy: none | full | dots | dots_no_batch (the training default)",
  )
  p.add_argument("--hf-attn", default="sdpa", help="transformers attention: sdpa | eager")
  p.add_argument("--attention", default="chunked", help="jaxtune attention: chunked | xla (model.attention_impl)")
  p.add_argument("--kernels", default="auto", help="jaxtune kernels: auto | cpu | plain (model.kernels)")
  p.add_argument(
    "--hugepages",
    choices=("cli", "none", "both"),
    default="cli",
    help="glibc.malloc.hugetlb=1 for: cli = the jaxtune side, as `python -m jaxtune.train` runs "
    "(HF as it ships); none; both (ablations: HF is slower with the tunable)",
  )
  p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the jaxtune worker (ablations)")
  p.add_argument(
    "--no-ce-remat", action="store_true", help="ablation: patch out the jax.checkpoint around the chunked cross-entropy"
  )
  p.add_argument("--profile", default="", help="jaxtune worker: write a perfetto trace of one step here")
  p.add_argument("--smoke", action="store_true", help="tiny model, 1 round of 1 step (seconds)")
  p.add_argument("--json", help="also write the results here")
  p.add_argument("--worker", choices=("jaxtune", "hf"), help=argparse.SUPPRESS)
  return p


def started(side: str, proc: subprocess.Popen) -> dict:
  """A worker's first line (build and first-step times), once it has warmed up; printed."""
  info = _ask(proc)
  print(
    f"{side}: built in {info['build_s']:.1f} s, first step {info['first_step_s']:.1f} s, "
    f"{info['trainable']:,} trainable",
    flush=True,
  )
  return info


def alternate(procs: dict[str, subprocess.Popen], rounds: int, steps: int, settle: int) -> dict[str, dict]:
  """Asks the workers in turn for `settle` unmeasured then `steps` measured steps, `rounds` times, the order
  reversed every other round, the machine's product rate measured before each turn; prints every turn.

  Returns per worker its measured step times, unmeasured (settle) times, page faults and kernel seconds per
  step of each turn, and the machine rates."""
  sides = list(procs)
  got_all = {s: {"times": [], "settle_times": [], "page_faults": [], "sys_s": [], "machine_gflops": []} for s in sides}
  for r in range(rounds):
    for s in sides if r % 2 == 0 else sides[::-1]:
      rec = got_all[s]
      rec["machine_gflops"].append(machine_rate())
      got = _ask(procs[s], f"run {steps} {settle}")
      rec["times"] += got["times"]
      rec["settle_times"] += got["settle_times"]
      rec["page_faults"].append(got["page_faults"])
      rec["sys_s"].append(got["sys_s"])
      unmeasured = "".join(f" ({t:.2f})" for t in got["settle_times"])
      print(
        f"round {r + 1} {s} [machine {rec['machine_gflops'][-1]:.0f} GFLOP/s]:{unmeasured} "
        + " ".join(f"{t:.2f}" for t in got["times"])
        + f" s/step, loss {got['loss']:.3f}",
        flush=True,
      )
  return got_all


def finish(procs: dict[str, subprocess.Popen], info: dict[str, dict]) -> None:
  """Ends every worker, adding its last line (peak RSS) to its info."""
  for s, proc in procs.items():
    info[s].update(_ask(proc, "quit"))
    proc.wait()


def summary(info: dict, turns: dict, tokens: int) -> dict:
  """One side's row: its info and `alternate`'s record, with the median step and tokens / median step."""
  med = statistics.median(turns["times"])
  return dict(
    info,
    step_s=med,
    step_min_s=min(turns["times"]),
    tokens_per_s=tokens / med,
    times=turns["times"],
    settle_times=turns["settle_times"],
    page_faults_per_step=statistics.median(turns["page_faults"]),
    sys_s_per_step=statistics.median(turns["sys_s"]),
    machine_gflops=turns["machine_gflops"],
  )


def main(argv=None) -> dict:
  args = parser().parse_args(argv)
  if args.worker:
    return worker(args)
  if args.smoke:
    args.rounds, args.steps, args.warmup, args.batch, args.seq = 1, 1, 1, 2, 32
  sides = args.sides.split(",")
  procs, info = {}, {}
  for s in sides:  # built and warmed one at a time: never two heavy jobs at once
    procs[s] = _start(s, args)
    info[s] = started(s, procs[s])
  turns = alternate(procs, args.rounds, args.steps, args.settle)
  finish(procs, info)
  tokens = args.batch * args.seq
  rows = {s: summary(info[s], turns[s], tokens) for s in sides}
  print(
    f"\nsetting={args.setting} batch={args.batch}x{args.seq} {args.dtype}, median of {len(turns[sides[0]]['times'])} "
    "steps/side"
  )
  print(f"cpu: {cpu_model()}")
  print(
    f"hugepages: {args.hugepages}, trained fraction: {args.trained_fraction}, "
    f"unmeasured steps per turn: {args.settle} (shown in parentheses)"
  )
  print(
    f"{'side':8} {'tokens/s':>9} {'step s':>7} {'min s':>6} {'peak RSS GB':>11} {'first step s':>12} "
    f"{'faults/step':>11} {'sys s/step':>10}"
  )
  for s, row in rows.items():
    print(
      f"{s:8} {row['tokens_per_s']:9.1f} {row['step_s']:7.2f} {row['step_min_s']:6.2f} "
      f"{row['peak_rss_gb']:11.2f} {row['first_step_s']:12.1f} {row['page_faults_per_step']:11,.0f} "
      f"{row['sys_s_per_step']:10.2f}"
    )
  if "jaxtune" in rows and "hf" in rows:
    j, h = rows["jaxtune"], rows["hf"]
    print(
      f"ratio jaxtune/HF: tokens/s {j['tokens_per_s'] / h['tokens_per_s']:.2f}x, "
      f"peak RSS {j['peak_rss_gb'] / h['peak_rss_gb']:.2f}x"
    )
  every = [x for s in sides for x in turns[s]["machine_gflops"]]
  print(
    f"machine float32 product rate before each turn: {min(every):.0f}-{max(every):.0f} GFLOP/s "
    f"({max(every) / min(every) - 1:.0%} apart)"
  )
  result = {
    "cpu": cpu_model(),
    "setting": args.setting,
    "dtype": args.dtype,
    "batch": args.batch,
    "seq": args.seq,
    "smoke": args.smoke,
    "hugepages": args.hugepages,
    "trained_fraction": args.trained_fraction,
    "settle": args.settle,
    "sides": rows,
  }
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
