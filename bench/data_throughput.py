"""Data pipeline throughput (tokenise + template + masks, then pack + collate) against the train step.

    python -m bench.data_throughput                          # SmolLM2 tokenizer, quickstart records x 10
    python -m bench.data_throughput --step-tokens-per-s 150  # also print the ratio to a train step
    python -m bench.data_throughput --smoke                  # tiny character tokenizer, 1 copy (seconds)

The records are the quickstart's train.jsonl (jaxtune/tasks/data/meeting_json) repeated
--copies times (the cache is off, so every record is tokenised). Packing uses rows of --seq
tokens and batches of --batch rows, as the CPU train benchmark does. Tokens are the templated
example tokens (no padding).
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

from jaxtune.tasks import meeting_json


def tokenizer_for(smoke: bool):
  if smoke:
    from jaxtune.train.builtin_models import tiny_tokenizer

    return tiny_tokenizer()
  import gguf as gguf_lib

  from jaxtune.hf import gguf

  return gguf.build_tokenizer(gguf_lib.GGUFReader(gguf.smollm2_gguf_path()))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--source", default=str(meeting_json.DATA / "train.jsonl"))
  p.add_argument("--copies", type=int, default=10)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--step-tokens-per-s", type=float, default=0.0, help="train step tokens/s to compare with")
  p.add_argument("--smoke", action="store_true")
  args = p.parse_args(argv)
  from jaxtune.data import data_config, load_split, loader_for

  if args.smoke:
    args.copies = 1
  tokenizer = tokenizer_for(args.smoke)
  lines = pathlib.Path(args.source).read_text().splitlines()
  with tempfile.TemporaryDirectory() as tmp:
    source = pathlib.Path(tmp) / "records.jsonl"
    source.write_text("\n".join(lines * args.copies) + "\n")
    cfg = data_config()
    cfg.train, cfg.max_seq_len, cfg.batch_size, cfg.cache_dir = (str(source),), args.seq, args.batch, ""
    cfg.packing, cfg.num_epochs, cfg.prefetch = True, 1, 0
    t0 = time.perf_counter()
    data = load_split(cfg, tokenizer, "train")
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = list(loader_for(data, cfg))
    t_pack = time.perf_counter() - t0
  records, tokens = data.stats.records, data.stats.tokens
  rows = sum(b["input_ids"].shape[0] for b in batches)
  total = t_tok + t_pack
  print(
    f"{records:,} records, {tokens:,} tokens -> {len(batches):,} batches of {args.batch} x {args.seq} "
    f"(packing efficiency {tokens / max(rows * args.seq, 1):.1%})"
  )
  print(f"tokenise: {t_tok:.2f} s = {records / t_tok:,.0f} records/s, {tokens / t_tok:,.0f} tokens/s")
  print(f"pack+load: {t_pack:.2f} s = {tokens / t_pack:,.0f} tokens/s")
  print(f"end to end: {records / total:,.0f} records/s, {tokens / total:,.0f} tokens/s")
  if args.step_tokens_per_s:
    print(f"pipeline / train step tokens/s: {tokens / total / args.step_tokens_per_s:,.0f}x")
  return dict(records=records, tokens=tokens, tokenise_s=t_tok, pack_s=t_pack, tokens_per_s=tokens / total)


if __name__ == "__main__":
  main()
