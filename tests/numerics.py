"""The tolerance rule of DESIGN.md §5.

A result passes when ``err(kernel) <= 2 * err(torch in the same dtype) + floor``, both errors measured
as the max abs difference against a float64 oracle; ``floor`` is one unit of the dtype's epsilon at
the oracle's magnitude times 4: each result goes through a chain of about four roundings (stored
intermediate, product, scale, store), so on tiny problems both implementations sit within a few ulps
of the oracle and the ratio alone would compare noise. NaN never passes.
"""
import torch


def max_abs_err(t: torch.Tensor, oracle: torch.Tensor) -> float:
    if t.numel() == 0:
        return 0.0
    return (t.detach().double() - oracle.detach().double()).abs().max().item()


def assert_close_to_oracle(name: str, got: torch.Tensor, oracle: torch.Tensor, same_dtype: torch.Tensor) -> None:
    assert got.shape == oracle.shape, f"{name}: shape {tuple(got.shape)} != {tuple(oracle.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in result"
    assert torch.isfinite(oracle).all(), f"{name}: oracle not finite (test bug)"
    if got.numel() == 0:
        return
    eps = torch.finfo(got.dtype).eps
    floor = 4 * eps * max(oracle.abs().max().item(), 1e-30)
    err, err_torch = max_abs_err(got, oracle), max_abs_err(same_dtype, oracle)
    assert err <= 2 * err_torch + floor, (
        f"{name}: err {err:.3e} > 2 * torch same-dtype err {err_torch:.3e} + floor {floor:.3e}")
