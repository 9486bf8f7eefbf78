"""HierarchicalMemory: documents -> a tree of embeddings searched in log(N) with the fused ops."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import nn

import mllm_kernels as mk

from .config import MemoryConfig
from .encoders import ChunkEncoder, LevelEncoder
from .layout import semantic_order
from .ranker import DecoderRanker
from .results import RetrievalResult, RetrievedChunk
from .tree import Tree, append_rows

Document = str | Sequence[int] | torch.Tensor


@dataclasses.dataclass
class UpdateStats:
    """What the last ``add`` / ``remove`` / ``compact`` cost: chunks encoded, tree nodes re-encoded."""

    chunks_encoded: int = 0  # those found in ``chunk_cache`` not counted
    nodes_reencoded: int = 0


class HierarchicalMemory(nn.Module):
    """A memory of documents, stored as a tree of embeddings outside the model's weights.

    Documents are split into chunks of ``config.chunk_size`` tokens; ``encoder`` (a ``ChunkEncoder``)
    turns each chunk into a leaf; ``fanout`` leaves are encoded into a parent by a
    ``LevelEncoder``, and so on up to a top level of at most ``fanout`` nodes. ``retrieve``
    descends the tree with ``mllm_kernels.descend_tree``, keeping the best ``t`` nodes per level.

    ``len(memory)`` is the number of documents; ``num_levels`` the depth of the tree. Documents get
    stable integer ids, never reused. Leaf ids change only through ``compact``.
    """

    def __init__(self, encoder: ChunkEncoder, config: MemoryConfig | None = None):
        super().__init__()
        config = config or MemoryConfig(d_model=encoder.d_model)
        if config.d_model != encoder.d_model:
            raise ValueError(
                f"HierarchicalMemory: config.d_model={config.d_model} but the encoder gives {encoder.d_model}"
            )
        if config.chunk_size > encoder.max_chunk_tokens:
            raise ValueError(
                f"HierarchicalMemory: chunk_size={config.chunk_size} exceeds the encoder's "
                f"{encoder.max_chunk_tokens} tokens"
            )
        self.config = config
        self.encoder = encoder
        self.level_encoders = nn.ModuleList(
            LevelEncoder(config.d_model, config.fanout, config.layers_of_level(height), normalize=config.normalize)
            for height in range(2, config.max_levels + 1)
        )
        self.ranker = DecoderRanker(config.d_model, config.max_levels)
        self.tree = Tree(config, self.level_encoders, self.ranker)
        self.leaf_doc = torch.zeros(0, dtype=torch.int64)
        self.leaf_span = torch.zeros(0, 2, dtype=torch.int64)  # token [start, end) of each leaf in its document
        self.doc_tokens: dict[int, torch.Tensor] = {}
        self.doc_titles: dict[int, str] = {}
        self.next_doc_id = 0
        self.last_update = UpdateStats()
        self._masked: Counter[int] = Counter()
        self._visible_cache: tuple | None = None
        self._provenance: tuple | None = None
        self._spare_rows: dict = {}  # spare capacity of leaf_doc / leaf_span (see append_rows)
        self._version = 0
        self.tokens_per_batch = 8192
        # Optional {chunk token bytes: embedding} shared between memories over mostly the same text
        # (e.g. needle tasks, which differ from one haystack to the next in a few pages only). The
        # caller owns it and must drop it when the encoder's weights change.
        self.chunk_cache: dict[bytes, torch.Tensor] | None = None
        self._chunks_encoded = 0

    @classmethod
    def build(
        cls,
        documents: Iterable[Document],
        encoder: ChunkEncoder,
        config: MemoryConfig | None = None,
        titles: Sequence[str] | None = None,
        progress: bool = True,
        chunk_cache: dict | None = None,
    ) -> HierarchicalMemory:
        """A memory over ``documents`` (texts, or token-id sequences), encoded in batches.

        ``chunk_cache``: an optional dict of chunk embeddings by token content, read and filled
        while encoding (see the ``chunk_cache`` attribute); chunks found in it are not encoded.
        """
        memory = cls(encoder, config)
        memory.chunk_cache = chunk_cache
        memory.add(documents, titles=titles, progress=progress)
        return memory

    # ----------------------------------------------------------------------------------------- size
    def __len__(self) -> int:
        return len(self.doc_tokens)

    @property
    def num_levels(self) -> int:
        return self.tree.num_levels

    @property
    def num_leaves(self) -> int:
        """Leaf slots, tombstones of removed chunks included (see ``compact``)."""
        return self.tree.num_leaves

    def doc_ids(self) -> list[int]:
        return sorted(self.doc_tokens)

    def __repr__(self) -> str:
        return (
            f"HierarchicalMemory(documents={len(self)}, leaves={self.num_leaves}, levels={self.num_levels}, "
            f"fanout={self.config.fanout}, chunk_size={self.config.chunk_size}, layout={self.config.layout})"
        )

    # -------------------------------------------------------------------------------------- encoding
    def tokenize(self, documents: Iterable[Document]) -> list[torch.Tensor]:
        """Texts or token-id sequences -> int64 token tensors (texts through the encoder's tokenizer)."""
        documents = list(documents)
        texts = [i for i, doc in enumerate(documents) if isinstance(doc, str)]
        encoded = dict(zip(texts, self.encoder.tokenizer.encode([documents[i] for i in texts]))) if texts else {}
        out = []
        for i, doc in enumerate(documents):
            tokens = torch.as_tensor(encoded.get(i, doc), dtype=torch.int64).flatten()
            if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.encoder.tokenizer.vocab_size):
                raise ValueError(
                    f"HierarchicalMemory: documents[{i}] has token ids outside [0, {self.encoder.tokenizer.vocab_size})"
                )
            out.append(tokens)
        return out

    def _chunk(self, token_lists: list[torch.Tensor]):
        """Concatenated tokens, chunk offsets into them, and each chunk's document index and span."""
        lengths = torch.tensor([t.numel() for t in token_lists], dtype=torch.int64)
        seg_offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
        offsets, segment = mk.chunk_offsets(seg_offsets, self.config.chunk_size)
        tokens = torch.cat(token_lists) if token_lists else torch.zeros(0, dtype=torch.int64)
        span = torch.stack([offsets[:-1], offsets[1:]], 1) - seg_offsets[segment, None]
        return tokens, offsets, segment, span

    @torch.no_grad()
    def encode_chunks(self, tokens: torch.Tensor, offsets: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Chunk embeddings ``[C, D]`` float32 of ``tokens[offsets[c]:offsets[c+1]]``, batched by length."""
        from tqdm.auto import tqdm

        lengths = offsets.diff()
        out = torch.empty(lengths.numel(), self.config.d_model)
        todo, keys = torch.arange(lengths.numel()), None
        if self.chunk_cache is not None:
            keys = [tokens[a:b].numpy().tobytes() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
            cached = torch.tensor([key in self.chunk_cache for key in keys], dtype=torch.bool)
            if cached.any():
                hits = torch.nonzero(cached).flatten()
                out[hits] = torch.stack([self.chunk_cache[keys[i]] for i in hits.tolist()])
            todo = torch.nonzero(~cached).flatten()
        order = todo[torch.argsort(lengths[todo], descending=True, stable=True)]
        pad = self.encoder.tokenizer.pad_id
        with tqdm(total=order.numel(), desc="encoding chunks", unit="chunk", disable=not progress) as bar:
            start = 0
            while start < order.numel():
                width = int(lengths[order[start]])
                count = max(1, self.tokens_per_batch // max(width, 1))
                batch = order[start : start + count]
                positions = offsets[batch, None] + torch.arange(width)
                valid = torch.arange(width) < lengths[batch, None]
                ids = torch.where(valid, tokens[positions.clamp(max=max(tokens.numel() - 1, 0))], pad)
                out[batch] = self.encoder(ids, lengths[batch]).float()
                start += batch.numel()
                bar.update(batch.numel())
        self._chunks_encoded = order.numel()
        if keys is not None:
            self.chunk_cache.update((keys[i], out[i].clone()) for i in todo.tolist())
        return out

    def encode_queries(self, queries) -> torch.Tensor:
        """Queries -> query chunk embeddings ``[B, P, D]`` float32.

        ``queries``: a list of texts or token-id sequences (a query longer than ``chunk_size``
        tokens gives several chunks, i.e. several probes; shorter queries repeat their first
        chunk, which changes no ``max`` score), or a float tensor of embeddings ``[B, D]`` or
        ``[B, P, D]``.
        """
        if isinstance(queries, torch.Tensor) and queries.is_floating_point():
            query = queries[:, None] if queries.dim() == 2 else queries
            if query.dim() != 3 or query.shape[-1] != self.config.d_model:
                raise ValueError(
                    f"HierarchicalMemory.retrieve: query embeddings must be [B, {self.config.d_model}] "
                    f"or [B, P, {self.config.d_model}], got {tuple(queries.shape)}"
                )
            return query.float()
        token_lists = self.tokenize([queries] if isinstance(queries, str) else queries)
        if any(t.numel() == 0 for t in token_lists):
            raise ValueError("HierarchicalMemory.retrieve: every query needs at least one token")
        tokens, offsets, segment, _ = self._chunk(token_lists)
        chunks = self.encode_chunks(tokens, offsets)
        counts = torch.bincount(segment, minlength=len(token_lists))
        first = torch.nn.functional.pad(counts.cumsum(0), (1, 0))[:-1]
        slot = torch.arange(int(counts.max()))
        index = first[:, None] + torch.minimum(slot, counts[:, None] - 1) * (slot < counts[:, None])
        return chunks[index]

    # --------------------------------------------------------------------------------------- updates
    def _changed(self) -> None:
        self._version += 1
        self._visible_cache = None

    def add(
        self, documents: Iterable[Document], titles: Sequence[str] | None = None, progress: bool = False
    ) -> list[int]:
        """Add documents (texts or token-id sequences); returns their new ids.

        Only the new chunks are encoded, and only the right edge of the tree (the ancestors of the
        new leaves) is re-encoded; a new top level appears when the top overflows ``fanout``.
        With the semantic layout, the new leaves are ordered among themselves (see ``compact``).
        """
        token_lists = self.tokenize(documents)
        if titles is not None and len(titles) != len(token_lists):
            raise ValueError(f"HierarchicalMemory.add: {len(titles)} titles for {len(token_lists)} documents")
        ids = list(range(self.next_doc_id, self.next_doc_id + len(token_lists)))
        tokens, offsets, segment, span = self._chunk(token_lists)
        emb = self.encode_chunks(tokens, offsets, progress)
        if self.config.layout == "semantic" and emb.shape[0] > 1:
            order = semantic_order(emb, self.config.fanout, seed=self.config.seed)
            emb, segment, span = emb[order], segment[order], span[order]
        self.next_doc_id += len(token_lists)
        for i, doc_id in enumerate(ids):
            self.doc_tokens[doc_id] = token_lists[i].to(torch.int32)
            self.doc_titles[doc_id] = titles[i] if titles is not None else ""
        dirty = self.tree.append_leaves(emb)
        self.leaf_doc = append_rows(self._spare_rows, "leaf_doc", self.leaf_doc, torch.tensor(ids)[segment])
        self.leaf_span = append_rows(self._spare_rows, "leaf_span", self.leaf_span, span)
        self.last_update = UpdateStats(self._chunks_encoded, self._repair(dirty))
        return ids

    def _check_ids(self, doc_ids, what: str) -> torch.Tensor:
        ids = torch.as_tensor(
            list(doc_ids) if not isinstance(doc_ids, torch.Tensor) else doc_ids, dtype=torch.int64
        ).flatten()
        unknown = [int(i) for i in ids if int(i) not in self.doc_tokens]
        if unknown:
            raise KeyError(f"HierarchicalMemory.{what}: unknown doc_ids {unknown[:10]}")
        return ids

    def remove(self, doc_ids: Iterable[int]) -> None:
        """Remove documents for good: their tokens, leaves and keys are erased and the tree repaired.

        A removed chunk's leaf becomes a tombstone (zeros, never returned), so the other leaves keep
        their places; its ancestors are re-encoded from their remaining children. ``compact``
        reclaims the tombstones.
        """
        ids = self._check_ids(doc_ids, "remove")
        leaves = torch.nonzero(torch.isin(self.leaf_doc, ids)).flatten()
        for doc_id in ids.tolist():
            self.doc_tokens.pop(doc_id).zero_()  # its own copy: leave no trace in freed memory either
            del self.doc_titles[doc_id]
            self._masked.pop(doc_id, None)
        self.tree.kill_leaves(leaves)
        self.leaf_doc[leaves] = -1
        self.leaf_span[leaves] = -1
        self.last_update = UpdateStats(0, self._repair(leaves))

    def compact(self) -> None:
        """Drop the tombstones of removed chunks and rebuild the upper levels (leaf ids change).

        With the semantic layout the leaves are re-ordered as at build time. No chunk is re-encoded.
        """
        live = self.tree.live[0]
        emb, doc, span = self.tree.emb[0][live], self.leaf_doc[live], self.leaf_span[live]
        if self.config.layout == "semantic" and emb.shape[0] > 1:
            order = semantic_order(emb, self.config.fanout, seed=self.config.seed)
            emb, doc, span = emb[order], doc[order], span[order]
        self.tree.set_leaves(emb, torch.ones(emb.shape[0], dtype=torch.bool))
        self.leaf_doc, self.leaf_span = doc, span
        self.last_update = UpdateStats(0, self._repair(torch.arange(emb.shape[0])))

    def reindex(self) -> None:
        """Recompute every key and every level above the leaves after the level encoders or the
        ranker changed (e.g. after training). Leaf order, ids and tombstones stay; no chunk is re-encoded.
        """
        self.tree.set_leaves(self.tree.emb[0], self.tree.live[0])
        self.last_update = UpdateStats(0, self._repair(torch.arange(self.tree.num_leaves)))

    def _repair(self, dirty: torch.Tensor) -> int:
        encoded = self.tree.repair(dirty)
        self.leaf_doc = self.leaf_doc[: self.tree.num_leaves]
        self.leaf_span = self.leaf_span[: self.tree.num_leaves]
        self._changed()
        return encoded

    @contextlib.contextmanager
    def masked(self, doc_ids: Iterable[int]):
        """Hide documents from ``retrieve`` inside a ``with`` block (nestable; nothing is modified).

        A parent whose children are all hidden is hidden too, so beams are not spent on it.
        """
        ids = self._check_ids(doc_ids, "masked").tolist()
        self._masked.update(ids)
        self._visible_cache = None
        try:
            yield self
        finally:
            self._masked.subtract(ids)
            self._masked = +self._masked  # drop zero counts
            self._visible_cache = None

    def visible_masks(self) -> list[torch.Tensor] | None:
        """Per-level bool masks, top to bottom, of what retrieval may return (None: everything)."""
        if self._visible_cache is None or self._visible_cache[0] != self._version:
            leaf_visible = None
            if self._masked:
                leaf_visible = ~torch.isin(self.leaf_doc, torch.tensor(list(self._masked), dtype=torch.int64))
            masks = self.tree.visible(leaf_visible)
            self._visible_cache = (self._version, masks[::-1] if masks is not None else None)
        return self._visible_cache[1]

    # ------------------------------------------------------------------------------------- retrieval
    @torch.no_grad()
    def retrieve(
        self,
        queries,
        t: int | Sequence[int] | None = None,
        k: int | None = None,
        *,
        profile: bool = False,
        backend: str = "auto",
    ) -> RetrievalResult:
        """Descend the tree for a batch of queries.

        Args:
            queries: texts, token-id sequences, or query embeddings ``[B, D]`` / ``[B, P, D]``.
            t: nodes kept per level (an int, or one per level top to bottom); default ``config.t``.
            k: chunks returned (the leaf level's beam); default ``t`` at the leaves.
            profile: run the levels one ``descend`` at a time and time each (``level_seconds``).
            backend: the ops backend ("auto", "cpu", "triton", "reference", ...).
        """
        query = self.encode_queries(queries)
        batch, levels = query.shape[0], self.num_levels
        if levels == 0:
            empty = torch.empty(batch, 0, dtype=torch.int64)
            return RetrievalResult([], [], empty, empty.view(batch, 0, 2))
        t = self.config.t if t is None else t
        beams = [int(t)] * levels if not isinstance(t, Sequence) else [int(x) for x in t]
        if len(beams) != levels:
            raise ValueError(f"HierarchicalMemory.retrieve: t has {len(beams)} values for {levels} levels")
        if k is not None:
            beams[-1] = int(k)
        heights = list(range(levels, 0, -1))
        probes = self.ranker.probes_for(query, heights)
        keys = [self.tree.keys[h - 1] for h in heights]
        masks = self.visible_masks()
        if profile:
            selected, seconds = self.descend_levels(probes, keys, beams, masks, backend)
        else:
            selected = mk.descend_tree(
                probes, keys, self.config.fanout, beams, reduce=self.config.reduce, masks=masks, backend=backend
            )
            seconds = None
        ids, scores = [s[0] for s in selected], [s[1] for s in selected]
        return RetrievalResult(ids, scores, *self._backtrack(ids[-1]), seconds)

    def descend_levels(self, probes, keys, beams, masks, backend):
        """One ``descend`` per level from a virtual root over the top level, timing each.

        ``probes``, ``keys``, ``beams`` and ``masks`` (or None) are per level, top to bottom, and may
        stop above the leaves. Returns ``([(ids, scores), ...], seconds per level)``.
        """
        parents = torch.zeros(probes[0].shape[0], 1, dtype=torch.int64)  # a virtual root over the top level
        selected, seconds = [], []
        for level, (p, k, beam) in enumerate(zip(probes, keys, beams)):
            start = time.perf_counter()
            ids, scores = mk.descend(
                p,
                k,
                parents,
                self.config.fanout,
                beam,
                reduce=self.config.reduce,
                mask=None if masks is None else masks[level],
                backend=backend,
            )
            seconds.append(time.perf_counter() - start)
            selected.append((ids, scores))
            parents = ids
        return selected, seconds

    def _backtrack(self, leaf_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each selected leaf's document ``[B, k]`` and token span ``[B, k, 2]`` (``-1`` for none)."""
        if self._provenance is None or self._provenance[0] != self._version:
            # (doc, start, end) per leaf plus a trailing (-1, -1, -1) row that leaf id -1 indexes:
            # one gather per query batch, no masking.
            table = torch.cat([torch.cat([self.leaf_doc[:, None], self.leaf_span], 1), torch.full((1, 3), -1)])
            self._provenance = (self._version, table)
        rows = self._provenance[1][leaf_ids]
        return rows[..., 0], rows[..., 1:]

    def chunk_text(self, chunk: RetrievedChunk) -> str:
        """The text of a retrieved chunk (decoded from its stored tokens)."""
        return self.encoder.tokenizer.decode(
            self.doc_tokens[chunk.doc_id][chunk.token_start : chunk.token_end].tolist()
        )

    # ------------------------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Write the memory to one file, atomically (see ``mllm.persistence``)."""
        from .persistence import save_memory

        save_memory(self, path)

    @classmethod
    def load(cls, path, *, mmap: bool = False, verify: bool = True, encoder: ChunkEncoder | None = None):
        """Read a memory written by ``save``; ``mmap=True`` maps large level tensors instead of reading them."""
        from .persistence import load_memory

        return load_memory(path, mmap=mmap, verify=verify, encoder=encoder)
