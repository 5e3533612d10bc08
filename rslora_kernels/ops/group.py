"""Sibling projections as one op: LoRA linears that read the same x (q/k/v, gate/up).

    y_i = x W_i^T + b_i + s_i (drop_i(x) A_i^T) B_i^T,      i = 0 .. n-1

Members may differ in N, r, scaling, dropout p, bias and adapter dtype; each has its own dropout
mask (PEFT gives each projection its own dropout module), drawn from the package's stream with
one seed per member (:func:`rslora_kernels.dropout_mask`). Contract and what is saved:
docs/group.md ("The op").

What the "composite" backend shares across the members, with vendor GEMMs:

    forward    T   = x [A_i ...]^T              ONE GEMM over the stacked ranks of the members
                                                 without dropout; a member with dropout: its own
                                                 drop_i(x) A_i^T (drop_i(x) a transient)
               y_i = addmm(b_i, x, W_i^T)        each member's base GEMM into its own output
                                                 (W never concatenated nor copied)
               y_i += s_i T_i B_i^T
    backward   U_i = dy_i B_i
               dx  = sum_i dy_i W_i + sum_i s_i/(1-p_i) m_i (U_i A_i)
                     ONE [M, K] buffer: the members without dropout contribute one GEMM
                     [U_i ...] [s_i A_i ...] over their stacked ranks, a member with dropout its
                     masked U_i A_i (one transient), then addmm_(dy_i, W_i) per member
               dA_i = s_i/(1-p_i) U_i^T (m_i x)  members without dropout: ONE GEMM [U_i ...]^T x
               dB_i = s_i dy_i^T T_i,  db_i = sum_M dy_i

The "triton" backend (:mod:`rslora_kernels.ops.group_kernels`, up to three members): ONE pass over
x for every member's T and mask (ranks up to 64), then ONE dual GEMM launch for every member's y; backward B1 per member, ONE dx launch reducing across
the members' N (each member's masked rank term included), ONE pass over x for every member's dA,
dB and db per member. Other backends run each member through
:func:`rslora_kernels.lora_linear` (the "reference" backend so: autograd over the oracle).

Saved for backward: x once for the group (a view where possible), T of all members as one
[M, sum r] tensor, and each member's mask state (the seed for "composite", the keep-bits for
"triton"), plus references to the weights and adapters.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._validate import need_tensors, validate_inputs
from ..dropout import dropout_scale, dropout_scale_, dropout_scale_pair_
from ..quant import is_quantized_weight
from ..scaling import fold_scaling
from .composite import addmm_scaled_
from .autotune import Problem
from .custom_op import custom_op
from .first_order import first_order_only
from .lora_linear import (autocast_inputs, lora_linear, registered_backends, resolve_backend,
                          resolve_backend_planned, seed_tensor)

__all__ = ["lora_linear_group", "LoRALinearGroupFunction", "lora_linear_group_fwd", "lora_linear_group_bwd",
           "GROUP_BACKENDS"]


def _offsets(ranks: Sequence[int]) -> List[int]:
    """[0, r_0, r_0 + r_1, ...]: where each member's columns start in the stacked T."""
    out = [0]
    for r in ranks:
        out.append(out[-1] + r)
    return out


