"""Finding sibling projections in any model, without per-model code (``peft.patch(fuse_siblings=True)``).

The LoRA layers that are children of one parent module (q/k/v/o_proj of an attention block,
gate/up/down_proj of an MLP) form a :class:`SiblingGroup`. Hooks on the parent mark the span of
its forward. Parents of one kind (the same class, the same patched child names) share what is
learned: the first of them in the model's module order (layer 0's attention, layer 0's MLP) is the
kind's learner. In each of its spans the learner runs its members alone and records which of them
were called with the same tensor (identity and ``_version``); at the end of the span that becomes
the kind's pattern: members called with one x, in call order (q, k, v; gate, up), the first of them
the leader.

In the other parents of the kind, when the leader is called with x, it computes the outputs of its
siblings in the pattern too, with :func:`rslora_kernels.lora_linear_group`, and holds them for them.
A sibling called later in the span gets its held output only if it is called with that same
tensor, at the same version, in the same state (its adapter's tensors, scaling, dropout p, grad
mode, autocast); any mismatch -- a different tensor (a pre-hook that changed x, a backward hook's
wrapper), a disabled adapter, a merged layer, a train/eval change -- runs it alone. Outputs not
handed out are dropped when the parent's forward ends (its forward hook runs even when the forward
raises), so no output outlives the step that computed it.

Why the learner learns afresh in every forward and never runs grouped itself: which layers run as
one group then depends only on the current forward (the learner runs before the other parents of
its kind), never on what ran before. A model rebuilt from a checkpoint therefore groups its first
step exactly as the uninterrupted run groups the same step, and a resumed run is bit-exact. Were
the pattern learned once and kept, the rebuilt model's first step would run members alone where
the uninterrupted run groups them, and the group is not bit-equal to its members (other GEMM
shapes, dx summed in another order), so the weights would drift apart in the last bits.

Members that would take another path than the plain fused LoRA op (PEFT's forward, DoRA, a 4-bit
base) are left out of the group's computation and run alone.
"""
from __future__ import annotations

import weakref
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


class _Kind:
    """What the parents of one kind share: the learner (the first group made) and its pattern,
    leader name -> the names of the members called with the leader's x, leader first."""

    def __init__(self, learner: "SiblingGroup"):
        self.learner = learner
        self.pattern: Dict[str, Tuple[str, ...]] = {}


# root module -> {kind: _Kind}: consulted when groups are made (so that the groups of one model share
# their kinds) and when a learner is removed; a deep copy or pickle of the model copies the _Kind
# objects with the groups that hold them
_KINDS: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, _Kind]]" = weakref.WeakKeyDictionary()


class SiblingGroup:
    """The patched LoRA layers under one parent module. ``member_of(layer, x)`` gives a layer's
    ``(weight, lora_A, lora_B, scaling, bias, p)`` for a plain fused call on x, or None. ``root``:
    the model being patched; groups under one root with the same parent class and patched child
    names are of one kind, the first made its learner."""

    def __init__(self, parent: nn.Module, layers: List[nn.Module], member_of: Callable, backend: str,
                 root: nn.Module):
        self.layers = list(layers)
        self.member_of = member_of
        self.backend = backend
        names = {id(m): n for n, m in parent.named_children()}
        self._names: Dict[nn.Module, str] = {layer: names[id(layer)] for layer in self.layers}
        self._by_name: Dict[str, nn.Module] = {n: layer for layer, n in self._names.items()}
        self._kinds = _KINDS.setdefault(root, {})
        self._kind_key = (type(parent), tuple(sorted(self._by_name)))
        self._kind = self._kinds.setdefault(self._kind_key, _Kind(self))
        self._active = False
        self._seen: List[Tuple[nn.Module, torch.Tensor, int]] = []  # the learner's calls this span (x held until its end)
        self._held: Dict[nn.Module, tuple] = {}  # sibling -> (x, version, state key, output)
        self._hooks = [parent.register_forward_pre_hook(self._begin),
                       parent.register_forward_hook(self._end, always_call=True)]

    @property
    def is_learner(self) -> bool:
        return self._kind.learner is self

    def remove(self) -> None:
        """Take the hooks off the parent and forget everything held."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._seen, self._held = [], {}
        if self.is_learner:  # a later patch of the model makes a new learner
            self._kind.pattern = {}
            if self._kinds.get(self._kind_key) is self._kind:
                del self._kinds[self._kind_key]

    def _begin(self, module, args) -> None:
        self._seen, self._held = [], {}
        self._active = True

    def _end(self, module, args, output) -> None:
        if self.is_learner:
            by_x: Dict[Tuple[int, int], List[str]] = {}
            for layer, x, version in self._seen:  # x is held in _seen, so its id is not reused within the span
                members = by_x.setdefault((id(x), version), [])
                if self._names[layer] not in members:
                    members.append(self._names[layer])
            self._kind.pattern = {ms[0]: tuple(ms) for ms in by_x.values() if len(ms) > 1}
        self._seen, self._held = [], {}  # outputs not handed out die here
        self._active = False

    def output(self, layer: nn.Module, x: torch.Tensor, member: tuple) -> Optional[torch.Tensor]:
        """``layer``'s output for x if the group computes it (the leader) or holds it (a sibling
        called as learned); None: the caller runs the layer alone. ``member``: the layer's own
        ``(weight, lora_A, lora_B, scaling, bias, p)`` for this call."""
        if not self._active:  # called outside the parent's forward
            return None
        if self.is_learner:  # runs alone and records
            self._seen.append((layer, x, x._version))
            return None
        held = self._held.pop(layer, None)
        if held is not None:
            hx, version, key, y = held
            if hx is x and x._version == version and key == _state_key(member):
                return y
        names = self._kind.pattern.get(self._names[layer])
        if names is None:
            return None
        members = [(layer, member)]
        for sib in (self._by_name[n] for n in names[1:]):
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
