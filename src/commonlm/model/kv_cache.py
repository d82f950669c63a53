"""Preallocated key/value caches for incremental decoding.

`KVCache` and `SlotKVCache` hold one tensor pair for all layers ([n_layer, rows, n_kv_head, max_len,
head_dim]; the slot cache puts max_len before the heads). Values may be narrower or wider than keys (`v_dim`):
latent attention (model/mla.py) keeps one compressed latent per token where keys go and its shared rotary key where
values go, a single "head" of each, instead of every head's keys and values. All three answer the decoder's three
questions: at which positions do the new tokens sit (`positions`), store these keys/values and give
back everything each query may see (`update`), and move on (`advance`).

- `KVCache`: every row at the same position (single requests, equal-length batches).
- `SlotKVCache`: one slot per request, each at its own length; a forward pass runs on any subset of
  slots (`select`). This is what continuous batching needs: requests join and leave between steps.
- `StaticKVCache`: like `KVCache`, but every shape is fixed and the position is a tensor, so that a
  compiled decode step (infer/compiled.py) sees the same graph at every token.
- `PackedRows`: no cache at all, but training's packed sequences (several conversations in one row), which
  need the same two answers: positions that restart, and a mask that keeps each sequence to itself.
- `SharedPrefix`: no cache either, but scoring's rows (evaluate/scoring.py): a context laid once with its
  continuations after it, each continuing the context's positions and seeing the context and itself only.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        v_dim: int | None = None,
    ):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape[:-1] + (head_dim if v_dim is None else v_dim,), device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def positions(self, T: int) -> torch.Tensor:
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos + T} positions > max_len={self.max_len}")
        B = self.k.shape[1]
        return torch.arange(self.pos, self.pos + T, device=self.k.device).expand(B, T)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store k, v [B, H, T, D] at the current position; return all keys, values and the visibility mask.

        The mask is None when a plain causal mask (or, for one query, none) is right.
        """
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len={self.max_len}")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        mask = None
        if self.pos > 0 and T > 1:  # queries at pos..end-1 each see keys 0..their own position
            q_pos = torch.arange(self.pos, end, device=k.device)[:, None]
            mask = torch.arange(end, device=k.device)[None, :] <= q_pos
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], mask

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos = 0


