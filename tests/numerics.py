"""The project's numerics rule (docs/design.md, Numerics rule): the one comparison every test uses.

A result passes when

    err(result) <= 2 * err(PyTorch doing the same math in the same dtype) + floor

both errors measured as the max abs difference against a float64 oracle. ``floor`` scales with the
result's size: 4 units of the result dtype's epsilon at the oracle's largest magnitude. Each result
goes through a chain of about four roundings (stored intermediate, product, scale, store), so on
tiny problems both implementations sit within a few ulps of the oracle and the ratio alone would
compare noise. NaN (or inf where the oracle is finite) never passes.

The rule itself lives in the package (``rslora_kernels/selfcheck.py``), shared with
``python -m rslora_kernels.verify`` and the first-use check of ``auto``; this module turns it into
test assertions.

Results that must be bit-identical (the same kernels run twice, a cast, a copy) are compared with
``torch.equal`` instead: any tolerance there would hide a bug.
"""
import torch

from rslora_kernels.selfcheck import compare, error_bound, max_abs_err, worst_elements

__all__ = ["assert_close_to_oracle", "assert_same_nonfinite_and_close", "max_abs_err", "bound"]

WORST_SHOWN = 5  # elements listed in a failure message

bound = error_bound  # the rule's bound: the package's one implementation (rslora_kernels/selfcheck.py)


def assert_close_to_oracle(name: str, got, oracle, same_dtype) -> None:
    """Assert the rule for ``got`` against the float64 ``oracle``, with ``same_dtype`` the result of
    PyTorch doing the same math in ``got``'s dtype. On failure the message names the worst elements
    (index, got, oracle, PyTorch's value) and the bound."""
    assert got.shape == oracle.shape, f"{name}: shape {tuple(got.shape)} != oracle's {tuple(oracle.shape)}"
    try:
        result = compare(name, got, oracle, same_dtype)
    except ValueError as e:  # an unusable oracle or same-dtype result
        raise AssertionError(f"{e} (test bug)") from None
    if result.ok:
        return
    lines = worst_elements(got, oracle, same_dtype, result.bound, WORST_SHOWN)
    bad = int(((got.detach().double() - oracle.detach().double()).abs() > result.bound).sum()
              + got.detach().isnan().sum())
    raise AssertionError(
        f"{name}: {bad} of {got.numel()} elements exceed the bound {result.bound:.3e} "
        f"(2 * torch same-dtype err {max_abs_err(same_dtype, oracle):.3e} + floor; {got.dtype}); worst:\n"
        + "\n".join("  " + line for line in lines))


def assert_same_nonfinite_and_close(name: str, got: torch.Tensor, oracle: torch.Tensor, same_dtype: torch.Tensor) -> None:
    """For inputs holding NaN or Inf: NaN, +Inf and -Inf in ``got`` exactly where the float64
    ``oracle`` has them; the finite entries by the rule (:func:`assert_close_to_oracle`)."""
    assert got.shape == oracle.shape, f"{name}: shape {tuple(got.shape)} != oracle's {tuple(oracle.shape)}"
    for what, test in [("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)]:
        g, o = test(got.detach()).cpu(), test(oracle.detach()).cpu()
        assert torch.equal(g, o), (f"{name}: {what} at {g.nonzero().tolist()[:6]} (got) "
                                   f"vs {o.nonzero().tolist()[:6]} (reference)")
    finite = torch.isfinite(oracle.detach()).cpu()
    assert_close_to_oracle(name, got.detach().cpu()[finite], oracle.detach().cpu()[finite],
                           same_dtype.detach().cpu()[finite])
