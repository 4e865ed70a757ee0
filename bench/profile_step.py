"""Where jaxtune's train step spends its device time: one profiled step, summed by HLO op and kind.

    python -m bench.profile_step --setting lora          # the GPU benchmark's step (bench/train_gpu.py)
    python -m bench.profile_step --setting full --top 40
    python -m bench.profile_step --smoke                 # tiny shape; runs on CPU too

Builds the same step as `bench.train_gpu` (Llama 3.2 1B shape, 4 x 2048, bf16 on GPU), times a
few steps, then traces `--profile-steps` more with jax.profiler and reads the trace back
(jax.profiler.ProfileData). Every device event that names its HLO op is summed per op and per
kind (matmul, attention, elementwise/reduction fusions, copies and slices, collectives), and the
table reports milliseconds per step and the share of the device's busy time. On GPU, XLA runs
the step as command buffers (CUDA graphs), whose kernels all name their buffer as the HLO op; such
a kernel is counted under its own name instead, which is its fusion's name. On CPU the events are
XLA's thunks on the host threads, so the shares are of op time summed over threads. The trace
stays in --trace-dir for TensorBoard/XProf; `--from-trace FILE --profile-steps N` summarises a
trace taken earlier (one brought back from a device machine, say) without running anything, and
`--hlo` with the step's optimised HLO text puts each op's jax op name in the scope column and adds a
table of wall time and FLOP rate per product role (layer products, LM head, attention, adapter
factors, no product), then the `--top` ops by their share of wall time, each with its role and
rate. For the CPU step, take both from `bench.train_cpu`:

    python -m bench.train_cpu --setting lora --sides jaxtune --rounds 1 --profile /tmp/tr \
      --xla-flags="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text"
    python -m bench.profile_step --from-trace /tmp/tr/plugins/profile/*/*.xplane.pb --profile-steps 1 \
      --hlo /tmp/hlo/*jit_step.cpu_after_optimizations.txt
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import statistics
import tempfile
import time

from bench import train_gpu

# Kind of a device event, tried in order on "<kernel name> <hlo op>" (cuDNN, cuBLAS and XLA names).
KINDS = (
  ("attention", re.compile(r"sdpa|fmha|flash|attention|cudnn", re.I)),
  ("matmul", re.compile(r"gemm|xmma|nvjet|cutlass|cublas|matmul|\bdot[._\b]|convolution|ynn_fusion", re.I)),
  ("collective", re.compile(r"nccl|all-reduce|all-gather|reduce-scatter|all-to-all|collective", re.I)),
  (
    "copy/slice",
    re.compile(
      r"memcpy|memset|copy|dynamic[-_]update[-_]slice|dynamic[-_]slice|transpose|"
      r"concatenate",
      re.I,
    ),
  ),
  ("reduction", re.compile(r"reduce", re.I)),
)


CONTROL_FLOW = re.compile(r"^(while|cond|conditional|call)[._]")  # spans its body's ops (CPU): not counted
COMMAND_BUFFER = re.compile(r"^command_buffer")  # a CUDA graph (GPU): its kernels are told apart by name


def kind_of(kernel: str, hlo_op: str) -> str:
  text = f"{kernel} {hlo_op}"
  return next((kind for kind, pattern in KINDS if pattern.search(text)), "elementwise/other")


def op_events(xplane_file: str) -> list[tuple[str, str, int, int, str]]:
  """(kernel name, hlo op, start ns, duration ns, jax scope) of every event that names an HLO op;
  device planes when there are any, else the host's (CPU). The scope (the op's jax name stack,
  where the trace records one) tells which layer or loss an op belongs to."""
  import jax

  planes = list(jax.profiler.ProfileData.from_file(xplane_file).planes)
  device = [p for p in planes if p.name.startswith("/device:")]
  events = []
  for plane in device or [p for p in planes if p.name.startswith("/host:CPU")]:
    for line in plane.lines:
      for e in line.events:
        stats = dict(e.stats)
        if "hlo_op" in stats and not CONTROL_FLOW.match(str(stats["hlo_op"])):
          scope = str(stats.get("tf_op") or stats.get("name") or "")
          op = str(stats["hlo_op"])
          if COMMAND_BUFFER.match(op):  # XLA names a fused kernel after its fusion, "_" for "."
            op = re.sub(r"_(\d+)$", r".\1", e.name)
          events.append((e.name, op, int(e.start_ns), int(e.duration_ns), scope))
  return events


def hlo_op_names(hlo_text_file: str) -> dict[str, str]:
  """{HLO instruction: its jax op name} from an optimised HLO module's text (XLA_FLAGS=--xla_dump_to=...
  --xla_dump_hlo_as_text; bench/gpu_session.sh brings one back), to say which jax op a kernel runs."""
  names = {}
  with open(hlo_text_file) as f:
    for line in f:
      m = re.match(r'\s+(?:ROOT )?%([\w.\-]+) = .*?op_name="([^"]*)"', line)
      if m:
        names[m.group(1)] = m.group(2)
  return names


def with_op_names(events, names: dict[str, str]):
  """Events whose scope is the jax op name of their HLO instruction, where the HLO names it."""
  return [(kernel, op, start, dur, names.get(op, scope)) for kernel, op, start, dur, scope in events]


# A product's role, from its shape (`product_costs`): the roles the step's floor is argued from.
VOCAB_DIM = 16384  # a product with a dimension this large is the LM head's (vocabularies: 32k-262k)
SKINNY_DIM = 64  # an unbatched product with a dimension this small is an adapter factor's (LoRA rank)


def product_costs(hlo_text: str) -> dict[str, tuple[float, str]]:
  """{HLO instruction: (FLOPs, role)} for every dot of an optimised HLO module, keyed by the fusion
  that runs it (or the dot itself, unfused). Roles: "attention" (a dot with batch dimensions),
  "LM head" (a dimension >= VOCAB_DIM), "adapter factors" (an output or contracted dimension
  <= SKINNY_DIM), else "layer products"."""
  dots = {}  # computation name -> (flops, role)
  computation, shapes = None, {}
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%([\w.\-]+) \((.*)\) -> .* \{$", line)
    if head:
      computation = head.group(1)
      shapes = {n: d for n, d in re.findall(r"([\w.\-]+): \w+\[([\d,]*)\]", head.group(2))}
      continue
    m = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]\S* (\w+)\((.*)", line)
    if not m:
      continue
    name, out, opcode, rest = m.groups()
    shapes[name] = out
    if opcode != "dot":
      continue
    lhs = re.match(r"%([\w.\-]+)", rest).group(1)
    lhs_dims = [int(d) for d in shapes.get(lhs, "").split(",") if d]
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
    k = 1
    for i in (int(i) for i in contracting.split(",") if i):
      k *= lhs_dims[i]
    out_dims = [int(d) for d in out.split(",") if d]
    flops = 2.0 * k
    for d in out_dims:
      flops *= d
    if "lhs_batch_dims" in rest:
      role = "attention"
    elif max(out_dims + [k]) >= VOCAB_DIM:
      role = "LM head"
    elif min(out_dims + [k]) <= SKINNY_DIM:
      role = "adapter factors"
    else:
      role = "layer products"
    dots[name] = (flops, role)
    # a fusion that runs two dots (rare) counts both, under the role of the last
    dots[computation] = (dots.get(computation, (0.0, role))[0] + flops, role)
  costs = dict(dots)
  for name, called in re.findall(r"%([\w.\-]+) = .*? fusion\(.*?calls=%([\w.\-]+)", hlo_text):
    if called in dots:
      costs[name] = dots[called]
  return costs


NO_PRODUCT = (0.0, "no product")  # the (FLOPs, role) of an op that `product_costs` does not list


def wall_by_op(events) -> collections.Counter:
  """{hlo op: wall ns} over all steps: ops that run at the same time (XLA's CPU runtime runs independent
  thunks on its threads) share that wall time equally, so the values sum to the busy time."""
  wall: collections.Counter = collections.Counter()
  running: collections.Counter = collections.Counter()
  last = None
  for t, delta, op in sorted(
    [(s, 1, op) for _, op, s, _, _ in events] + [(s + d, -1, op) for _, op, s, d, _ in events]
  ):
    if last is not None and running:
      share = (t - last) / sum(running.values())
      for o, n in running.items():
        wall[o] += share * n
    running[op] += delta
    if not running[op]:
      del running[op]
    last = t
  return wall


def by_role(events, costs: dict[str, tuple[float, str]], steps: int) -> dict[str, tuple[float, float]]:
  """{role: (wall ms, GFLOP) per step} for the product roles of `product_costs`, "no product" for the rest.

  Wall time as in `wall_by_op`, so the rows sum to the busy time, and GFLOP over wall is the rate
  the step got from that role: one near the machine's FMA peak has nothing left to give."""
  flops: collections.Counter = collections.Counter()
  wall: collections.Counter = collections.Counter()
  for _, op, _, _, _ in events:
    gflop, role = costs.get(op, NO_PRODUCT)
    flops[role] += gflop
  for op, ns in wall_by_op(events).items():
    wall[costs.get(op, NO_PRODUCT)[1]] += ns
  return {role: (ns / steps / 1e6, flops[role] / steps / 1e9) for role, ns in wall.most_common()}


