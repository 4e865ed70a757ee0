"""Generate answers from a checkpoint on the command line.

    python -m jaxtune.generate --model PATH --prompt "What is the capital of France?"

The library code is `jaxtune.generation` (this module only parses arguments), so that
`jaxtune.generate` stays the function `generate` of the public API.
"""

from __future__ import annotations

import sys
from typing import Sequence

from jaxtune import cli
from jaxtune.generation import generate
from jaxtune.hf.load import load_model, load_tokenizer
from jaxtune.train import host


@cli.guard
def main(argv: Sequence[str]) -> int:
  parser = cli.parser("python -m jaxtune.generate", __doc__.split("\n", 1)[0])
  parser.add_argument("--model", required=True, help="HF checkpoint directory or hub id")
  parser.add_argument("--prompt", required=True, action="append", help="a user message (repeat for a batch)")
  parser.add_argument("--max_new_tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.0)
  parser.add_argument("--top_k", type=int, default=None)
  parser.add_argument("--top_p", type=float, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dtype", default="float32", help="float32 | bfloat16")
  args = parser.parse_args(argv)

  model, tokenizer = load_model(args.model, dtype=args.dtype), load_tokenizer(args.model)
  answers = generate(
    model,
    tokenizer,
    args.prompt,
    max_new_tokens=args.max_new_tokens,
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    seed=args.seed,
  )
  for answer in answers:
    print(answer)
  return 0


if __name__ == "__main__":
  host.reexec_with_huge_pages("jaxtune.generate")  # CPU: huge pages for XLA's per-call buffers (host.py)
  sys.exit(main())
