"""Reading traced programs in tests."""

import jax
import jax.extend


def dot_result_types(fn, *args) -> set[str]:
  """The result dtypes of every dot_general in fn's jaxpr at args, nested jaxprs (custom VJPs, scans) included."""
  found = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.add(str(eqn.outvars[0].aval.dtype))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found