def _stacked(parts: List[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


# ----------------------------------------------------------------------------------------------
# "composite": vendor GEMMs
# ----------------------------------------------------------------------------------------------
def composite_group_forward(x2d: Tensor, weights: List[Tensor], lora_As: List[Tensor], lora_Bs: List[Tensor],
                            biases: List[Optional[Tensor]], scalings: List[float], ps: List[float], seeds: Tensor):
    """Returns (ys [M, N_i] each, T [M, sum r_i] in x's dtype, mask states: a copy of each member's seed)."""
    dtype = x2d.dtype
    n = len(weights)
    ys = [torch.addmm(b, x2d, W.t()) if b is not None else torch.mm(x2d, W.t()) for W, b in zip(weights, biases)]
    plain = [i for i in range(n) if ps[i] == 0.0]
    Ts: List[Optional[Tensor]] = [None] * n
    if plain:  # one read of x for every member without dropout
        T_plain = torch.mm(x2d, _stacked([lora_As[i].to(dtype) for i in plain], 0).t())
        if len(plain) == n:
            T = T_plain
        else:
            offs = _offsets([lora_As[i].shape[0] for i in plain])
            for j, i in enumerate(plain):
                Ts[i] = T_plain[:, offs[j]:offs[j + 1]]
    for i in range(n):
        if ps[i] > 0.0:  # this member's dropped x dies right after its shrink
            Ts[i] = torch.mm(dropout_scale(x2d, seeds[i], ps[i], 1.0 / (1.0 - ps[i])), lora_As[i].to(dtype).t())
    if len(plain) < n:
        T = _stacked(Ts, 1)
    offs = _offsets([A.shape[0] for A in lora_As])
    for i in range(n):
        addmm_scaled_(ys[i], T[:, offs[i]:offs[i + 1]], lora_Bs[i].to(dtype).t(), scalings[i])  # NaN kept at s = 0
    return ys, T, [seeds[i].clone() for i in range(n)]


def composite_group_backward(dys: List[Tensor], x2d: Tensor, weights: List[Tensor], lora_As: List[Tensor],
                             lora_Bs: List[Tensor], T: Tensor, scalings: List[float], ps: List[float],
                             mask_states: List[Tensor], need_dx: bool, need_dAs: List[bool], need_dBs: List[bool],
                             need_dbs: List[bool]):
    """Returns (dx [M, K] | None, [dA_i | None], [dB_i | None], [db_i (at least fp32) | None])."""
    dtype = x2d.dtype
    n = len(weights)
    A = [a.to(dtype) for a in lora_As]
    U = [torch.mm(dys[i], lora_Bs[i].to(dtype)) if (need_dx or need_dAs[i]) else None for i in range(n)]
    dx = None
    dAs: List[Optional[Tensor]] = [None] * n
    for i in range(n):  # members with dropout: one mask generation serves the dx term and dA's dropped x
        if ps[i] == 0.0 or U[i] is None:
            continue
        scale, seed = scalings[i] / (1.0 - ps[i]), mask_states[i]
        dropped = None
        if need_dx:
            G = torch.mm(U[i], A[i])
            if need_dAs[i]:
                dropped = dropout_scale_pair_(G, scale, x2d, scale, seed, ps[i])
            else:
                dropout_scale_(G, seed, ps[i], scale)
            dx = G if dx is None else dx.add_(G)
        if need_dAs[i]:
            if dropped is None:
                dropped = dropout_scale(x2d, seed, ps[i], scale)
            dAs[i] = torch.mm(U[i].t(), dropped).to(lora_As[i].dtype)
    plain = [i for i in range(n) if ps[i] == 0.0 and U[i] is not None]
    U_plain = _stacked([U[i] for i in plain], 1) if plain else None  # [M, sum r] of the members without dropout
    if plain and need_dx:  # their rank terms: one GEMM, s_i on A's rows
        A_scaled = _stacked([(lora_As[i] * scalings[i]).to(dtype) for i in plain], 0)
        dx = torch.mm(U_plain, A_scaled) if dx is None else dx.addmm_(U_plain, A_scaled)
    plain_dA = [i for i in plain if need_dAs[i]]
    if plain_dA:  # one read of x for these members' dA; cast before scaling, as the single op does
        U_dA = U_plain if len(plain_dA) == len(plain) else _stacked([U[i] for i in plain_dA], 1)
        dA_all = torch.mm(U_dA.t(), x2d)
        offs = _offsets([lora_As[i].shape[0] for i in plain_dA])
        for j, i in enumerate(plain_dA):
            dAs[i] = dA_all[offs[j]:offs[j + 1]].to(lora_As[i].dtype, copy=True).mul_(scalings[i])
    if need_dx:  # every member's base term into the same buffer
        for i in range(n):
            dx = torch.mm(dys[i], weights[i]) if dx is None else dx.addmm_(dys[i], weights[i])
    offs = _offsets([a.shape[0] for a in lora_As])
    dBs = [torch.mm(dys[i].t(), T[:, offs[i]:offs[i + 1]]).to(lora_Bs[i].dtype).mul_(scalings[i])
           if need_dBs[i] else None for i in range(n)]
    dbs = [dys[i].sum(0, dtype=torch.promote_types(dtype, torch.float32)) if need_dbs[i] else None
           for i in range(n)]
    return dx, dAs, dBs, dbs


# ----------------------------------------------------------------------------------------------
# "triton": the group kernels (rslora_kernels.ops.group_kernels)
# ----------------------------------------------------------------------------------------------
def triton_group_forward(x2d, weights, lora_As, lora_Bs, biases, scalings, ps, seeds):
    from .group_kernels import group_forward

    return group_forward(x2d, weights, lora_As, lora_Bs, biases, scalings, ps, seeds)


def triton_group_backward(dys, x2d, weights, lora_As, lora_Bs, T, scalings, ps, mask_states,
                          need_dx, need_dAs, need_dBs, need_dbs):
    from .group_kernels import group_backward

    return group_backward(dys, x2d, weights, lora_As, lora_Bs, T, scalings, ps, mask_states,
                          need_dx, need_dAs, need_dBs, need_dbs)


# name -> (forward, backward): the backends with a group implementation
GROUP_BACKENDS: Dict[str, Tuple] = {
    "composite": (composite_group_forward, composite_group_backward),
    "triton": (triton_group_forward, triton_group_backward),
}


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------
@custom_op("rslora_kernels::lora_linear_group_fwd")
def lora_linear_group_fwd(x2d: Tensor, weights: List[Tensor], lora_As: List[Tensor], lora_Bs: List[Tensor],
                          biases: List[Optional[Tensor]], scalings: List[float], dropout_ps: List[float],
                          seeds: Tensor, backend: str) -> List[Tensor]:
    """Returns [y_0 .. y_{n-1}, T (all members' ranks stacked), mask_state_0 .. mask_state_{n-1}]."""
    ys, T, states = GROUP_BACKENDS[backend][0](x2d, list(weights), list(lora_As), list(lora_Bs), list(biases),
                                               list(scalings), list(dropout_ps), seeds)
    return [*ys, T, *states]


@lora_linear_group_fwd.register_fake
def _(x2d, weights, lora_As, lora_Bs, biases, scalings, dropout_ps, seeds, backend):
    M = x2d.shape[0]
    state_like = registered_backends()[backend].mask_state_like
    return [*(x2d.new_empty((M, W.shape[0])) for W in weights), x2d.new_empty((M, sum(A.shape[0] for A in lora_As))),
            *(state_like(x2d, seeds[i], p) for i, p in enumerate(dropout_ps))]


@custom_op("rslora_kernels::lora_linear_group_bwd")
def lora_linear_group_bwd(dys: List[Tensor], x2d: Tensor, weights: List[Tensor], lora_As: List[Tensor],
                          lora_Bs: List[Tensor], T: Tensor, scalings: List[float], dropout_ps: List[float],
                          mask_states: List[Tensor], needs: List[bool], backend: str) -> List[Tensor]:
    """``needs`` = [dx, dA_0.., dB_0.., db_0..]; returns [dx, dA_0.., dB_0.., db_0..], a grad that is
    not needed as an empty tensor."""
    n = len(weights)
    dx, dAs, dBs, dbs = GROUP_BACKENDS[backend][1](list(dys), x2d, list(weights), list(lora_As), list(lora_Bs), T,
                                                   list(scalings), list(dropout_ps), list(mask_states), needs[0],
                                                   needs[1:1 + n], needs[1 + n:1 + 2 * n], needs[1 + 2 * n:])
    return [g if g is not None else x2d.new_empty((0,)) for g in (dx, *dAs, *dBs, *dbs)]


@lora_linear_group_bwd.register_fake
def _(dys, x2d, weights, lora_As, lora_Bs, T, scalings, dropout_ps, mask_states, needs, backend):
    n = len(weights)
    db_dtype = torch.promote_types(x2d.dtype, torch.float32)
    shapes = ([(x2d, tuple(x2d.shape), None)] + [(A, tuple(A.shape), None) for A in lora_As]
              + [(B, tuple(B.shape), None) for B in lora_Bs] + [(x2d, (W.shape[0],), db_dtype) for W in weights])
    return [like.new_empty(shape, dtype=dt) if need else x2d.new_empty((0,))
            for need, (like, shape, dt) in zip(needs, shapes)]


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class LoRALinearGroupFunction(torch.autograd.Function):
    """Autograd glue of the group op: ``apply(x, (scalings, ps, backend, bias_dtypes), *weights, *lora_As,
    *lora_Bs, *biases, seeds)`` with n members, ``seeds`` an int64 tensor [n] on x's device, the
    inputs validated, ``backend`` a key of :data:`GROUP_BACKENDS`.

    Chain rule, member i with y_i = x W_i^T + b_i + s_i (drop_i(x) A_i^T) B_i^T, T_i = drop_i(x) A_i^T,
    m_i the keep-mask, U_i = dy_i B_i::

        dx   = sum_i [ dy_i W_i + s_i/(1-p_i) m_i * (U_i A_i) ]   (x feeds every member: grads add)
        dA_i = s_i/(1-p_i) U_i^T (m_i * x)
        dB_i = s_i dy_i^T T_i
        db_i = sum over rows of dy_i
        dW_i = dy_i^T x                                            (only when W_i requires grad)

    Double backward is not supported (:func:`~rslora_kernels.ops.first_order.first_order_only`): it raises."""

    @staticmethod
    def forward(ctx, x, meta, *tensors):
        scalings, ps, backend, bias_dtypes = meta
        n = len(scalings)
        weights, lora_As, lora_Bs = list(tensors[:n]), list(tensors[n:2 * n]), list(tensors[2 * n:3 * n])
        biases, seeds = list(tensors[3 * n:4 * n]), tensors[4 * n]
        M, K = math.prod(x.shape[:-1]), x.shape[-1]  # explicit M: reshape(-1, 0) is ambiguous when K = 0
        x2d = x.reshape(M, K)
        outs = lora_linear_group_fwd(x2d, weights, lora_As, lora_Bs, biases, list(scalings), list(ps), seeds, backend)
        ys, T, states = outs[:n], outs[n], outs[n + 1:]
        ctx.save_for_backward(x2d, T, *weights, *lora_As, *lora_Bs, *states)
        ctx.n, ctx.scalings, ctx.ps, ctx.backend, ctx.bias_dtypes = n, list(scalings), list(ps), backend, bias_dtypes
        ctx.x_shape = x.shape
        return tuple(y.view(*x.shape[:-1], y.shape[1]) for y in ys)

    @staticmethod
    @first_order_only
    def backward(ctx, *dys):
        n = ctx.n
        x2d, T, *rest = ctx.saved_tensors
        weights, lora_As, lora_Bs, states = rest[:n], rest[n:2 * n], rest[2 * n:3 * n], rest[3 * n:]
        needs = ctx.needs_input_grad  # (x, meta, weights.., As.., Bs.., biases.., seeds)
        need_x = needs[0]
        need_w, need_a, need_b = needs[2:2 + n], needs[2 + n:2 + 2 * n], needs[2 + 2 * n:2 + 3 * n]
        need_bias = [nb and dt is not None for nb, dt in zip(needs[2 + 3 * n:2 + 4 * n], ctx.bias_dtypes)]
        M = x2d.shape[0]
        # unused outputs arrive as zeros (autograd materializes them): every member has its dy
        dy2d = [dy.reshape(M, W.shape[0]) for dy, W in zip(dys, weights)]
        grads = lora_linear_group_bwd(dy2d, x2d, list(weights), list(lora_As), list(lora_Bs), T, ctx.scalings, ctx.ps,
                                      list(states), [need_x, *need_a, *need_b, *need_bias], ctx.backend)
        dx, dAs, dBs, dbs = grads[0], grads[1:1 + n], grads[1 + n:1 + 2 * n], grads[1 + 2 * n:]
        dWs = [dy2d[i].t() @ x2d if need_w[i] else None for i in range(n)]
        return (dx.view(ctx.x_shape) if need_x else None, None, *dWs,
                *(dAs[i] if need_a[i] else None for i in range(n)),
                *(dBs[i] if need_b[i] else None for i in range(n)),
                *(dbs[i].to(ctx.bias_dtypes[i]) if need_bias[i] else None for i in range(n)), None)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
_RENAMES = (("weight", "weights"), ("lora_A", "lora_As"), ("lora_B", "lora_Bs"), ("bias", "biases"),
            ("scaling", "scalings"), ("dropout_p", "dropout_ps"))


def _member_error(e: Exception, i: int) -> Exception:
    """The single op's validation message with its argument names as the group's (``weights[1]``)."""
    msg = str(e)
    for single, group in _RENAMES:
        msg = re.sub(rf"\b{single}\b", f"{group}[{i}]", msg)
    return type(e)(msg)


def _per_member(name: str, value, n: int, default=None) -> list:
    """A per-member argument as a list of n: a sequence of length n, or (for dropout_ps, scalings,
    seeds) one value for every member."""
    if value is None:
        return [default] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must have one entry per member ({n}, the length of weights), got {len(value)}")
        return list(value)
    if isinstance(value, Tensor) and name != "seeds" and not (name == "scalings" and value.dim() == 0):
        raise TypeError(f"{name} must be a list or tuple with one entry per member, got a tensor")
    if name in ("scalings", "dropout_ps"):
        return [value] * n
    raise TypeError(f"{name} must be a list or tuple with one entry per member, got {type(value).__name__}")


def lora_linear_group(x: Tensor, weights: Sequence[Tensor], lora_As: Sequence[Tensor], lora_Bs: Sequence[Tensor],
                      scalings: Union[float, Sequence[float]], biases: Optional[Sequence[Optional[Tensor]]] = None,
                      dropout_ps: Union[float, Sequence[float]] = 0.0, training: bool = True,
                      seeds: Optional[Sequence[Union[int, Tensor, None]]] = None, backend: str = "auto"
                      ) -> Tuple[Tensor, ...]:
    """n LoRA linears on the same x as one op: ``y_i = x W_i^T + b_i + s_i (drop_i(x) A_i^T) B_i^T``.

    Equal, member by member, to ``rk.lora_linear(x, weights[i], lora_As[i], lora_Bs[i], scalings[i],
    biases[i], dropout_ps[i], training, seeds[i], backend)`` (the same contract per member; see the
    module docstring for what the members share).

    Args:
        x: ``[..., K]``, read by every member.
        weights, lora_As, lora_Bs: sequences of n >= 1 tensors, ``[N_i, K]``, ``[r_i, K]``, ``[N_i, r_i]``.
        scalings: one float or 0-d tensor per member (or one for all); a tensor is folded into
            its member's B as in :func:`rslora_kernels.lora_linear`.
        biases: None, or one ``[N_i]`` tensor or None per member.
        dropout_ps: one probability per member (or one for all); ignored when ``training=False``.
        seeds: None (each member with dropout draws its seed from torch's default generator, in
            member order: the seeds ``rk.lora_linear`` would draw for the members called one after
            the other), or one seed (int, 0-dim int64 tensor or None) per member. Member i's mask
            is ``rk.dropout_mask(seed_i, x.shape, dropout_ps[i])``.
        backend: "auto", "composite" or "triton" run the group op; any other registered backend
            ("reference", one added with ``register_backend``) runs each member through
            ``rk.lora_linear``.

    Returns:
        a tuple of n tensors ``[..., N_i]`` in x's dtype (the autocast dtype under ``torch.autocast``).
    """
    for name, seq in (("weights", weights), ("lora_As", lora_As), ("lora_Bs", lora_Bs)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(seq).__name__}")
    n = len(weights)
    if n == 0:
        raise ValueError("weights must hold at least one member, got an empty sequence")
    for name, seq in (("lora_As", lora_As), ("lora_Bs", lora_Bs)):
        if len(seq) != n:
            raise ValueError(f"{name} must have one entry per member ({n}, the length of weights), got {len(seq)}")
    need_tensors(("x", x))  # before autocast reads x.device
    biases = _per_member("biases", biases, n)
    scalings = _per_member("scalings", scalings, n)
    dropout_ps = _per_member("dropout_ps", dropout_ps, n)
    seeds = _per_member("seeds", seeds, n)
    members = []
    for i in range(n):
        if is_quantized_weight(weights[i]):
            raise TypeError(f"weights[{i}] is a 4-bit weight; lora_linear_group takes float weights "
                            "(run a 4-bit member with rk.lora_linear)")
        try:
            need_tensors(("weight", weights[i]), ("lora_A", lora_As[i]), ("lora_B", lora_Bs[i]), ("bias", biases[i]))
            # a 0-d tensor scaling is folded into this member's B (the kernels take floats)
            A, B, scalings[i] = fold_scaling(scalings[i], x, lora_As[i], lora_Bs[i])
            xi, W, A, B, b = autocast_inputs(x, weights[i], A, B, biases[i])
            validate_inputs(xi, W, A, B, b, scalings[i], dropout_ps[i])
        except (TypeError, ValueError) as e:
            raise _member_error(e, i) from None
        members.append((W, A, B, b))
    x = autocast_inputs(x, weights[0], lora_As[0], lora_Bs[0], None)[0]
    weights, lora_As, lora_Bs, biases = (list(t) for t in zip(*members))
    M, K = math.prod(x.shape[:-1]), x.shape[-1]
    # "auto" once for the whole group (its stacked N, its largest rank), then every member's adapter dtype checked
    name = resolve_backend_planned(backend, x.device, x.dtype, lora_As[0].dtype, Problem(
        M, sum(W.shape[0] for W in weights), K, max(A.shape[0] for A in lora_As), "group",
        max(float(p) for p in dropout_ps), any(b is not None for b in biases)))
    for i, A in enumerate(lora_As):
        try:
            resolve_backend(name, x.device, x.dtype, A.dtype)
        except TypeError as e:
            raise TypeError(f"lora_As[{i}]/lora_Bs[{i}]: {e}") from None
    scalings = [float(s) for s in scalings]
    ps = [float(p) if training else 0.0 for p in dropout_ps]
    seed_list = []
    for i in range(n):
        try:
            seed_list.append(seed_tensor(seeds[i], ps[i], x.device))
        except (TypeError, ValueError) as e:
            raise type(e)(f"seeds[{i}]: {e}") from None
    if name not in GROUP_BACKENDS:
        return tuple(lora_linear(x, weights[i], lora_As[i], lora_Bs[i], scalings[i], biases[i], ps[i], True,
                                 seed_list[i], name) for i in range(n))
    meta = (tuple(scalings), tuple(ps), name, tuple(b.dtype if b is not None else None for b in biases))
    return LoRALinearGroupFunction.apply(x, meta, *weights, *lora_As, *lora_Bs, *biases, torch.stack(seed_list))
