"""The per-tensor kernels against mergekit's own, on the edge cases a checkpoint rarely shows."""

import numpy as np
import pytest

from jaxtune.merge import methods


@pytest.mark.parametrize(
  "case",
  ["random", "equal", "antipodal", "nearly_parallel", "zero", "one_element", "empty"],
)
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_kernel_matches_mergekit(case, t):
  import torch
  from mergekit.merge_methods.slerp import slerp

  rng = np.random.default_rng(0)
  a = rng.standard_normal((6, 5)).astype(np.float32)
  b = {
    "random": rng.standard_normal((6, 5)),
    "equal": a,
    "antipodal": -2 * a,
    "nearly_parallel": a + 1e-3 * rng.standard_normal((6, 5)),
    "zero": np.zeros((6, 5)),
    "one_element": None,
    "empty": None,
  }[case]
  if case == "one_element":
    a, b = np.float32([[2.0]]), np.float32([[-3.0]])
  if case == "empty":
    a, b = np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32)
  b = np.asarray(b, np.float32)
  # mergekit's kernel batches outputs on a leading axis: one output here.
  want = slerp(torch.tensor([t]), torch.from_numpy(a)[None], torch.from_numpy(b)[None])[0].numpy()
  np.testing.assert_allclose(methods.slerp(t, a, b), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 1.0])
@pytest.mark.parametrize("rescale", [False, True])
def test_magnitude_kernel_matches_mergekit(density, rescale):
  import torch
  from mergekit.sparsify import RescaleNorm, magnitude

  delta = np.random.default_rng(1).standard_normal((7, 9)).astype(np.float32)
  want = magnitude(torch.from_numpy(delta), density, RescaleNorm.l1 if rescale else None).numpy()
  np.testing.assert_allclose(methods.magnitude(delta, density, rescale), want, rtol=1e-6, atol=1e-7)
