"""Where the CPU train step's time goes: forward vs forward+backward of the bare model (no loss, no LoRA).

    JAX_PLATFORMS=cpu python -m bench.fwd_bwd_split

SmolLM2-135M shape, batch 4 x 256, float32; seconds per call (mean of 3 after one warm-up call).
The transformers side of the same measurement is in bench/NOTES.md.
"""
import time, jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jaxtune.models.config import from_hf_dict
from jaxtune.hf.load import init_model
hf = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0)
m = init_model(from_hf_dict(hf))
g, st = nnx.split(m)
ids = jnp.asarray(np.random.default_rng(0).integers(0, 49152, (4, 256)), jnp.int32)
@jax.jit
def hid(st, ids):
  return nnx.merge(g, st).hidden_states(ids)[0].sum()
@jax.jit
def hid_grad(st, ids):
  return jax.grad(lambda s: nnx.merge(g, s).hidden_states(ids)[0].sum())(st)
def main() -> None:
  for name, f in (("fwd hidden", hid), ("fwd+bwd hidden (all params)", hid_grad)):
    jax.block_until_ready(f(st, ids))
    t = time.time()
    for _ in range(3):
      jax.block_until_ready(f(st, ids))
    print(name, (time.time() - t) / 3)


if __name__ == "__main__":
  main()
