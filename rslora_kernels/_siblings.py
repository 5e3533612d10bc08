"""Finding sibling projections in any model, without per-model code (``peft.patch(fuse_siblings=True)``).

The LoRA layers that are children of one parent module (q/k/v/o_proj of an attention block,
gate/up/down_proj of an MLP) form a :class:`SiblingGroup`. Hooks on the parent mark the span of
its forward. Within one span the group records which members were called with the same tensor
(identity and ``_version``); at the end of the span that becomes what it has learned: members
called with one x, in call order (q, k, v; gate, up), the first of them the leader.

On the next span, when the leader is called with x, it computes the outputs of its learned
siblings too, with :func:`rslora_kernels.lora_linear_group`, and holds them for them. A sibling
called later in the span gets its held output only if it is called with that same tensor, at the
same version, in the same state (its adapter's tensors, scaling, dropout p, grad mode, autocast);
any mismatch -- a different tensor (a pre-hook that changed x, a backward hook's wrapper), a
disabled adapter, a merged layer, a train/eval change -- runs it alone (and it is learned anew at
the end of the span). The first span of a group runs every member alone. Outputs not handed out
are dropped when the parent's forward ends (its forward hook runs even when the forward raises),
so no output outlives the step that computed it.

Members that would take another path than the plain fused LoRA op (PEFT's forward, DoRA, a 4-bit
base) are left out of the group's computation and run alone.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .ops.group import lora_linear_group

__all__ = ["SiblingGroup"]


def _state_key(member: tuple) -> tuple:
    """What must not change between the leader's call and a sibling's for the held output to be
    the sibling's: its tensors (storage, layout, version), scaling, p, grad mode and autocast."""
    key = []
    for t in member:
        if isinstance(t, torch.Tensor):
            key.append((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t._version, t.requires_grad))
        else:
            key.append(t)
    dev = member[0].device.type
    key.append((torch.is_grad_enabled(), torch.is_autocast_enabled(dev),
                torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None))
    return tuple(key)


class SiblingGroup:
    """The patched LoRA layers under one parent module. ``member_of(layer, x)`` gives a layer's
    ``(weight, lora_A, lora_B, scaling, bias, p)`` for a plain fused call on x, or None."""

    def __init__(self, parent: nn.Module, layers: List[nn.Module], member_of: Callable, backend: str):
        self.layers = list(layers)
        self.member_of = member_of
        self.backend = backend
        self._active = False
        self._seen: List[Tuple[nn.Module, torch.Tensor, int]] = []  # this span's calls (x held until its end)
        self._learned: Dict[nn.Module, Tuple[nn.Module, ...]] = {}  # leader -> its siblings, leader first
        self._held: Dict[nn.Module, tuple] = {}  # sibling -> (x, version, state key, output)
        self._hooks = [parent.register_forward_pre_hook(self._begin),
                       parent.register_forward_hook(self._end, always_call=True)]

    def remove(self) -> None:
        """Take the hooks off the parent and forget everything held."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._seen, self._held, self._learned = [], {}, {}

    def _begin(self, module, args) -> None:
        self._seen, self._held = [], {}
        self._active = True

    def _end(self, module, args, output) -> None:
        by_x: Dict[Tuple[int, int], List[nn.Module]] = {}
        for layer, x, version in self._seen:  # x is held in _seen, so its id is not reused within the span
            members = by_x.setdefault((id(x), version), [])
            if layer not in members:
                members.append(layer)
        self._learned = {ms[0]: tuple(ms) for ms in by_x.values() if len(ms) > 1}
        self._seen, self._held = [], {}  # outputs not handed out die here
        self._active = False

    def output(self, layer: nn.Module, x: torch.Tensor, member: tuple) -> Optional[torch.Tensor]:
        """``layer``'s output for x if the group computes it (the leader) or holds it (a sibling
        called as learned); None: the caller runs the layer alone. ``member``: the layer's own
        ``(weight, lora_A, lora_B, scaling, bias, p)`` for this call."""
        if not self._active:  # called outside the parent's forward
            return None
        self._seen.append((layer, x, x._version))
        held = self._held.pop(layer, None)
        if held is not None:
            hx, version, key, y = held
            if hx is x and x._version == version and key == _state_key(member):
                return y
        siblings = self._learned.get(layer)
        if siblings is None:
            return None
        members = [(layer, member)]
        for sib in siblings[1:]:
            m = self.member_of(sib, x)
            if m is not None and m[0].shape[1] == x.shape[-1]:
                members.append((sib, m))
        if len(members) < 2:
            return None
        ws, As, Bs, ss, bs, ps = (list(col) for col in zip(*(m for _, m in members)))
        ys = lora_linear_group(x, ws, As, Bs, ss, bs, ps, training=True, backend=self.backend)
        for (sib, m), y in zip(members[1:], ys[1:]):
            self._held[sib] = (x, x._version, _state_key(m), y)
        return ys[0]