def format_op_walls(events, costs: dict[str, tuple[float, str]], steps: int, top: int) -> str:
  """The `top` ops by wall time a step (as in `wall_by_op`), each with its role and, for products, its
  GFLOP/s of wall: which single op is worth changing, and whether a product is below the machine's rate."""
  wall, summed, calls, scope = wall_by_op(events), collections.Counter(), collections.Counter(), {}
  for _, op, _, dur, sc in events:
    summed[op] += dur
    calls[op] += 1
    scope[op] = scope.get(op) or sc
  lines = [
    f"top {top} ops by wall",
    f"{'wall ms':>8} {'sum ms':>8} {'n/step':>6}  {'role':16} {'GFLOP/s':>7}  {'hlo op':28} scope",
  ]
  for op, ns in wall.most_common(top):
    flops, role = costs.get(op, NO_PRODUCT)
    rate = f"{flops * calls[op] / ns:7.0f}" if flops and ns else " " * 7
    lines.append(
      f"{ns / steps / 1e6:8.2f} {summed[op] / steps / 1e6:8.2f} {calls[op] / steps:6.0f}  {role:16} "
      f"{rate}  {op[:28]:28} {scope[op][-60:]}"
    )
  return "\n".join(lines)


def format_roles(roles: dict[str, tuple[float, float]]) -> str:
  lines = [f"{'role':16} {'wall ms/step':>12} {'GFLOP/step':>10} {'GFLOP/s of wall':>15}"]
  for role, (ms, gflop) in roles.items():
    lines.append(f"{role:16} {ms:12.1f} {gflop:10.1f} " + (f"{gflop / ms * 1e3:15.0f}" if gflop else ""))
  return "\n".join(lines)


