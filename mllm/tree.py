"""The implicit tree of a memory: embeddings, keys and liveness per level, and its repair.

Levels are kept bottom up (list index 0 = the leaves, i.e. ranker **height** index + 1) because
the tree grows at the top. The children of node i at index h+1 are nodes
``[i*fanout, min((i+1)*fanout, N_h))`` at index h, so ``N_{h+1} = ceil(N_h / fanout)``; the top
level holds at most ``fanout`` nodes.

Removed leaves become tombstones (zeroed embedding and key, not live) so that the other leaves
keep their ids and their siblings; a parent whose children are all dead is dead too, and dead
leaves at the right end are cut off. ``repair`` re-encodes exactly the ancestors of what changed.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MemoryConfig

# Parents encoded per LevelEncoder call: bounds the padded [groups, fanout, D] activations.
_PARENTS_PER_CALL = 4096


def append_rows(buffers: dict, key, current: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``torch.cat([current, rows])`` in amortised O(len(rows)) time.

    The result is a view on a buffer kept in ``buffers[key]`` with room to spare (capacity
    grows by half), so a memory that grows by small ``add`` calls does not copy all its levels each
    time. ``current`` is used in place only when it is a prefix view of that buffer; any other
    tensor (e.g. one mapped from a file) is copied once into a new buffer.
    """
    n, m = current.shape[0], rows.shape[0]
    buffer = buffers.get(key)
    if buffer is None or buffer.data_ptr() != current.data_ptr() or buffer.shape[0] < n + m or n == 0:
        buffer = current.new_zeros((max(n + m, n + n // 2),) + tuple(current.shape[1:]))
        buffer[:n] = current
        buffers[key] = buffer
    buffer[n : n + m] = rows
    return buffer[: n + m]


class Tree:
    """Per-height ``emb`` (float32 ``[N_h, D]``), ``keys`` (key dtype ``[N_h, D]``) and ``live`` (bool ``[N_h]``)."""

    def __init__(self, config: MemoryConfig, level_encoders: nn.ModuleList, ranker: nn.Module):
        self.config = config
        self.level_encoders = level_encoders
        self.ranker = ranker
        d = config.d_model
        self.emb = [torch.zeros(0, d)]
        self.keys = [torch.zeros(0, d, dtype=config.key_torch_dtype)]
        self.live = [torch.zeros(0, dtype=torch.bool)]
        self._buffers: dict = {}

    @property
    def num_levels(self) -> int:
        return len(self.emb) if self.emb[0].shape[0] else 0

    @property
    def num_leaves(self) -> int:
        return self.emb[0].shape[0]

    def sizes(self) -> list[int]:
        return [e.shape[0] for e in self.emb]

    def _keys_of(self, emb: torch.Tensor, index: int, live: torch.Tensor) -> torch.Tensor:
        """Keys of nodes at list index ``index`` (0 = leaves), i.e. ranker height ``index + 1``."""
        keys = self.ranker.keys(emb, index + 1).to(self.config.key_torch_dtype)
        keys[~live] = 0
        return keys

    @torch.no_grad()
    def append_leaves(self, emb: torch.Tensor) -> torch.Tensor:
        """Add leaves at the right edge; returns their ids (the dirty leaves for ``repair``)."""
        start = self.num_leaves
        live = torch.ones(emb.shape[0], dtype=torch.bool)
        self._append(0, emb.float(), self._keys_of(emb, 0, live), live)
        return torch.arange(start, self.num_leaves)

    @torch.no_grad()
    def kill_leaves(self, ids: torch.Tensor) -> None:
        """Tombstone leaves: nothing of their content stays in the embeddings or keys."""
        self.emb[0][ids] = 0
        self.keys[0][ids] = 0
        self.live[0][ids] = False

    @torch.no_grad()
    def set_leaves(self, emb: torch.Tensor, live: torch.Tensor) -> None:
        """Replace all leaves (and drop every level above; ``repair`` rebuilds them)."""
        emb = emb.float().clone()
        emb[~live] = 0
        self.emb, self.live = [emb], [live.clone()]
        self.keys = [self._keys_of(emb, 0, live)]
        self._buffers.clear()

    @torch.no_grad()
    def repair(self, dirty: torch.Tensor) -> int:
        """Re-encode the ancestors of the ``dirty`` leaf ids; returns how many nodes were encoded.

        Also cuts dead leaves off the right end, adds a level when the top overflows ``fanout``
        and drops levels that are no longer needed.
        """
        fanout = self.config.fanout
        last_live = torch.nonzero(self.live[0]).max().item() + 1 if self.live[0].any() else 0
        dirty = torch.cat([dirty, torch.arange(last_live, self.num_leaves)])  # cut leaves change their parents too
        self._resize(0, last_live)
        encoded, height = 0, 0
        while self.emb[height].shape[0] > fanout:
            n_child, n_parent = self.emb[height].shape[0], -(-self.emb[height].shape[0] // fanout)
            if height + 1 == len(self.emb):
                if height + 2 > self.config.max_levels:
                    raise RuntimeError(
                        f"HierarchicalMemory: {n_child} nodes at height {height + 1} need more than "
                        f"max_levels={self.config.max_levels} levels; raise max_levels or fanout"
                    )
                self._resize(height + 1, 0)
            old = self.emb[height + 1].shape[0]
            # Changed at height + 1: the parents of changed or cut children, and the new or cut parents.
            # Cut ones are not encoded, but their own parents above have changed.
            changed = torch.unique(torch.cat([dirty // fanout, torch.arange(min(old, n_parent), max(old, n_parent))]))
            self._resize(height + 1, n_parent)
            parents = changed[changed < n_parent]
            self._encode_parents(height + 1, parents)
            encoded += parents.numel()
            dirty, height = changed, height + 1
        for values in (self.emb, self.keys, self.live):
            del values[height + 1 :]
        for key in [key for key in self._buffers if key[1] > height]:
            del self._buffers[key]
        return encoded

    def _resize(self, height: int, size: int) -> None:
        if height == len(self.emb):
            self.emb.append(torch.zeros(0, self.config.d_model))
            self.keys.append(torch.zeros(0, self.config.d_model, dtype=self.config.key_torch_dtype))
            self.live.append(torch.zeros(0, dtype=torch.bool))
        grow = size - self.emb[height].shape[0]
        if grow <= 0:
            for values in (self.emb, self.keys, self.live):
                values[height][size:] = 0  # cut nodes may stay in a buffer's spare rows: leave nothing of them
                values[height] = values[height][:size]
            return
        self._append(
            height,
            self.emb[height].new_zeros(grow, self.config.d_model),
            self.keys[height].new_zeros(grow, self.config.d_model),
            self.live[height].new_zeros(grow),
        )

    def _append(self, height: int, emb: torch.Tensor, keys: torch.Tensor, live: torch.Tensor) -> None:
        for name, values, rows in (("emb", self.emb, emb), ("keys", self.keys, keys), ("live", self.live, live)):
            values[height] = append_rows(self._buffers, (name, height), values[height], rows)

    def _encode_parents(self, height: int, parents: torch.Tensor) -> None:
        """Encode the nodes ``parents`` at list index ``height`` from their live children.

        ``level_encoders[i]`` builds index ``i + 1`` (ranker height ``i + 2``) from index ``i``.
        """
        fanout = self.config.fanout
        encoder = self.level_encoders[height - 1]
        below_emb, below_live = self.emb[height - 1], self.live[height - 1]
        for batch in parents.split(_PARENTS_PER_CALL):
            children = batch[:, None] * fanout + torch.arange(fanout)
            valid = children < below_emb.shape[0]
            valid[valid.clone()] = below_live[children[valid]]
            counts = valid.sum(1)
            alive = counts > 0
            emb = torch.zeros(batch.numel(), self.config.d_model)
            if alive.any():
                offsets = torch.nn.functional.pad(counts[alive].cumsum(0), (1, 0))
                emb[alive] = encoder(below_emb[children[valid]], offsets).float()
            self.emb[height][batch] = emb
            self.live[height][batch] = alive
            self.keys[height][batch] = self._keys_of(emb, height, alive)

    def visible(self, leaf_visible: torch.Tensor | None) -> list[torch.Tensor] | None:
        """Per-height masks: live and (at the leaves) ``leaf_visible``; a parent is visible when any child is.

        Returns None when every node is visible (the kernels then skip the mask).
        """
        leaves = self.live[0] if leaf_visible is None else self.live[0] & leaf_visible
        if leaf_visible is None and all(bool(live.all()) for live in self.live):
            return None
        masks, fanout = [leaves], self.config.fanout
        for height in range(1, len(self.emb)):
            below = masks[-1]
            padded = torch.nn.functional.pad(below, (0, (-below.numel()) % fanout))
            masks.append(padded.view(-1, fanout).any(1) & self.live[height])
        return masks
