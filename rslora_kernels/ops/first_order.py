"""First-order-only backward for the fused autograd Functions (LoRA, DoRA, QLoRA, the group op).

Their backward runs custom ops that autograd cannot see through, so it has no derivative of its
own. ``torch.autograd.function.once_differentiable`` is not enough: it ties its error to the
incoming grad only, so with ``dy`` a constant (``y.sum()``) a second ``autograd.grad`` towards x,
A or B finds no path and returns ``None`` -- a silently wrong second derivative. Under
``create_graph=True``, :func:`first_order_only` routes every grad through a node whose inputs
are the incoming grads and the saved tensors that require grad (x, W, A, B, ...), so any second
derivative through the backward reaches it and raises, naming the way out.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["first_order_only", "DOUBLE_BACKWARD_ERROR"]

DOUBLE_BACKWARD_ERROR = ("rslora_kernels: the fused LoRA/DoRA/QLoRA/group backward is first-order only (no double "
                         "backward); for second derivatives use backend='reference'")


class _NoDerivative(torch.autograd.Function):
    """``forward(n, *tensors)`` returns aliases of the first ``n`` tensors; the rest only connect
    the node to the graph. Its backward raises :data:`DOUBLE_BACKWARD_ERROR`."""

    @staticmethod
    def forward(ctx, n, *tensors):
        return tuple(t.detach() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def first_order_only(backward):
    """Decorate an autograd Function's ``backward`` (see the module docstring): it runs without
    building a graph; under ``create_graph=True`` a second derivative through it raises."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():  # the usual backward (create_graph=False): autograd turned grad mode off
            return backward(ctx, *grads)
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        anchors = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
        present = [i for i, t in enumerate(outputs) if isinstance(t, torch.Tensor)]
        if not anchors or not present:  # nothing upstream requires grad: no second derivative exists
            return outputs
        aliases = _NoDerivative.apply(len(present), *(outputs[i] for i in present), *anchors)
        outputs = list(outputs)
        for i, t in zip(present, aliases):
            outputs[i] = t
        return tuple(outputs)

    return wrapper
