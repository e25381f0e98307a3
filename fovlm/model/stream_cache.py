"""A KV cache layer for long streams: keys and values in buffers that grow by doubling, not by concatenation.

transformers' ``DynamicLayer`` concatenates every new position onto a fresh copy of the whole cache; over a
stream of thousands of one-token steps that is a copy of the whole cache per step, and the allocator keeps
the freed copies' memory around (measured: resident memory grew 1.37x the cache's own growth over 3,000 frames,
docs/measured.md#streaming). :class:`GrowingLayer` writes each step into place and reallocates only when its
capacity is full, doubling it; the unused tail of a buffer is never written, so it costs no resident memory.
``keys`` / ``values`` are views of the used part, so everything that reads a ``DynamicLayer`` reads this.

Given the positions a stream can reach (``capacity``: the LLM's position limit for the ``full`` policy, the
window's size for ``window``), the buffers are reserved at that size from the start and never reallocated: the
reserved pages become resident only as positions are written, so resident memory grows with the cache itself
instead of with copies and freed buffers that the allocator keeps.
"""


from __future__ import annotations

from functools import partial

from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """One layer's keys and values [B, H, L, hd] in preallocated buffers (capacity doubles when full)."""

    min_capacity = 256

    def __init__(self, capacity: int = 0) -> None:
        """Args: capacity: positions reserved at the first update (0: ``min_capacity``, doubling from there)."""
        super().__init__()
        self.capacity = capacity

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer = key_states.new_empty(*key_states.shape[:-2], 0, key_states.shape[-1])
        self._value_buffer = value_states.new_empty(*value_states.shape[:-2], 0, value_states.shape[-1])
        self.length = 0
        self._reserve(self.capacity)
        self._views()

    def _views(self) -> None:
        self.keys = self._key_buffer[..., : self.length, :]
        self.values = self._value_buffer[..., : self.length, :]

    def _reserve(self, length: int) -> None:
        """Make room for ``length`` positions (doubling), keeping the used part."""
        capacity = self._key_buffer.shape[-2]
        if length <= capacity:
            return
        capacity = max(length, 2 * capacity, self.min_capacity)
        for name in ("_key_buffer", "_value_buffer"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:-2], capacity, old.shape[-1])
            new[..., : self.length, :] = old[..., : self.length, :]
            setattr(self, name, new)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append [B, H, n, hd] keys and values in place -> all keys and values so far (views)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self._reserve(self.length + n)
        self._key_buffer[..., self.length: self.length + n, :] = key_states
        self._value_buffer[..., self.length: self.length + n, :] = value_states
        self.length += n
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (a negative count, as ``DynamicLayer.crop`` takes)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of positions to remove, got {tokens_to_remove}")
        if self.is_initialized and tokens_to_remove:
            self.length -= min(-tokens_to_remove, self.length)
            self._views()

    def remove(self, start: int, stop: int, keys_after: Tensor) -> None:
        """Drop positions [start, stop) and put ``keys_after`` (the keys of the positions after ``stop``, e.g.
        re-rotated) and the values after ``stop`` in their place."""
        values_after = self._value_buffer[..., stop: self.length, :].clone()
        kept = start + values_after.shape[-2]
        self._key_buffer[..., start:kept, :] = keys_after
        self._value_buffer[..., start:kept, :] = values_after
        self.length = kept
        self._views()


def growing_cache(capacity: int = 0) -> Cache:
    """An LLM cache whose layers are :class:`GrowingLayer` (one per decoder layer, created on first use), each
    reserving ``capacity`` positions (0: growing by doubling from ``GrowingLayer.min_capacity``)."""
    return Cache(layer_class_to_replicate=partial(GrowingLayer, capacity=capacity))
