"""End-to-end training of adjacent level pairs (k, k+1) of a memory, with the beam in the loop.

The design (``seeds/000_...``, Training) trains the hierarchy pair by pair: levels 1, 2, then
2, 3, ... For the pair (k, k+1) (1 = leaves) the trained parts are

* ``memory.level_encoders[k - 1]``, the ``LevelEncoder`` that builds level k+1 from level k, and
* the ranker's query and key projections at heights k and k+1 (``ranker.query_proj[k - 1]``,
  ``ranker.query_proj[k]``, ``ranker.key_proj[k - 1]``, ``ranker.key_proj[k]``),

so that the descent ranks the gold node first at both levels. Level-k embeddings (the stored
``memory.tree.emb[k - 1]``) are inputs and stay fixed; the chunk encoder is not trained.

**Beam in the loop.** Each step trains on the candidates the real descent produces, not on
random negatives: the memory's stored keys are descended (no grad, ``mllm_kernels.descend``,
beam ``t``) from the top down to level k+2; the children of that beam are the level-(k+1)
candidates, whose embeddings are recomputed differentiably by the LevelEncoder from their
(detached) level-k children and scored by ``ranker.score`` at height k+1. The children of the
top ``t`` of those scores are the level-k candidates, scored at height k. Each level contributes a
cross-entropy toward the gold node (the ancestor of the query's gold leaf). Only the few hundred
candidate rows are encoded per step, never a whole level.

After training, ``memory.reindex()`` recomputes every stored key and every level above the leaves
with the new weights. Train all pairs bottom up with :func:`train_hierarchy`; measure with
:func:`hit_rate`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "LevelPairConfig",
    "hit_rate",
    "level_pair_loss",
    "pair_parameters",
    "train_hierarchy",
    "train_level_pair",
]


@dataclasses.dataclass
class LevelPairConfig:
    """Hyper-parameters of :func:`train_level_pair`.

    Attributes:
        steps: optimizer steps.
        batch_size: queries per step (sampled without replacement, epoch by epoch).
        lr: AdamW learning rate.
        t: beam of the in-loop descent (nodes kept per level); None: ``memory.config.t``.
        temperature: the scores (cosines for an untrained ranker, so in [-1, 1]) are divided by it
            before the softmax; small values make the cross-entropy sharp enough to matter.
        weight_decay: AdamW decay. 0 by default: the projections start as the identity and decay
            would pull them towards zero, not towards that start.
        grad_clip: max global gradient norm (None: no clipping).
        reindex_every: also call ``memory.reindex()`` every this many steps (0: only at the end).
            Levels above k+1 are built from level k+1, which changes as the pair trains, so the
            stored keys the in-loop descent reads above k+1 grow stale; that only changes which
            hard negatives the beam supplies (the gold ancestor is added when missing), and a
            reindex costs one pass over every level, so it is off by default.
        seed: seed of the batch sampling.
    """

    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    t: int | None = 4
    temperature: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    reindex_every: int = 0
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "reindex_every"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"LevelPairConfig: {name} must be >= 0, got {getattr(self, name)}")
        if int(self.batch_size) < 1:
            raise ValueError(f"LevelPairConfig: batch_size must be >= 1, got {self.batch_size}")
        if self.t is not None and int(self.t) < 1:
            raise ValueError(f"LevelPairConfig: t must be >= 1 or None, got {self.t}")
        for name in ("lr", "temperature"):
            value = float(getattr(self, name))
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"LevelPairConfig: {name} must be a finite number > 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"LevelPairConfig: weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"LevelPairConfig: grad_clip must be > 0 or None, got {self.grad_clip}")


# ------------------------------------------------------------------------------------------ checks
def _check_memory_level(memory, level, what: str) -> None:
    levels = memory.num_levels
    if levels < 2:
        raise ValueError(
            f"{what}: the memory has {levels} level(s); training a level pair needs at least 2 "
            f"(more than fanout={memory.config.fanout} leaves)"
        )
    if isinstance(level, bool) or not isinstance(level, int):
        raise TypeError(f"{what}: level must be an int, got {type(level).__name__}")
    if not 1 <= level <= levels - 1:
        raise ValueError(
            f"{what}: level must be in [1, {levels - 1}] (the pair (level, level+1) of a memory with "
            f"{levels} levels; 1 = leaves), got {level}"
        )


def _check_queries_and_gold(memory, queries, gold_leaves, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Query chunk embeddings ``[Q, P, D]`` float32 (no grad) and gold leaf ids int64 ``[Q]``."""
    if isinstance(gold_leaves, torch.Tensor):
        gold = gold_leaves
    else:
        try:
            gold = torch.as_tensor(list(gold_leaves))
        except (TypeError, ValueError) as error:
            raise TypeError(f"{what}: gold_leaves must be a sequence or tensor of leaf ids: {error}") from error
    if gold.dtype == torch.bool or gold.is_floating_point() or gold.is_complex():
        raise TypeError(f"{what}: gold_leaves must hold integer leaf ids, got dtype {gold.dtype}")
    if gold.dim() != 1:
        raise ValueError(f"{what}: gold_leaves must be 1-D [Q], got shape {tuple(gold.shape)}")
    gold = gold.to(torch.int64).cpu()
    with torch.no_grad():
        query = memory.encode_queries(queries).detach()
    if query.shape[0] != gold.shape[0]:
        raise ValueError(f"{what}: {query.shape[0]} queries but {gold.shape[0]} gold_leaves (one gold leaf per query)")
    if gold.numel() == 0:
        raise ValueError(f"{what}: no queries")
    leaves = memory.num_leaves
    bad = torch.nonzero((gold < 0) | (gold >= leaves)).flatten()
    if bad.numel():
        i = int(bad[0])
        raise IndexError(f"{what}: gold_leaves[{i}] = {int(gold[i])} is not a leaf id in [0, {leaves})")
    masks = memory.visible_masks()
    visible = memory.tree.live[0] if masks is None else masks[-1]
    hidden = torch.nonzero(~visible.cpu()[gold]).flatten()
    if hidden.numel():
        i = int(hidden[0])
        reason = "removed (a tombstone)" if not bool(memory.tree.live[0][gold[i]]) else "masked"
        raise ValueError(f"{what}: gold_leaves[{i}] = {int(gold[i])} is {reason}; retrieval can never return it")
    return query, gold