def busy_ns(events) -> int:
  """Length of the union of the events' intervals (time the device ran anything)."""
  total, end = 0, None
  for start, dur in sorted((e[2], e[3]) for e in events):
    if end is None or start > end:
      total, end = total + dur, start + dur
    elif start + dur > end:
      total, end = total + start + dur - end, start + dur
  return total


def summarise(events, steps: int, top: int) -> str:
  per_op: dict[str, list] = collections.defaultdict(lambda: [0, 0, "", "", ""])  # ns, count, kind, kernel, scope
  per_kind: collections.Counter = collections.Counter()
  for kernel, op, _, dur, scope in events:
    row = per_op[op]
    row[0] += dur
    row[1] += 1
    row[2] = row[2] or kind_of(kernel, op)
    row[3] = row[3] or kernel
    row[4] = row[4] or scope
    per_kind[row[2]] += dur
  summed = sum(per_kind.values()) or 1
  busy = busy_ns(events)
  lines = [
    f"device busy {busy / steps / 1e6:.1f} ms/step; op time summed {summed / steps / 1e6:.1f} ms/step",
    f"{'kind':18} {'ms/step':>9} {'share':>6}",
  ]
  lines += [f"{kind:18} {ns / steps / 1e6:9.2f} {ns / summed:6.1%}" for kind, ns in per_kind.most_common()]
  lines += [
    "",
    f"top {top} ops",
    f"{'ms/step':>8} {'share':>6} {'n/step':>6}  {'kind':18} {'hlo op':28} kernel | scope",
  ]
  for op, (ns, n, kind, kernel, scope) in sorted(per_op.items(), key=lambda kv: -kv[1][0])[:top]:
    lines.append(
      f"{ns / steps / 1e6:8.2f} {ns / summed:6.1%} {n / steps:6.0f}  {kind:18} {op[:28]:28} "
      f"{kernel[:60]}" + (f" | {scope[-60:]}" if scope else "")
    )
  return "\n".join(lines)


