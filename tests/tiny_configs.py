"""Every tiny Hugging Face model config the tests use, in one place (plain dicts: nothing imported).

The sizes are part of the tests' assertions (shapes, divisibility by mesh axes, vocab ranges of the batches): change
one only together with the tests that use it. `pyproject.toml` puts tests/ on pytest's path; scripts the tests run
insert it themselves.
"""

# One tiny model per supported family (tiny_hf.build saves it with transformers): COMMON, then FAMILIES[family].
COMMON = dict(
  vocab_size=128,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=3,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=256,
  bos_token_id=1,
  eos_token_id=2,
  pad_token_id=0,
)

# family -> config overrides: each one exercises the family's distinctive features.
FAMILIES = {
  # Llama 3.1/3.2: llama3 rope scaling and head_dim != hidden/heads.
  "llama": dict(
    model_type="llama",
    head_dim=24,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    rope_parameters=dict(
      rope_type="llama3",
      rope_theta=500000.0,
      factor=8.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=64,
    ),
  ),
  "mistral": dict(model_type="mistral", sliding_window=8, tie_word_embeddings=False),
  "qwen2": dict(
    model_type="qwen2", tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1000000.0)
  ),
  "qwen3": dict(model_type="qwen3", head_dim=32, tie_word_embeddings=True),
  "gemma": dict(model_type="gemma", head_dim=16, num_key_value_heads=1),
  "gemma2": dict(
    model_type="gemma2",
    head_dim=16,
    sliding_window=8,
    query_pre_attn_scalar=24,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
  ),
  "gemma3_text": dict(
    model_type="gemma3_text",
    head_dim=16,
    sliding_window=8,
    query_pre_attn_scalar=16,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    rope_parameters={
      "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),
      "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
    },
  ),
}
SLIDING = {"mistral", "gemma2", "gemma3_text"}

# The tiny Llama of the train-step, LoRA and parallel tests (one config: their compiles are shared).
# Divisible by 8 (fsdp) and 2 (tensor) where the sharding rules split; head_dim 24 (!= hidden / heads) is never split.
LLAMA = dict(
  model_type="llama",
  vocab_size=128,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=24,
)
# The same with its own lm_head: the sharded-loader tests read both matrices.
LLAMA_UNTIED = {**LLAMA, "tie_word_embeddings": False}

# Gemma 2 for the packed-loss tests: softcaps, and a sliding window (6) shorter than the packed rows.
GEMMA2_WINDOW6 = dict(
  model_type="gemma2",
  vocab_size=96,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
  sliding_window=6,
)

# Any family (the test sets model_type), untied, head_dim 12 != hidden / heads: the weight table's layouts.
ANY_FAMILY_UNTIED = dict(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=12,
  tie_word_embeddings=False,
)

# The export tests' tied Llama with a real byte-level tokenizer: vocab_size and the special token ids come from the
# tokenizer (export_helpers.write_tiny_llama).
LLAMA_TIED_CHAT = dict(
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=512,
  rms_norm_eps=1e-5,
  tie_word_embeddings=True,
  rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
)

# Quantised bases (NF4 blocks of 64 run along each weight's innermost input axis: embed, head_dim, mlp): sizes
# that 64 divides, also after 8-way FSDP (512 / 8) and 2-way tensor parallelism (256 / 2) split them.
QUANT_SIZES = dict(hidden_size=512, intermediate_size=256, head_dim=64, num_attention_heads=4, num_key_value_heads=2)
QUANT_FAMILIES = ("llama", "qwen2", "gemma2")
