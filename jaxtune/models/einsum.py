"""The einsum of a Linear layer, parsed once: which letters are contracted, kept and produced.

Every weight product of the model is written `x,w->y` ("BTD,DNH->BTNH" for q): the kernel's
letters that also index x are contracted (its inputs), the rest are its outputs, and x's
letters that the kernel lacks are carried through (batch, positions). Adapters derive their
factor shapes from this, and the merge of an adapter back into the kernel too.
"""

from __future__ import annotations

import dataclasses
import functools


@dataclasses.dataclass(frozen=True)
class LinearEinsum:
  """A parsed `x,w->y` einsum of one Linear."""

  x: str
  w: str
  y: str

  @property
  def ins(self) -> str:
    """The kernel's letters contracted with x, in kernel order."""
    return "".join(c for c in self.w if c in self.x)

  @property
  def outs(self) -> str:
    """The kernel's letters that reach the output, in kernel order."""
    return "".join(c for c in self.w if c not in self.x)

  @property
  def batch(self) -> str:
    """x's letters the kernel lacks (batch, positions), in x order."""
    return "".join(c for c in self.x if c not in self.w)

  @property
  def flat(self) -> bool:
    """True when the product is one [M, I] x [I, O] matmul after reshapes that move no data.

    That is x [batch..., in...] . w [in..., out...] -> y [batch..., out...], every Linear of models/.
    """
    return (
      bool(self.ins)
      and self.w == self.ins + self.outs
      and self.x == self.batch + self.ins
      and (self.y == self.batch + self.outs)
    )

  def free_letters(self, n: int) -> str:
    """n letters this einsum does not use (for stack and rank axes)."""
    used = self.x + self.w + self.y
    return "".join([c for c in _LETTERS if c not in used][:n])


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@functools.lru_cache(maxsize=None)
def parse(spec: str) -> LinearEinsum:
  """LinearEinsum of "x,w->y"; ValueError for anything else."""
  try:
    x, rest = spec.replace(" ", "").split(",")
    w, y = rest.split("->")
  except ValueError:
    raise ValueError(f"einsum {spec!r} is not of the form 'x,w->y'.") from None
  return LinearEinsum(x, w, y)