class SlotKVCache:
    """One cache slot per sequence, each with its own length. Call `select(slots)` before a forward pass:
    row b of the batch is slot slots[b].

    Laid out [n_layer, slots, max_len, n_kv_head, head_dim], positions before heads: a token's keys for
    all heads are one contiguous block, so a decode step's writes (one token in each of many slots) touch
    one block per row instead of one per row and head. At 64 rows a layer's writes took 41 instead of 150 us;
    attention reads the keys through a transposed view, which SDPA takes as it is.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, v_dim: int | None = None):
        shape = (n_layer, batch_size, max_len, n_kv_head, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape[:-1] + (head_dim if v_dim is None else v_dim,), device=device, dtype=dtype)
        self.max_len = max_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.rows = torch.arange(batch_size, device=device)
        self._contiguous = True  # rows are slots 0..B-1 in order: views instead of gathers

    def select(self, slots: list[int]) -> None:
        self.rows = torch.tensor(slots, dtype=torch.long, device=self.k.device)
        self._contiguous = slots == list(range(len(slots)))

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0

    def positions(self, T: int) -> torch.Tensor:
        """The positions of the next T tokens of each selected slot, [B, T]. A forward pass asks this once,
        before its first layer: what every layer's `update` needs (write indices, visibility mask,
        bounds check) is worked out here, once, instead of once per layer."""
        pos = self.lengths[self.rows][:, None] + torch.arange(T, device=self.k.device)  # [B, T]
        end = int(pos.max()) + 1
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len={self.max_len}")
        B = pos.shape[0]
        self._write = (self.rows[:, None].expand(B, T), pos)
        # query t of row b (at position pos[b, t]) sees the keys at positions 0..pos[b, t] of its own slot;
        # one new token per row, every row at the same length: it sees all `end` keys, no mask needed
        self._mask = None
        if T > 1 or int(pos.min()) + 1 != end:
            self._mask = (torch.arange(end, device=pos.device)[None, None, :] <= pos[:, :, None])[:, None]  # [B,1,T,S]
        self._end = end
        return pos

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        B, end = k.shape[0], self._end
        self.k[layer][self._write] = k.transpose(1, 2)  # the indexed view is [B, T, H, D]
        self.v[layer][self._write] = v.transpose(1, 2)
        if self._contiguous:
            keys, values = self.k[layer, :B, :end], self.v[layer, :B, :end]
        else:
            keys, values = self.k[layer, self.rows, :end], self.v[layer, self.rows, :end]
        return keys.transpose(1, 2), values.transpose(1, 2), self._mask  # [B, H, end, D]

    def advance(self, n: int) -> None:
        self.lengths[self.rows] += n

    def reset(self) -> None:
        self.lengths.zero_()


class StaticKVCache:
    """Fixed shapes for torch.compile: attention always runs over all `max_len` positions, with a mask
    hiding the ones not written yet, and the position lives in a tensor instead of a Python int.

    One tensor pair per layer (writing into a slice of one big tensor makes the compiled graph copy the
    whole tensor). The caller keeps count: nothing here checks for room on the host, because a
    compiled step must not read a changing Python number (writing past `max_len` fails in
    `index_copy_`, eager or compiled).
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, v_dim: int | None = None):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        values = shape[:-1] + (head_dim if v_dim is None else v_dim,)
        self.v = [torch.zeros(values, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)

    def positions(self, T: int) -> torch.Tensor:
        B = self.k[0].shape[0]
        return (self.pos + torch.arange(T, device=self.pos.device)).expand(B, T)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        where = self.pos + torch.arange(T, device=k.device)  # [T]
        self.k[layer].index_copy_(2, where, k)
        self.v[layer].index_copy_(2, where, v)
        mask = self.slots[None, :] <= where[:, None]  # [T, max_len]: each query sees up to itself
        return self.k[layer], self.v[layer], mask

    def advance(self, n: int) -> None:
        self.pos.add_(n)

    def reset(self) -> None:
        self.pos.zero_()


class _Layout:
    """What PackedRows and SharedPrefix answer alike: positions and a mask made once for the whole batch, nothing
    stored (the keys and values of the forward pass are all there are)."""

    _positions: torch.Tensor
    mask: torch.Tensor

    def positions(self, T: int) -> torch.Tensor:
        return self._positions[:, :T]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return k, v, self.mask

    def advance(self, n: int) -> None:
        pass


def _run_start(starts: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """For each place, the index where its run begins (`starts` marks the first place of each run)."""
    return torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values


class PackedRows(_Layout):
    """Not a cache: several sequences packed side by side in each row of a training batch. It answers the same
    three questions, so the decoder needs nothing else for packing: positions restart at every sequence, and
    each query sees the earlier keys of its own sequence only (a block-diagonal causal mask). Nothing is stored.

    `segments` [B, T] numbers the sequences of each row (any ids; equal ids are one sequence, in order).
    """

    def __init__(self, segments: torch.Tensor):
        B, T = segments.shape
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        index = torch.arange(T, device=segments.device).expand(B, T)
        self._positions = index - _run_start(starts, index)
        self.segments = segments
        causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
        self.mask = (segments[:, None, :, None] == segments[:, None, None, :]) & causal  # [B, 1, T, T]


class SharedPrefix(_Layout):
    """Not a cache: scoring's rows (evaluate/scoring.py), where the continuations of one context share a single copy
    of it. An item is its prefix (the context) followed by each continuation's tokens in a run of their own; a row
    holds one item or several side by side. Every continuation's positions run on from the prefix's end, and its
    tokens see the prefix and their own continuation's earlier tokens only: each continuation gets the logits it
    would get right after the context in a row of its own, and the context is computed once.

    `items` [B, T] numbers the items of each row (any ids >= 0, each in one run; -1 is padding, which sees only
    itself, at position 0); `branches` [B, T] is 0 on an item's prefix, which comes first, and k > 0 on its k-th
    continuation (one run each). The keys a token sees are one run of positions ending at its own, so a sliding
    window, which counts the keys a query sees back from its own, narrows them as it would a row of their own.
    """

    def __init__(self, items: torch.Tensor, branches: torch.Tensor):
        B, T = items.shape
        index = torch.arange(T, device=items.device).expand(B, T)
        item_starts = torch.ones_like(items, dtype=torch.bool)
        item_starts[:, 1:] = items[:, 1:] != items[:, :-1]
        run_starts = item_starts.clone()
        run_starts[:, 1:] |= branches[:, 1:] != branches[:, :-1]
        item_start, run_start = _run_start(item_starts, index), _run_start(run_starts, index)
        in_prefix = (branches == 0).long()
        before = in_prefix.cumsum(dim=1) - in_prefix  # prefix tokens before each place, over the whole row
        prefix_len = in_prefix.cumsum(dim=1) - before.gather(1, item_start)  # at a continuation: its item's prefix
        real = items >= 0
        self._positions = torch.where(real, index - run_start + torch.where(branches > 0, prefix_len, 0), 0)
        same_item = (items[:, :, None] == items[:, None, :]) & real[:, :, None]
        seen = (branches[:, None, :] == 0) | (branches[:, None, :] == branches[:, :, None])
        causal = torch.ones(T, T, dtype=torch.bool, device=items.device).tril()
        itself = torch.eye(T, dtype=torch.bool, device=items.device)
        self.mask = ((same_item & seen & causal) | itself)[:, None]  # [B, 1, T, T]
