"""The project's numerics rule (docs/design.md, Numerics rule): the one comparison every test uses.

A result passes when

    err(result) <= 2 * err(PyTorch doing the same math in the same dtype) + floor

both errors measured as the max abs difference against a float64 oracle. ``floor`` scales with the
result's size: 4 units of the result dtype's epsilon at the oracle's largest magnitude. Each result
goes through a chain of about four roundings (stored intermediate, product, scale, store), so on
tiny problems both implementations sit within a few ulps of the oracle and the ratio alone would
compare noise. NaN (or inf where the oracle is finite) never passes.

Results that must be bit-identical (the same kernels run twice, a cast, a copy) are compared with
``torch.equal`` instead: any tolerance there would hide a bug.
"""
import torch

__all__ = ["assert_close_to_oracle", "max_abs_err", "bound"]

WORST_SHOWN = 5  # elements listed in a failure message


def max_abs_err(t: torch.Tensor, oracle: torch.Tensor) -> float:
    """max |t - oracle| in float64 (0 for an empty tensor; NaN if t has a NaN)."""
    if t.numel() == 0:
        return 0.0
    return (t.detach().double() - oracle.detach().double()).abs().max().item()


def bound(got_dtype: torch.dtype, oracle: torch.Tensor, same_dtype: torch.Tensor) -> float:
    """The largest error the rule allows a result of ``got_dtype``."""
    eps = torch.finfo(got_dtype).eps
    floor = 4 * eps * max(oracle.detach().double().abs().max().item(), 1e-30)
    return 2 * max_abs_err(same_dtype, oracle) + floor


def assert_close_to_oracle(name: str, got: torch.Tensor, oracle: torch.Tensor, same_dtype: torch.Tensor) -> None:
    """Assert the rule for ``got`` against the float64 ``oracle``, with ``same_dtype`` the result of
    PyTorch doing the same math in ``got``'s dtype. On failure the message names the worst elements
    (index, got, oracle, PyTorch's value) and the bound."""
    assert got.shape == oracle.shape, f"{name}: shape {tuple(got.shape)} != oracle's {tuple(oracle.shape)}"
    assert same_dtype.shape == oracle.shape, f"{name}: same-dtype result has shape {tuple(same_dtype.shape)}"
    assert oracle.dtype == torch.float64, f"{name}: the oracle must be float64, got {oracle.dtype} (test bug)"
    assert torch.isfinite(oracle).all(), f"{name}: oracle not finite (test bug)"
    assert not torch.isnan(same_dtype).any(), f"{name}: NaN in the same-dtype PyTorch result (test bug)"
    if got.numel() == 0:
        return
    limit = bound(got.dtype, oracle, same_dtype)
    diff = (got.detach().double() - oracle.detach()).abs()
    bad = diff.isnan() | (diff > limit)
    if not bad.any():
        return
    # NaN first, then the largest errors
    order = torch.where(diff.isnan(), torch.full_like(diff, float("inf")), diff).flatten().argsort(descending=True)
    lines = []
    for flat in order[:WORST_SHOWN].tolist():
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), got.shape)) if got.dim() else ()
        lines.append(f"  at {idx}: got {got[idx].item():.8g}, oracle {oracle[idx].item():.8g}, "
                     f"torch same-dtype {same_dtype[idx].item():.8g}, |err| {diff[idx].item():.3e}")
    raise AssertionError(
        f"{name}: {int(bad.sum())} of {got.numel()} elements exceed the bound {limit:.3e} "
        f"(2 * torch same-dtype err {max_abs_err(same_dtype, oracle):.3e} + floor; {got.dtype}); worst:\n"
        + "\n".join(lines))
