"""lm-evaluation-harness on a jaxtune model: `JaxtuneLM` and `run_tasks`.

    import lm_eval
    lm_eval.simple_evaluate(model=JaxtuneLM(model, tokenizer), tasks=["hellaswag"])

lm-eval 0.4.13 does not discover model classes outside its package, so `lm_eval --model jaxtune` is
not the interface; `python -m jaxtune.eval --run RUN --lm-eval TASKS` is. JaxtuneLM derives from
lm-eval's TemplateLM, so contexts and continuations are split into tokens as its `hf` model splits
them; token scores come from jaxtune/eval/scoring.py, answers from the KV-cache sampler. lm-eval (and
the torch it pulls) is imported only here.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import TemplateLM

from jaxtune.eval import scoring


class JaxtuneLM(TemplateLM):
  """A jaxtune CausalLM and its tokenizer as an lm-eval model (loglikelihood, rolling, generate_until)."""

  def __init__(
    self,
    model: Any,
    tokenizer: Any,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    max_gen_toks: int = 256,
    add_bos_token: bool | None = None,
  ):
    super().__init__()
    self.model, self.tokenizer = model, tokenizer
    self.batch_size = batch_size
    self.max_length = max_length or int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    self.max_gen_toks = max_gen_toks
    self.add_bos_token = add_bos_token

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    bos = self.tokenizer.bos_token_id
    return bos if bos is not None else self.tokenizer.eos_token_id

  @property
  def tokenizer_name(self) -> str:
    return str(getattr(self.tokenizer, "name_or_path", "jaxtune")).replace("/", "__")

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """As lm-eval's `hf` model encodes: the tokenizer's own special tokens unless told otherwise."""
    if add_special_tokens is None and self.add_bos_token is not None:
      add_special_tokens = self.add_bos_token
    extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    return self.tokenizer.encode(string, **extra)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    sequences, targets = [], []
    for _, context, continuation in requests:
      whole = (context + continuation)[-(self.max_length + 1) :]
      sequences.append(whole)
      targets.append([0] * (len(whole) - len(continuation)) + [1] * len(continuation))
    scores = scoring.score_targets(self.model, sequences, targets, batch_size=self.batch_size)
    out = [(float(lp), bool(g)) for lp, g in zip(scores.logprob, scores.greedy)]
    for (cache_key, _, _), result in zip(requests, out):
      if cache_key is not None:
        self.cache_hook.add_partial("loglikelihood", cache_key, result)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    from lm_eval import utils

    results = []
    for request in requests:
      (string,) = request.args
      windows = [
        utils.make_disjoint_window(w)
        for w in utils.get_rolling_token_windows(
          token_list=self.tok_encode(string),
          prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length,
          context_len=1,
        )
      ]
      scored = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
      total = sum(lp for lp, _ in scored)
      self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
      results.append(total)
    return results

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    from jaxtune.generation import generate_ids, stop_token_ids

    out = []
    for request in requests:
      context, kwargs = request.args
      kwargs = dict(kwargs or {})
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
      temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
      ids = self.tok_encode(context)[-(self.max_length - max_new) :]
      new = generate_ids(
        self.model, [ids], max_new_tokens=max_new, temperature=temperature, stop_ids=stop_token_ids(self.tokenizer)
      )[0]
      text = self.tokenizer.decode(new, skip_special_tokens=True)
      for stop in until:
        text = text.split(stop)[0] if stop else text
      self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
      out.append(text)
    return out

  def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    return self.tokenizer.apply_chat_template(
      chat_history,
      tokenize=False,
      add_generation_prompt=add_generation_prompt,
      continue_final_message=not add_generation_prompt,
    )


def run_tasks(
  loaded: Any,
  tasks: str,
  *,
  include_path: str | None = None,
  num_fewshot: int | None = None,
  apply_chat_template: bool = False,
  fewshot_as_multiturn: bool = False,
  limit: int | None = None,
  batch_size: int = 8,
) -> dict:
  """lm_eval.simple_evaluate on `loaded` (jaxtune.eval.run.Loaded) for comma-separated `tasks`: its results."""
  import lm_eval
  from lm_eval.tasks import TaskManager

  model = JaxtuneLM(loaded.model, loaded.tokenizer, batch_size=batch_size)
  results = lm_eval.simple_evaluate(
    model=model,
    tasks=[t.strip() for t in tasks.split(",") if t.strip()],
    num_fewshot=num_fewshot,
    task_manager=TaskManager(include_path=include_path) if include_path else None,
    apply_chat_template=apply_chat_template,
    fewshot_as_multiturn=fewshot_as_multiturn,
    limit=limit,
  )
  return {"results": results["results"], "source": loaded.source}
