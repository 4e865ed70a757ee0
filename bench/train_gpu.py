"""jaxtune vs transformers + PEFT on one GPU: Llama 3.2 1B shape, sequence 2048, bf16, LoRA and full.

    python -m bench.train_gpu                     # both settings, prints one table (< 8 min on an H100)
    python -m bench.train_gpu --settings lora     # one setting
    python -m bench.train_gpu --smoke             # tiny shape, 1 step each (runs on CPU too)

Same protocol as bench/train_cpu.py: each side in its own worker process, warm-up, then
alternating rounds; median step time. jaxtune: bf16 compute, cuDNN attention, float32
trained weights (LoRA: bf16 frozen base). HF: the same dtypes (bf16 base under LoRA, float32
weights under bf16 autocast for full), sdpa attention, torch AdamW (fused).
Peak memory is the device allocator's peak (jax memory_stats / torch max_memory_allocated).
MFU = model FLOPs / step time / peak bf16 FLOP/s (--peak-tflops, 989 for H100/H200 SXM dense):
full counts 6 x params x tokens; LoRA counts 4 x params x tokens (forward 2N, activation
gradients 2N; the frozen weights get no weight gradients, adapter FLOPs are ignored); neither
counts attention's T^2 FLOPs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench.train_cpu import HF_TARGETS, LORA, SMOKE, _ask, jaxtune_step, random_tokens, serve

LLAMA32_1B = dict(
  architectures=["LlamaForCausalLM"],
  model_type="llama",
  vocab_size=128256,
  hidden_size=2048,
  intermediate_size=8192,
  num_hidden_layers=16,
  num_attention_heads=32,
  num_key_value_heads=8,
  head_dim=64,
  hidden_act="silu",
  rms_norm_eps=1e-5,
  max_position_embeddings=131072,
  tie_word_embeddings=True,
  rope_theta=500000.0,
  bos_token_id=128000,
  eos_token_id=128001,
)
LR = 1e-4


# Probes of the cuDNN call, for A/B runs on a GPU: what a segment-aware call would gain; not library options.
# With --segments 1 (the default) every row is one unpadded sequence, so all of them compute the same
# function; the segment probes are valid only on the --segments batch they are told about.
CUDNN_PROBES = {
  "cudnn_causal": "is_causal=True besides the mask (what the library's call does)",
  "cudnn_causal_nomask": "is_causal=True and no mask (no [B, 1, T, S] bias to read; unpacked rows only)",
  "cudnn_segments": "no mask: jax's private cuDNN call told each row's --segments as lengths and offsets",
  "cudnn_segments_rep": "cudnn_segments with k and v repeated to the query heads (in case GQA offsets are off)",
}


def _probe_cudnn(variant: str, segments: int) -> None:
  """Makes jaxtune's jax.nn.dot_product_attention calls in this worker process use `variant`.

  The segment probes ask cuDNN's packed (ragged) layout for what the mask says: `segments` examples
  of T / segments tokens per row, causal within each, which is the batch `--segments` builds. They
  use jax._src.cudnn.fused_attention_stablehlo (Hopper only; jax has no public way to pass segments)
  and ignore the mask they are given, so they are only valid on that batch; the loss column checks
  them against `--attn cudnn` on the same batch. Off GPU (smoke runs) they run the masked call.
  """
  import jax
  import jax.numpy as jnp

  plain = jax.nn.dot_product_attention

  def segmented(query, key, value, scale):
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    B, T, N, _ = query.shape
    if variant == "cudnn_segments_rep":
      key, value = (jnp.repeat(x, N // x.shape[2], axis=2) for x in (key, value))
    length = T // segments
    lengths = jnp.full((B, segments), length, jnp.int32)
    offsets = jnp.broadcast_to(jnp.arange(segments + 1, dtype=jnp.int32) * length, (B, segments + 1))
    return cudnn.dot_product_attention(
      query,
      key,
      value,
      None,
      None,
      lengths,
      lengths,
      offsets,
      offsets,
      scale=scale,
      mask_type=cudnn.MaskType.PADDING_CAUSAL,
      qkv_layout="BTNH",
    )

  def call(query, key, value, bias=None, mask=None, **kwargs):
    if variant.startswith("cudnn_segments") and kwargs.get("implementation") == "cudnn":
      return segmented(query, key, value, kwargs.get("scale"))
    kwargs["is_causal"] = True
    return plain(query, key, value, bias, None if variant == "cudnn_causal_nomask" else mask, **kwargs)

  jax.nn.dot_product_attention = call


def jax_side(hf_cfg, setting, batch, seq, attn, remat, loss_chunk, segments=1, kernels="plain"):
  import jax

  from jaxtune.models import options as options_lib
  from jaxtune.models.config import from_hf_dict

  if jax.default_backend() == "cpu":  # smoke runs
    dtypes = {"dtype": "float32", "param_dtype": "float32"}
  else:  # bf16 compute; float32 trained weights; under LoRA the frozen base is bf16 too
    dtypes = {"dtype": "bfloat16", "param_dtype": "bfloat16" if setting == "lora" else "float32"}
  impl = attn
  if attn in CUDNN_PROBES:
    _probe_cudnn(attn, segments)
    impl = "cudnn"
  if jax.default_backend() != "gpu" and impl == "cudnn":  # smoke runs: the same call's XLA implementation
    impl = "dot_product"
  options = options_lib.for_platform(jax.default_backend(), kernels=kernels, attention_impl=impl, remat=remat, **dtypes)
  run, n_trainable, n_frozen = jaxtune_step(
    from_hf_dict(hf_cfg), options, setting, batch, seq, loss_chunk, lr=LR, segments=segments
  )
  n_params = n_frozen if setting == "lora" else n_trainable + n_frozen  # base weights only

  def peak_gb():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 1e9

  return run, n_params, peak_gb


def hf_side(hf_cfg, setting, batch, seq, attn):
  import torch
  import transformers

  torch.manual_seed(0)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  config = transformers.LlamaConfig(**hf_cfg)
  config._attn_implementation = attn
  base_dtype = torch.bfloat16 if setting == "lora" else torch.float32
  model = transformers.LlamaForCausalLM(config).to(device=dev, dtype=base_dtype)
  n_params = sum(p.numel() for p in model.parameters())
  if setting == "lora":
    import peft

    model = peft.get_peft_model(
      model,
      peft.LoraConfig(
        r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=HF_TARGETS, task_type="CAUSAL_LM"
      ),
    )
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=dev == "cuda")
  ids = torch.from_numpy(random_tokens(batch, seq, hf_cfg["vocab_size"]).astype("int64")).to(dev)

  def run():
    with torch.autocast(dev, dtype=torch.bfloat16):
      loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())  # synchronises

  def peak_gb():
    return torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else 0.0

  return run, n_params, peak_gb


def worker(args) -> None:
  hf_cfg = SMOKE if args.smoke else LLAMA32_1B
  if args.worker == "jaxtune":
    run, n, peak = jax_side(
      hf_cfg, args.setting, args.batch, args.seq, args.attn, args.remat, args.loss_chunk, args.segments, args.kernels
    )
  else:
    run, n, peak = hf_side(hf_cfg, args.setting, args.batch, args.seq, args.hf_attn)
  t0 = time.perf_counter()
  run()
  first = time.perf_counter() - t0
  for _ in range(args.warmup - 1):
    run()
  print(json.dumps({"first_step_s": first, "params": n}), flush=True)
  serve(run)
  print(json.dumps({"peak_gb": peak()}), flush=True)


def run_setting(args, setting: str) -> dict:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs, info, times = {}, {}, {side: [] for side in args.sides.split(",")}
  losses = {}
  for side in times:
    cmd = [
      sys.executable,
      "-m",
      "bench.train_gpu",
      "--worker",
      side,
      "--settings",
      setting,
      "--batch",
      str(args.batch),
      "--seq",
      str(args.seq),
      "--warmup",
      str(args.warmup),
      "--attn",
      args.attn,
      "--remat",
      args.remat,
      "--loss-chunk",
      str(args.loss_chunk),
      "--hf-attn",
      args.hf_attn,
      "--segments",
      str(args.segments),
      "--kernels",
      args.kernels,
    ]
    cmd += ["--smoke"] if args.smoke else []
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # both workers share the card
    procs[side] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root, env=env)
    info[side] = _ask(procs[side])
  order = list(times)
  for r in range(args.rounds):
    for side in order if r % 2 == 0 else order[::-1]:
      reply = _ask(procs[side], f"run {args.steps}")
      times[side] += reply["times"]
      losses[side] = reply["loss"]
  for side in times:
    info[side].update(_ask(procs[side], "quit"))
    procs[side].wait()
  tokens = args.batch * args.seq
  rows = {}
  for side, ts in times.items():
    step_s = statistics.median(ts)
    flops = (6 if setting == "full" else 4) * info[side]["params"] * tokens
    rows[side] = dict(
      info[side],
      step_s=step_s,
      tokens_per_s=tokens / step_s,
      loss=losses[side],
      mfu=flops / step_s / (args.peak_tflops * 1e12),
    )
  return rows


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--settings", default="lora,full")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument(
    "--attn",
    default="cudnn",
    choices=("cudnn", "xla", *CUDNN_PROBES),
    help="jaxtune attention on GPU: cudnn | xla, or a probe: "
    + "; ".join(f"{k}: {v}" for k, v in CUDNN_PROBES.items()),
  )
  p.add_argument(
    "--kernels",
    default="plain",
    choices=("plain", "cpu"),
    help="jaxtune kernels (model.kernels): plain, the GPU default, or the CPU-tuned ones to compare",
  )
  p.add_argument("--sides", default="jaxtune,hf", help="jaxtune,hf | jaxtune (A/B runs of jaxtune variants)")
  p.add_argument(
    "--remat", default="dots_no_batch", help="jaxtune remat: none | full | dots | dots_no_batch (the training default)"
  )
  p.add_argument("--loss-chunk", type=int, default=512)
  p.add_argument(
    "--segments",
    type=int,
    default=1,
    help="jaxtune only: examples packed into each row (HF always sees one sequence per row)",
  )
  p.add_argument("--hf-attn", default="sdpa")
  p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--worker", choices=("jaxtune", "hf"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    args.setting = args.settings
    return worker(args)
  if args.segments > 1 and "hf" in args.sides.split(","):
    p.error("--segments packs jaxtune's rows only; run it with --sides jaxtune")
  if args.smoke:
    args.batch, args.seq, args.rounds, args.steps, args.warmup = 2, 32, 1, 1, 1
  results = {s: run_setting(args, s) for s in args.settings.split(",")}
  print(
    f"\nLlama 3.2 1B shape, batch {args.batch} x {args.seq}, bf16; median step; MFU vs {args.peak_tflops} TFLOP/s; "
    f"jaxtune attention {args.attn}, remat {args.remat}"
    + (f", {args.segments} segments a row" if args.segments > 1 else "")
  )
  print(f"{'setting':8} {'side':8} {'tokens/s':>9} {'step s':>7} {'peak GB':>8} {'MFU':>6} {'first s':>8} {'loss':>8}")
  for s, rows in results.items():
    for side, row in rows.items():
      print(
        f"{s:8} {side:8} {row['tokens_per_s']:9.0f} {row['step_s']:7.3f} {row['peak_gb']:8.1f} "
        f"{row['mfu']:6.1%} {row['first_step_s']:8.1f} {row['loss']:8.4f}"
      )
    if set(rows) != {"jaxtune", "hf"}:
      continue
    j, h = rows["jaxtune"], rows["hf"]
    print(
      f"{s:8} ratio jaxtune/HF: tokens/s {j['tokens_per_s'] / h['tokens_per_s']:.2f}x, "
      f"peak memory {j['peak_gb'] / max(h['peak_gb'], 1e-9):.2f}x"
    )
  return results


if __name__ == "__main__":
  main()
