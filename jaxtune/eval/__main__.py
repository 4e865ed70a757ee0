"""jaxtune eval (--run RUN_DIR [--step N] | --model HF_DIR [--adapter PEFT_DIR]) (--data FILE | --split SPLIT)

(also `python -m jaxtune.eval ...`). Scores greedy answers to the examples' prompts against their
references (the last assistant turn of each chat record; a record's "references" list adds more) with
the metrics of `--metrics` (default: every one that applies), each with a bootstrap 95% interval, plus
perplexity and token accuracy of the references. Writes OUT/eval.json and OUT/predictions.jsonl (OUT:
--out, default RUN_DIR/eval/step_N or ./eval) and prints a table. `--split test` takes the test split
the run's data config holds out (data.test_fraction); with --model, --config names that data config.
With --run and neither, the run's own task is scored as training scored it after the last step
(task.test_file, task.num_examples, task.scorer + task.metrics, task.max_new_tokens, task.batch_size).
`--lm-eval TASKS` runs lm-evaluation-harness tasks on the model instead (jaxtune/eval/lm_eval.py).

    python -m jaxtune.eval --run runs/quickstart
    python -m jaxtune.eval --run runs/quickstart --data jaxtune/tasks/data/meeting_json/test.jsonl
    python -m jaxtune.eval --model HuggingFaceTB/SmolLM2-135M-Instruct --data qa.jsonl --metrics f1,em
"""

from __future__ import annotations

import json
import pathlib
import sys

from jaxtune import cli
from jaxtune.errors import UserError
from jaxtune.train import host


def parser():
  p = cli.parser("jaxtune eval", __doc__.split("\n\n", 1)[1], config="with --model and --split: the data config")
  p.add_argument("--run", help="a training run directory (its checkpoint is evaluated; no export needed)")
  p.add_argument("--step", type=int, help="the run's checkpoint step (default: the latest)")
  p.add_argument("--model", help="an HF checkpoint directory, hub id or built-in model name")
  p.add_argument("--adapter", default="", help="with --model: a PEFT LoRA adapter directory applied to it")
  p.add_argument("--data", help="a JSONL file of chat records ({'messages': [...]}) ending with the reference")
  p.add_argument("--split", choices=("train", "validation", "test"), help="a split of the run's data config")
  p.add_argument("--metrics", default="", help="comma-separated metric names (default: all that apply)")
  p.add_argument("--limit", type=int, default=0, help="only the first N examples (0: all)")
  p.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's task.max_new_tokens, or 64")
  p.add_argument("--batch-size", type=int, default=None, help="prompts generated together (default: 16)")
  p.add_argument("--out", help="output directory for eval.json and predictions.jsonl")
  p.add_argument("--lm-eval", dest="lm_eval", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks")
  p.add_argument("--include-path", help="--lm-eval: a directory of extra task YAML files")
  p.add_argument("--num-fewshot", type=int, default=None, help="--lm-eval: few-shot examples per request")
  p.add_argument("--apply-chat-template", action="store_true", help="--lm-eval: prompts through the chat template")
  p.add_argument("--fewshot-as-multiturn", action="store_true", help="--lm-eval: few-shot examples as chat turns")
  return p


def _check(p, args, config) -> None:
  if bool(args.run) == bool(args.model):
    p.error("give exactly one of --run RUN_DIR or --model HF_DIR")
  if args.adapter and not args.model:
    p.error("--adapter goes with --model (a run's adapters are in its checkpoint)")
  if args.lm_eval:
    return
  if args.data and args.split:
    p.error("give one of --data FILE or --split SPLIT")
  if not (args.data or args.split or args.run):
    p.error("give --data FILE or --split SPLIT")
  if args.split and args.model and config is None:
    p.error("--split with --model needs --config NAME_OR_FILE (the data config that defines the split)")


@cli.guard
def main(argv: list[str]) -> int:
  from jaxtune import configs

  spec, overrides, rest = configs.split_argv(argv)
  p = parser()
  args = p.parse_args(rest)
  config = configs.load(spec, overrides) if spec else None
  _check(p, args, config)
  if args.metrics:
    from jaxtune.eval import metrics

    metrics.parse(args.metrics)  # a bad name fails before any model loads
  from jaxtune.eval import run as run_lib

  loaded = run_lib.load_run_model(args.run, args.step) if args.run else run_lib.load_hf_model(args.model, args.adapter)
  if args.lm_eval:
    from jaxtune.eval import lm_eval as lm_eval_lib

    results = lm_eval_lib.run_tasks(
      loaded,
      args.lm_eval,
      include_path=args.include_path,
      num_fewshot=args.num_fewshot,
      apply_chat_template=args.apply_chat_template,
      fewshot_as_multiturn=args.fewshot_as_multiturn,
      limit=args.limit or None,
      batch_size=args.batch_size or 8,
    )
    print(json.dumps(results, indent=2, default=str))
    return 0
  from jaxtune import tasks

  task = (loaded.config or {}).get("task", {})
  metrics_spec, max_new, batch = args.metrics, args.max_new_tokens or 64, args.batch_size or 16
  if args.data:
    examples = tasks.load_examples(args.data, args.limit or None)
  elif not args.split:  # the run's own task, as training scored it
    if not task.get("test_file"):
      raise UserError(f"{args.run}: the run has no task.test_file to score; give --data FILE or --split SPLIT")
    examples = tasks.load_examples(task["test_file"], args.limit or task["num_examples"])
    metrics_spec = args.metrics or ",".join([task["scorer"], *[n for n in task.get("metrics", "").split(",") if n]])
    max_new = args.max_new_tokens or task["max_new_tokens"]
    batch = args.batch_size or task["batch_size"]
  else:
    data = config.data if config is not None else loaded.config["data"]
    examples = run_lib.split_examples(data, args.split)[: args.limit or None]
  if not examples:
    raise UserError(f"{args.data or args.split}: no examples")
  out = args.out or (
    pathlib.Path(args.run) / "eval" / f"step_{loaded.source['step']}" if args.run else pathlib.Path("eval")
  )
  data = str(args.data) if args.data else (None if args.split else task.get("test_file"))
  settings = {"data": data, "split": args.split, "limit": args.limit}
  run_lib.evaluate(
    loaded, examples, metrics_spec, out_dir=out, max_new_tokens=max_new, batch_size=batch, settings=settings
  )
  return 0


if __name__ == "__main__":
  host.reexec_with_huge_pages("jaxtune.eval")  # CPU: huge pages for XLA's per-call buffers (host.py)
  sys.exit(main())
