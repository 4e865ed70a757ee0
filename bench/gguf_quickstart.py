"""The quickstart's GGUF export in llama.cpp: the held-out answers, llama.cpp's against jaxtune's.

    python -m jaxtune.train --config quickstart                     # runs/quickstart
    python -m bench.gguf_quickstart --run runs/quickstart [--dtype f16]

Exports the run's latest checkpoint as GGUF (jaxtune.export.run.export_run), answers the task's
held-out prompts greedily with jaxtune (the same call the training run scores with) and with
llama.cpp (llama-cpp-python) on the same prompt tokens, and prints both scores and how many answers
are the same text. Needs llama-cpp-python.
"""

from __future__ import annotations

import argparse
import pathlib
import time


def llama_cpp_answers(path: pathlib.Path, prompts: list[list[int]], stops: list[int], max_new: int) -> list[list[int]]:
  """Greedy new tokens (up to and including a stop token) for each prompt."""
  import llama_cpp

  llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, verbose=False)
  out = []
  for ids in prompts:
    llm.reset()
    new = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
      new.append(token)
      if token in stops or len(new) == max_new:
        break
    out.append(new)
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run", type=pathlib.Path, default=pathlib.Path("runs/quickstart"))
  p.add_argument("--out", type=pathlib.Path, default=None, help="default: RUN-gguf")
  p.add_argument("--dtype", default="f16")
  args = p.parse_args(argv)

  from jaxtune import tasks
  from jaxtune.export import run as export_run
  from jaxtune.generation import encode_prompts, generate_ids
  from jaxtune.hf import load as hf_load
  from jaxtune.hf.tokens import END_OF_TURN_TOKENS

  start = time.perf_counter()
  out = args.out or args.run.with_name(args.run.name + "-gguf")
  path = export_run.export_run(args.run, out, "gguf", dtype=args.dtype, overwrite=True)
  exported = time.perf_counter() - start
  loaded = export_run.load_run(args.run)
  task = loaded.config["task"]
  examples = tasks.load_examples(task["test_file"], task["num_examples"])
  tokenizer = hf_load.load_tokenizer(loaded.source_dir)
  prompts = encode_prompts(tokenizer, [e.prompt for e in examples])
  vocab = tokenizer.get_vocab()
  stops = sorted({tokenizer.eos_token_id} | {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab})
  ours = generate_ids(loaded.model, prompts, max_new_tokens=task["max_new_tokens"], stop_ids=stops)
  theirs = llama_cpp_answers(path, prompts, stops, task["max_new_tokens"])
  texts = [[tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in side] for side in (ours, theirs)]
  score = lambda answers: sum(tasks.SCORERS[task["scorer"]](a, e.reference) for a, e in zip(answers, examples))
  same = sum(a == b for a, b in zip(*texts))
  result = {
    "examples": len(examples),
    "jaxtune_correct": score(texts[0]),
    "llama_cpp_correct": score(texts[1]),
    "same_answer_text": same,
    "same_answer_tokens": sum(a == b for a, b in zip(ours, theirs)),
    "export_s": round(exported, 1),
    "gguf": str(path),
  }
  for a, b in zip(*texts):
    if a != b:
      print(f"  jaxtune: {a!r}\n  llama.cpp: {b!r}")
  print(result)
  return result


if __name__ == "__main__":
  main()
