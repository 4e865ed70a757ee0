"""Dynamic loss scaling for float16 training: the loss is multiplied by a power of two so that small gradients
stay representable in float16's backward pass, and the gradients are divided by it again in float32.

float16 has 5 exponent bits: a gradient below 6e-8 is zero and one below 6e-5 loses precision,
and LLM activation gradients sit there (bfloat16, with float32's exponent range, never needs this).
The scale follows `torch.amp.GradScaler`: it starts at 2**15, halves on every step whose gradients
overflow (that step is skipped, as every non-finite step is), and doubles after `growth_interval`
finite steps in a row. Powers of two make the multiply and the divide exact: scaling adds no
rounding of its own. The scale and its counter live in the TrainState: checkpointed, so a
resumed run continues bit for bit.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

INIT_SCALE = 2.0**15
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
MIN_SCALE = 1.0  # never scale the loss down: below 1 the scaling would cause underflow instead of curing it
MODES = ("auto", "dynamic", "none")


@flax.struct.dataclass
class LossScale:
  """The current scale and the finite steps since it last changed (both checkpointed)."""

  scale: jax.Array  # float32, a power of two
  good_steps: jax.Array  # int32
  growth_interval: int = flax.struct.field(pytree_node=False, default=2000)

  @classmethod
  def create(cls, growth_interval: int = 2000, scale: float = INIT_SCALE) -> "LossScale":
    return cls(jnp.asarray(scale, jnp.float32), jnp.zeros((), jnp.int32), growth_interval)

  def unscale(self, tree: Any) -> Any:
    """Divides every float32 leaf (gradients, summed loss) by the scale: exact, a power of two."""
    inverse = 1.0 / self.scale
    return jax.tree.map(lambda x: x * inverse, tree)

  def adjust(self, finite: jax.Array) -> "LossScale":
    """The scale for the next step: halved after an overflow, doubled after growth_interval finite steps."""
    good = jnp.where(finite, self.good_steps + 1, 0)
    grow = good >= self.growth_interval
    scale = jnp.where(
      finite,
      jnp.where(grow, self.scale * GROWTH_FACTOR, self.scale),
      jnp.maximum(self.scale * BACKOFF_FACTOR, MIN_SCALE),
    )
    scale = jnp.where(jnp.isfinite(scale), scale, self.scale)  # growth past float32's range: stay
    return self.replace(scale=scale.astype(jnp.float32), good_steps=jnp.where(grow, 0, good).astype(jnp.int32))


def active(mode: str, dtype: str) -> bool:
  """Whether a run with train.loss_scale=`mode` and model.dtype=`dtype` scales its loss (auto: float16 only)."""
  return mode == "dynamic" or (mode == "auto" and dtype == "float16")