def trace_report(xplane_file: str, steps: int, hlo_file: str = "", top: int = 30) -> str:
  """`summarise` of a trace of `steps` steps; with the program's optimised HLO, also the roles and the top ops."""
  events = op_events(xplane_file)
  if hlo_file:
    events = with_op_names(events, hlo_op_names(hlo_file))
  report = summarise(events, steps, top)
  if hlo_file:
    with open(hlo_file) as f:
      costs = product_costs(f.read())
    report += "\n\n" + format_roles(by_role(events, costs, steps))
    report += "\n\n" + format_op_walls(events, costs, steps, top)
  return report


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--setting", default="lora", choices=("lora", "full"))
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--attn", default="cudnn")
  p.add_argument("--remat", default="dots_no_batch")
  p.add_argument("--loss-chunk", type=int, default=512)
  p.add_argument("--timed-steps", type=int, default=3)
  p.add_argument("--profile-steps", type=int, default=2)
  p.add_argument("--top", type=int, default=30)
  p.add_argument("--trace-dir", default="")
  p.add_argument("--from-trace", default="", help="summarise this .xplane.pb (of --profile-steps steps) and exit")
  p.add_argument("--hlo", default="", help="with --from-trace: the step's optimised HLO text, to name each op's jax op")
  p.add_argument("--smoke", action="store_true")
  args = p.parse_args(argv)
  if args.from_trace:
    report = trace_report(args.from_trace, args.profile_steps, args.hlo, args.top)
    print(report, flush=True)
    return report
  import jax

  if args.smoke:
    args.batch, args.seq, args.loss_chunk = 2, 32, 16
  hf_cfg = train_gpu.SMOKE if args.smoke else train_gpu.LLAMA32_1B
  run, _, peak_gb = train_gpu.jax_side(
    hf_cfg, args.setting, args.batch, args.seq, args.attn, args.remat, args.loss_chunk
  )
  t0 = time.perf_counter()
  run()
  first = time.perf_counter() - t0
  run()
  times = []
  for _ in range(args.timed_steps):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="jaxtune_profile_")
  with jax.profiler.trace(trace_dir):
    for _ in range(args.profile_steps):
      run()
  xplane = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
  step_s = statistics.median(times)
  head = (
    f"{args.setting} on {jax.devices()[0].device_kind}: batch {args.batch} x {args.seq}, attention "
    f"{args.attn}, remat {args.remat}; step {step_s * 1e3:.1f} ms (median of {len(times)}), "
    f"{args.batch * args.seq / step_s:,.0f} tokens/s, first step {first:.1f} s, peak {peak_gb():.1f} GB\n"
    f"trace: {xplane}"
  )
  report = head + "\n" + summarise(op_events(xplane), args.profile_steps, args.top)
  print(report, flush=True)
  return report


if __name__ == "__main__":
  main()
