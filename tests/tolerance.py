"""The one rule by which a test compares two float32 computations of the same math that sum in
different orders (world sizes, chunkings, attention kernels, packed chunks against a padded
reference, a loop against a tensor expression): gradients, losses and embeddings alike.

    max_i |actual_i - expected_i|  <=  TOL * max_i |expected_i|,   TOL = 1024 float32 eps ~ 1.2e-4

Its shape: reordering a float32 sum moves its rounding by an amount set by the magnitudes summed,
not by the result. An element whose terms cancel (a row of the embedding's gradient sums every
occurrence of its token, with both signs) keeps the absolute error of its large terms while its
own value is small, so an element-wise bound (rtol * |expected_i|) is decided by such elements,
and they depend on the CPU's kernels and blocking: one element of 65,536 passed on an AMD EPYC
and failed on an AMX Xeon. The tensor's largest magnitude stands for the magnitudes summed: the
same activations and upstream gradients feed every element of a tensor.

Its size: float32 keeps 24 bits (eps = 2**-23). A sum of n terms reordered moves by about
sqrt(n) eps of its terms' scale (rounding errors of either sign; n eps is the worst case), and a
gradient here sums at most ~10**6 terms along its longest path (tokens x width, a few layers
deep): sqrt(10**6) ~ 1024. A real bug is a factor or a lost term (a gradient without its
in-batch part, or scaled by the world size): 1e-2 to 1 of the scale, 100x above the bound.
"""
import torch

EPS = torch.finfo(torch.float32).eps  # 2**-23
TOL = 1024 * EPS  # ~1.2e-4 of the tensor's largest magnitude


def scaled_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (tensors or numbers; 0 when both are zero)."""
    a = torch.as_tensor(actual, dtype=torch.float64)
    e = torch.as_tensor(expected, dtype=torch.float64)
    assert a.shape == e.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}"
    diff, scale = (a - e).abs().max().item(), e.abs().max().item()
    return diff / scale if scale else (0.0 if diff == 0 else float("inf"))


def assert_same_sums(actual, expected, what: str = "") -> None:
    """actual == expected up to float32 reordering (the rule above), or a message with the size."""
    err = scaled_error(actual, expected)
    assert err <= TOL, (f"{what}: max |actual - expected| = {err:.2e} x max |expected|, "
                        f"above {TOL:.2e} (1024 float32 eps)")


def assert_same_grads(grads: dict, reference: dict, what: str = "") -> None:
    """Every tensor of `reference` (name -> tensor) against `grads[name]`, by the rule above."""
    for name, g in reference.items():
        assert_same_sums(grads[name], g, f"{what} {name}")
