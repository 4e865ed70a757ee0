"""Streamed generation: the tokens of the batched loop, one at a time, and text that never shows half a character."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jaxtune.generation import encode_prompts, generate_ids, stop_token_ids, stream_ids, stream_text


@pytest.mark.parametrize(
  "sampling",
  [dict(temperature=0.0), dict(temperature=0.9, top_k=40, top_p=0.95, seed=3)],
  ids=["greedy", "sampled"],
)
def test_stream_gives_the_tokens_of_generate_ids(tiny, sampling):
  model, tokenizer = tiny
  prompt = encode_prompts(tokenizer, ["What is the capital of France?"])[0]
  kwargs = dict(max_new_tokens=24, stop_ids=stop_token_ids(tokenizer), **sampling)
  want = generate_ids(model, [prompt], **kwargs)[0]
  assert list(stream_ids(model, prompt, **kwargs)) == want
  assert len(set(want)) > 3  # a real answer, not one token repeated
  # A stop token ends the stream and is its last token, as in generate_ids.
  stop = want[5]
  stopped = list(stream_ids(model, prompt, **{**kwargs, "stop_ids": [stop]}))
  assert stopped == want[: want.index(stop) + 1]


def byte_tokenizer() -> PreTrainedTokenizerFast:
  """One token per byte (GPT-2's byte-level alphabet, no merges): every non-ASCII character spans several tokens."""
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_text_chunks_hold_back_split_characters():
  tokenizer = byte_tokenizer()
  text = "Größe: 3 €, ok 😀!"
  ids = tokenizer(text)["input_ids"]
  assert len(ids) == len(text.encode())  # "€" is 3 tokens, "😀" 4
  assert "\ufffd" in tokenizer.decode(ids[:3])  # the naive stream would show a replacement character
  chunks = list(stream_text(tokenizer, ids, strip=False))
  assert "".join(chunks) == text
  assert not any("\ufffd" in c for c in chunks)
  assert "😀" in chunks and "€" in chunks  # each arrives whole, when its last byte does
  # Leading and trailing whitespace wait for something to follow, and are never shown when nothing does.
  assert "".join(stream_text(tokenizer, tokenizer("\n  hi there \n")["input_ids"])) == "hi there"
  # Bytes that never complete a character are shown at the end, as decode shows them.
  broken = ids[: text.index("😀") + 3 + 2]  # "... ok " and the emoji's first 2 bytes
  assert "".join(stream_text(tokenizer, broken, strip=False)) == tokenizer.decode(broken)