# ------------------------------------------------------------------------------------ the training
def pair_parameters(memory, level: int) -> list[torch.nn.Parameter]:
    """The parameters trained for the pair (level, level+1): one LevelEncoder and four ranker projections."""
    ranker = memory.ranker
    modules = [
        memory.level_encoders[level - 1],
        ranker.query_proj[level - 1],
        ranker.query_proj[level],
        ranker.key_proj[level - 1],
        ranker.key_proj[level],
    ]
    return [p for module in modules for p in module.parameters()]


def _visible(memory, height: int) -> torch.Tensor:
    """Bool ``[N_h]``: nodes at ``height`` (1 = leaves) that retrieval may return now."""
    masks = memory.visible_masks()
    return memory.tree.live[height - 1] if masks is None else masks[memory.num_levels - height]


@torch.no_grad()
def _beam_parents(memory, query: torch.Tensor, level: int, t: int) -> torch.Tensor:
    """Ids ``[B, T]`` int64 of the level-(level+2) nodes the real descent keeps (``-1`` = empty slot).

    Above the top there is nothing to descend: a virtual root (node 0, whose ``fanout`` children
    cover the whole top level) stands for the parent level, as in ``retrieve(profile=True)``.
    """
    heights = list(range(memory.num_levels, level + 1, -1))  # top .. level+2, empty when level+1 is the top
    if not heights:
        return torch.zeros(query.shape[0], 1, dtype=torch.int64, device=query.device)
    masks = memory.visible_masks()
    selected, _ = memory.descend_levels(
        memory.ranker.probes_for(query, heights),
        [memory.tree.keys[h - 1] for h in heights],
        [t] * len(heights),
        None if masks is None else masks[: len(heights)],
        "auto",
    )
    return selected[-1][0]


