"""A short fuzz (hypothesis) over valid shapes, strides, dtypes, p and scaling: every fused backend
against the float64 reference by the numerics rule (composite natively, triton through the
interpreter on the CPU). Small sizes, few examples, derandomized. Skipped without hypothesis (the
`test` extra); the bad-input tests it borrows its helpers from run without it."""
import pytest
import torch

from numerics import assert_close_to_oracle
from test_bad_input import FUSED, LAYOUTS, make, run

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_FUZZ_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def _problems(draw):
    dims = dict(M=draw(st.integers(0, 6)), K=draw(st.integers(1, 9)), N=draw(st.integers(1, 7)),
                R=draw(st.integers(1, 4)))
    return dict(dims=dims, dtype=draw(st.sampled_from(_FUZZ_DTYPES)), p=draw(st.sampled_from([0.0, 0.2, 0.5])),
                layout=draw(st.sampled_from(["contiguous"] + LAYOUTS)), bias=draw(st.booleans()),
                scaling=draw(st.floats(-4.0, 4.0, allow_nan=False, width=32)), seed=draw(st.integers(0, 2**63 - 1)),
                data_seed=draw(st.integers(0, 2**31 - 1)), wide_adapters=draw(st.booleans()))


@pytest.mark.parametrize("backend", FUSED)
@settings(max_examples=12, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(prob=_problems())
def test_fuzz_against_reference(backend, prob):
    t = make(torch.float32, prob["data_seed"], prob["bias"], **prob["dims"])
    dt = prob["dtype"]
    adt = torch.float32 if prob["wide_adapters"] else dt
    low = {k: None if v is None else v.to(adt if k in ("lora_A", "lora_B") else dt) for k, v in t.items()}
    grads = ("x", "lora_A", "lora_B") + (("bias",) if prob["bias"] else ())
    args = (prob["scaling"], prob["p"], prob["seed"], grads, prob["layout"])
    y, g = run(backend, low, *args)
    y64, g64 = run("reference", {k: None if v is None else v.double() for k, v in low.items()}, *args)
    y_same, g_same = run("reference", low, *args)
    assert y.dtype == dt and y.shape == y64.shape
    assert_close_to_oracle("y", y, y64, y_same)
    for k in grads:
        assert g[k].dtype == low[k].dtype
        assert_close_to_oracle(f"d{k}", g[k], g64[k], g_same[k])
