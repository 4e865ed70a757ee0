"""Special tokens of the supported checkpoints' chat templates (no jax: the GGUF converter reads it too)."""

# Tokens that end an assistant turn in the chat templates of the supported families; generation stops
# at them and exports list those in the vocabulary among the EOS ids.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
