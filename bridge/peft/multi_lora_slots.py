"""The state every MultiLoRA layer shares (bridge/peft/multi_lora_layers.py): the micro-batch's
tokens per slot (read from the host once, windows per sequence-parallel shard, device tables per
device), the slot weights held as views of one stacked tensor per factor (so the fused op gets
the stack without a copy), and the RNG fork used to re-initialise a slot."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["SlotTokens", "split_slot_settings", "stack_slots"]

# ---- the micro-batch's tokens per slot -------------------------------------------------------
def _narrow_counts(counts: Sequence[int], start: int, rows: int) -> list[int]:
    """Per-slot rows inside the window [start, start + rows) of the slot-grouped rows."""
    out, end = [], 0
    for c in counts:
        begin, end = end, end + c
        out.append(max(0, min(end, start + rows) - max(begin, start)))
    return out


def _narrow_token_counts_to_window(counts: torch.Tensor, start: int, num_rows: int
                                   ) -> torch.Tensor:
    """Upstream's helper on a tensor: per-slot spans intersected with [start, start + num_rows)."""
    cum = counts.cumsum(dim=0)
    return (cum.clamp(max=start + num_rows) - (cum - counts).clamp(min=start)).clamp(
        min=0).to(counts.dtype)


class SlotTokens:
    """One micro-batch's tokens per slot, read from the host once and shared by every layer.

    Attributes:
        source: what ``set_tokens_per_adapter_slot`` was given; counts: Python ints; total: M.
    """

    def __init__(self, tokens, n_slots: int | None = None) -> None:
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
                raise TypeError(f"tokens per adapter slot must be a 1-D integer tensor (or a list "
                                f"of ints); got {tokens.dtype} of shape {tuple(tokens.shape)}")
            counts = [int(v) for v in tokens.tolist()]  # the one host sync per micro-batch
        else:
            counts = list(tokens)
            if any(isinstance(v, bool) or not isinstance(v, int) for v in counts):
                raise TypeError(f"tokens per adapter slot must be ints; got {counts}")
        if any(c < 0 for c in counts):
            raise ValueError(f"tokens per adapter slot must be >= 0; got {counts}")
        if n_slots is not None and len(counts) != n_slots:
            raise ValueError(f"got tokens for {len(counts)} adapter slots, the model has "
                             f"{n_slots} (MultiLoRA n_adapters): give one count per slot")
        self.source = tokens
        self.counts = counts
        self.total = sum(counts)
        self._device: dict = {}

    def window(self, start: int, rows: int, device: torch.device):
        """(counts, offsets int32 [n + 1] on ``device``, counts int32 [n] on ``device``) of the
        rows [start, start + rows); built once per micro-batch, window and device."""
        key = (start, rows, device)
        hit = self._device.get(key)
        if hit is None:
            counts = self.counts if (start, rows) == (0, self.total) else \
                _narrow_counts(self.counts, start, rows)
            offsets = [0]
            for c in counts:
                offsets.append(offsets[-1] + c)
            table = torch.tensor([*offsets, *counts], dtype=torch.int32).to(device)
            hit = self._device[key] = (counts, table[:len(offsets)], table[len(offsets):])
        return hit


# ---- slot weights held as views of one stack per factor -------------------------------------
def _pack(params: list[nn.Parameter]) -> None:
    """Re-home the parameters as consecutive views of one new [n, *shape] tensor."""
    if not params or len({(p.shape, p.dtype, p.device) for p in params}) != 1 \
            or params[0].device.type == "meta":
        return
    stack = torch.stack([p.detach() for p in params])
    for i, p in enumerate(params):
        p.data = stack[i]


def _stack_alias(params: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, str]:
    """A [n, *shape] tensor aliasing the parameters' memory when they are consecutive views of
    one stack (no copy), else (None, why not)."""
    p0 = params[0]
    if not p0.is_contiguous():
        return None, "slot weights are not contiguous"
    storage, step = p0.untyped_storage(), p0.numel()
    ptr, off = storage.data_ptr(), p0.storage_offset()
    for i, p in enumerate(params):
        if p.untyped_storage().data_ptr() != ptr or p.storage_offset() != off + i * step \
                or p.shape != p0.shape or not p.is_contiguous() or p.dtype != p0.dtype:
            return None, ("slot weights are not consecutive in one stack (re-homed, e.g. by an "
                          "optimizer's parameter buffer): stacked by a copy per forward")
    alias = torch.empty(0, dtype=p0.dtype, device=p0.device)
    alias.set_(storage, off, (len(params), *p0.shape), (step, *p0.stride()))
    return alias, ""


class _SlotStack(torch.autograd.Function):
    """[n, *shape] view of the slot parameters' shared memory (no copy); backward hands each slot
    its row of the stacked gradient."""

    @staticmethod
    def forward(ctx, alias, *params):
        return alias

    @staticmethod
    def backward(ctx, grad):
        return (None, *grad.unbind(0))


def stack_slots(params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, str]:
    """(the slots stacked [n, *shape], '' or why it took a copy)."""
    if torch.compiler.is_compiling():
        return torch.stack(list(params)), "traced: torch.stack"
    alias, why = _stack_alias(params)
    if alias is None:
        return torch.stack(list(params)), why
    return _SlotStack.apply(alias.detach(), *params), ""


def _rng_fork(expert: bool):
    """megatron's model-parallel RNG tracker fork (the expert one for experts) where its states
    are set up, so every data-parallel replica re-initialises a slot identically (upstream's
    rule); a null context elsewhere (no megatron, or the CPU, where the tracker holds no
    states)."""
    try:
        from megatron.core.tensor_parallel import random as mrandom
    except ImportError:
        return contextlib.nullcontext()
    tracker = mrandom.get_cuda_rng_tracker()
    name = mrandom.get_expert_parallel_rng_tracker_name() if expert else \
        mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME
    if tracker.is_initialized() and name in tracker.get_states():
        return tracker.fork(name)
    return contextlib.nullcontext()


# ---- a slot checkpoint's settings records --------------------------------------------------------
def split_slot_settings(chunks: Sequence[nn.Module], state_dict) -> tuple[dict, list[str]]:
    """Split a slot checkpoint into its tensors and the differences between its settings records
    (``adapter_state_dict``'s ``<layer>.adapter._extra_state``, written under
    ``expose_adapter_slot``) and the exposed slot's rank, alpha and dropout; call it while the
    target slot is exposed. Returns ({key: tensor} without the records, ["layer: ..."])."""
    from bridge.peft.adapter_io import SETTINGS_KEY, _decode, _settings_mismatches, _wrappers

    wrappers = {name: m for chunk in chunks for name, m in _wrappers(chunk)}
    tensors, settings = {}, {}
    for key, value in state_dict.items():
        if key == SETTINGS_KEY or key.endswith("." + SETTINGS_KEY):
            layer = key[: -len(SETTINGS_KEY)].rstrip(".")
            if layer in wrappers:
                settings[layer] = _decode(key, value)
        else:
            tensors[key] = value
    return tensors, _settings_mismatches(wrappers, settings)
