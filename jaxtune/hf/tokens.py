"""Special tokens of the supported checkpoints' chat templates (no jax: the GGUF converter reads it too)."""

from typing import Any

# Tokens that end an assistant turn in the chat templates of the supported families; generation stops
# at them and exports list those in the vocabulary among the EOS ids.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def pad_id(tokenizer: Any) -> int:
  """The pad token a reward model pools by and its export's config names: the tokenizer's, else its EOS.

  transformers' *ForSequenceClassification scores each sequence at its last token that is not
  this id, so training and the export must agree on it.
  """
  pad = tokenizer.pad_token_id
  return int(pad if pad is not None else tokenizer.eos_token_id)