def _with_gold(parents: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``parents [B, T]`` plus one column holding ``gold [B]`` where the row lacks it (else ``-1``).

    Returns the widened ids ``[B, T + 1]`` and whether the gold node was already there ``[B]``.
    """
    present = (parents == gold[:, None]).any(1)
    extra = torch.where(present, torch.full_like(gold, -1), gold)
    return torch.cat([parents, extra[:, None]], 1), present


def _score_level(memory, query, parents, height, children_of):
    """Differentiable scores of the children (at ``height``) of the parent ids ``parents [B, T]``.

    ``ranker.score`` addresses children implicitly (``parent * fanout + j``) in a whole level's key
    table; encoding a whole level per step would cost O(N). So the distinct parents of the batch
    are renumbered 0..U-1 and their children laid out in a local table of ``U * fanout`` rows
    (missing, dead and masked children masked out), which the op then addresses the same way.

    ``children_of(ids [M]) -> [M, D]`` gives the (differentiable) embeddings of global node ids.
    ``parents`` holds real parent ids, or the virtual root 0 when ``height`` is the top.
    Returns ``(scores [B, T * fanout] float32, child_ids [B, T * fanout] int64 global, -1 = none)``.
    """
    fanout = memory.config.fanout
    visible = _visible(memory, height)
    unique = torch.unique(parents[parents >= 0])  # sorted
    local = torch.where(parents >= 0, torch.searchsorted(unique, parents.clamp(min=0)), -1)
    child = (unique[:, None] * fanout + torch.arange(fanout, device=unique.device)).flatten()  # [U * fanout]
    valid = child < visible.shape[0]
    valid[valid.clone()] = visible[child[valid]]
    rows = torch.nonzero(valid).flatten()
    emb = children_of(child[rows])
    table = emb.new_zeros(child.shape[0], emb.shape[1]).index_copy(0, rows, emb)
    scores, local_ids = memory.ranker.score(
        query, table, height, local, fanout, reduce=memory.config.reduce, mask=valid
    )
    child_ids = torch.where(local_ids >= 0, child[local_ids.clamp(min=0)], -1)
    return scores, child_ids


def _encoded_nodes(memory, level: int):
    """``ids [M] -> [M, D]``: level-(level+1) embeddings recomputed by the trained LevelEncoder from
    their stored (detached) live level-``level`` children, exactly as ``Tree._encode_parents`` does."""
    fanout, encoder = memory.config.fanout, memory.level_encoders[level - 1]
    below_emb, below_live = memory.tree.emb[level - 1], memory.tree.live[level - 1]

    def encode(ids: torch.Tensor) -> torch.Tensor:
        children = ids[:, None] * fanout + torch.arange(fanout, device=ids.device)
        valid = children < below_emb.shape[0]
        valid[valid.clone()] = below_live[children[valid]]
        offsets = F.pad(valid.sum(1).cumsum(0), (1, 0))  # every visible node has a live child
        return encoder(below_emb[children[valid]].detach(), offsets).float()

    return encode


def _stored_nodes(memory, level: int):
    below = memory.tree.emb[level - 1]
    return lambda ids: below[ids].detach()


def _cross_entropy(scores: torch.Tensor, ids: torch.Tensor, gold: torch.Tensor, temperature: float):
    """Mean cross-entropy over the batch toward the column of ``ids [B, C]`` equal to ``gold [B]``."""
    hits = ids == gold[:, None]
    if not bool(hits.any(1).all()):  # the candidate construction guarantees it; fail loudly if not
        raise RuntimeError("train_level_pair: a gold node is missing from its candidates (internal error)")
    return F.cross_entropy(scores / temperature, hits.float().argmax(1))


def _top_t(scores: torch.Tensor, ids: torch.Tensor, t: int) -> torch.Tensor:
    """The ids ``[B, t]`` of the ``t`` best finite scores (``-1`` where fewer), as ``descend`` picks them
    (but equal scores in any order: the training does not depend on them)."""
    top = scores.topk(min(t, scores.shape[1]), dim=1)
    picked = ids.gather(1, top.indices)
    picked = torch.where(torch.isfinite(top.values), picked, -1)
    return F.pad(picked, (0, t - picked.shape[1]), value=-1)


def level_pair_loss(
    memory, query: torch.Tensor, gold: torch.Tensor, level: int, t: int, temperature: float
) -> tuple[torch.Tensor, dict]:
    """The loss of one batch for the pair (``level``, ``level + 1``), with the beam in the loop.

    The building block of :func:`train_level_pair` (steps 1-3 there), public for custom loops,
    e.g. training the tree jointly with an LM. Inputs are not checked here.

    Args:
        query: query chunk embeddings ``[B, P, D]`` float32 (``memory.encode_queries``), no grad.
        gold: int64 ``[B]`` gold leaf ids, visible (live and not masked).
        level: k >= 1 with k + 1 <= ``memory.num_levels``.
        t: beam of the in-loop descent.
        temperature: the scores are divided by it before the softmax.

    Returns:
        ``(loss, metrics)``: the scalar float32 loss (the two cross-entropies summed, each a batch
        mean), differentiable with respect to ``pair_parameters(memory, level)``; and floats
        ``loss_k``, ``loss_k1``, ``beam_hit_k2``, ``hit_rate_k1``, ``hit_rate_k`` as documented
        in :func:`train_level_pair`.
    """
    fanout = memory.config.fanout
    gold_k = gold // fanout ** (level - 1)
    gold_k1 = gold_k // fanout
    top = level + 1 == memory.num_levels
    # Level k+1: the children of the descent's beam at k+2 (all top nodes under the virtual root).
    beam = _beam_parents(memory, query, level, t)
    if top:
        parents, beam_hit = beam, torch.ones_like(gold, dtype=torch.bool)
    else:
        parents, beam_hit = _with_gold(beam, gold_k1 // fanout)
    scores_k1, ids_k1 = _score_level(memory, query, parents, level + 1, _encoded_nodes(memory, level))
    loss_k1 = _cross_entropy(scores_k1, ids_k1, gold_k1, temperature)
    # Level k: the children of what the descent keeps at k+1 (the top t by the current scores,
    # i.e. as if the beam above had kept the gold ancestor), plus the gold node if missed.
    with torch.no_grad():
        keep = _top_t(scores_k1.detach(), ids_k1, t)
        parents_k, hit_k1 = _with_gold(keep, gold_k1)
    scores_k, ids_k = _score_level(memory, query, parents_k, level, _stored_nodes(memory, level))
    loss_k = _cross_entropy(scores_k, ids_k, gold_k, temperature)
    with torch.no_grad():
        hit_k = (_top_t(scores_k.detach(), ids_k, t) == gold_k[:, None]).any(1)
    metrics = {
        "loss_k": float(loss_k.detach()),
        "loss_k1": float(loss_k1.detach()),
        "beam_hit_k2": float(beam_hit.float().mean()),
        "hit_rate_k1": float(hit_k1.float().mean()),
        "hit_rate_k": float(hit_k.float().mean()),
    }
    return loss_k + loss_k1, metrics


def train_level_pair(
    memory, queries, gold_leaves, level: int, config: LevelPairConfig | None = None, *, progress: bool = False
) -> list[dict]:
    """Train the pair of levels (``level``, ``level + 1``) end to end, with the descent's beam in the loop.

    Args:
        memory: a ``HierarchicalMemory`` with at least ``level + 1`` levels.
        queries: query chunk embeddings ``[Q, P, D]`` / ``[Q, D]`` float, or anything
            ``memory.encode_queries`` accepts (texts, token ids); encoded once, without grad.
        gold_leaves: int64 ``[Q]`` (or a sequence of ints): the leaf id holding each query's answer;
            live and not masked.
        level: k, 1 = leaves; trains ``memory.level_encoders[k - 1]`` (level k+1 from level k) and
            the ranker's query/key projections at heights k and k+1.
        config: a ``LevelPairConfig`` (defaults when None).
        progress: show a progress bar.

    Each step samples ``batch_size`` queries and

    1. descends the memory's stored keys (no grad, beam ``t``) from the top to level k+2; when
       k+1 is the top level there is nothing to descend and every top node is a candidate;
    2. takes the children of that beam as level-(k+1) candidates, recomputes their embeddings with
       the LevelEncoder from their detached level-k children, scores them with ``ranker.score``
       (height k+1) and adds the cross-entropy toward the gold leaf's level-(k+1) ancestor. If the
       beam lost the gold's level-(k+2) ancestor, that node is **added to the beam** (its children
       join the candidates), so the target exists: the miss belongs to the pair above;
    3. keeps the top ``t`` level-(k+1) candidates by those scores, as the descent would (plus the
       gold level-(k+1) ancestor when they miss it, for the same reason), and adds the
       cross-entropy of their children, scored at height k, toward the gold's level-k ancestor
       (the gold leaf itself when k = 1).

    Dead (tombstoned) and masked nodes are never candidates. Scores are divided by
    ``config.temperature``. At the end ``memory.reindex()`` recomputes every key and every level
    above the leaves with the new weights.

    Returns:
        one dict per step: ``step``, ``loss`` (the sum), ``loss_k``, ``loss_k1``, ``beam_hit_k2``
        (fraction of the batch whose level-(k+2) ancestor the descent kept; 1.0 at the top),
        ``hit_rate_k1`` (gold level-(k+1) node among the top t of its candidates) and
        ``hit_rate_k`` (gold level-k node among the top t of its candidates), all measured
        before that step's update, and ``seconds``.
    """
    what = "train_level_pair"
    config = config or LevelPairConfig()
    if not isinstance(config, LevelPairConfig):
        raise TypeError(f"{what}: config must be a LevelPairConfig, got {type(config).__name__}")
    _check_memory_level(memory, level, what)
    query, gold = _check_queries_and_gold(memory, queries, gold_leaves, what)
    t = int(config.t if config.t is not None else memory.config.t)
    device = memory.tree.emb[0].device
    query, gold = query.to(device), gold.to(device)

    params = [p for p in pair_parameters(memory, level) if p.requires_grad]  # frozen parts stay frozen
    if not params:
        raise ValueError(f"{what}: every parameter of the pair ({level}, {level + 1}) has requires_grad=False")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    order, position = torch.zeros(0, dtype=torch.int64), 0
    batch_size = min(config.batch_size, gold.numel())

    from tqdm.auto import tqdm

    rows = []
    try:
        for step in tqdm(range(config.steps), desc=f"training levels ({level}, {level + 1})", disable=not progress):
            start = time.perf_counter()
            if position + batch_size > order.numel():  # a new epoch: every query once before any twice
                order, position = torch.randperm(gold.numel(), generator=generator), 0
            batch = order[position : position + batch_size].to(device)
            position += batch_size
            loss, metrics = level_pair_loss(memory, query[batch], gold[batch], level, t, config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            if config.reindex_every and (step + 1) % config.reindex_every == 0 and step + 1 < config.steps:
                memory.reindex()
            rows.append({"step": step, "loss": float(loss.detach()), **metrics, "seconds": time.perf_counter() - start})
    finally:
        optimizer.zero_grad(set_to_none=True)
        # Even an interrupted run has moved the weights: keep stored keys and levels consistent with them.
        memory.reindex()
    return rows


def train_hierarchy(
    memory, queries, gold_leaves, config: LevelPairConfig | None = None, *, progress: bool = False
) -> dict[int, list[dict]]:
    """Train every pair (1, 2), (2, 3), ..., (L-1, L) in turn, **bottom up**; returns ``{k: rows}``.

    Bottom up, because the pair (k, k+1) reads level k as fixed input, and level k is built by the
    encoders below it: training bottom up, each pair sees the final embeddings of its input level
    (``train_level_pair`` reindexes after every pair). Top down would train the upper pairs on
    levels that later change under them. The ranker at height k+1 is shared by the pairs (k, k+1)
    and (k+1, k+2); the later pair fine-tunes it on the final level-(k+1) embeddings.
    Arguments are those of :func:`train_level_pair`.
    """
    _check_memory_level(memory, 1, "train_hierarchy")
    query, gold = _check_queries_and_gold(memory, queries, gold_leaves, "train_hierarchy")
    return {
        level: train_level_pair(memory, query, gold, level, config, progress=progress)
        for level in range(1, memory.num_levels)
    }


@torch.no_grad()
def hit_rate(memory, queries, gold_leaves, t: int | Sequence[int] | None = None, k: int | None = None) -> float:
    """Fraction of queries whose gold leaf is among the leaves ``memory.retrieve(queries, t=t, k=k)`` returns.

    Args:
        queries: as for ``retrieve`` (``[Q, P, D]`` / ``[Q, D]`` float embeddings, texts, token ids).
        gold_leaves: int64 ``[Q]`` leaf ids (live and not masked).
        t, k: the beam per level (int or one per level, top to bottom) and the leaves returned.
    """
    query, gold = _check_queries_and_gold(memory, queries, gold_leaves, "hit_rate")
    leaf_ids = memory.retrieve(query, t=t, k=k).leaf_ids
    return float((leaf_ids.cpu() == gold[:, None]).any(1).float().mean())
