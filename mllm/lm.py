"""MemoryAugmentedLM: a Hugging Face causal LM that reads a ``HierarchicalMemory`` as a soft prefix.

For each prompt, the memory is searched with a query (``HierarchicalMemory.retrieve``); the nodes
selected at every level of the tree, coarse (top) to fine (leaves), are gathered from the level
embeddings, tagged with their level, projected to the LM width by a ``MemoryProjector`` and put
before the prompt's token embeddings. The LM is frozen by default and the memory is read without
gradient, so ``train_projector`` trains only the projector.

Layout of the sequence the LM sees, per row (M memory slots, then the T prompt positions)::

    [invalid memory slots][valid memory slots, coarse -> fine][prompt (padded as given)]

Invalid slots (node id ``-1``: a level with fewer nodes than the beam, or nodes hidden by
``memory.masked``) are moved to the very left and masked out, so that for the LM they are plain
left padding. Position ids are the running count of attended positions, so neither masked memory
slots nor the prompt's own left padding shift the positions of what follows.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from .memory import HierarchicalMemory
from .results import RetrievalResult

IGNORE_INDEX = -100  # the label Hugging Face losses skip


class MemoryProjector(nn.Module):
    """Memory embeddings ``[..., d_memory]`` -> LM input embeddings ``[..., hidden_size]``.

    A learned tag per tree level (by height: 1 = leaves, 2 = their parents, ...) is added to each
    embedding first, so the LM can tell a leaf (a chunk) from a summary node of the same content.
    Then a LayerNorm and a two-layer MLP (Linear, GELU, Linear), as in LLaVA-style projectors. The output layer
    starts small (``init_std``), so an untrained projector gives near-zero prefix embeddings that
    barely disturb the LM.

    Args:
        d_memory: width D of the memory's embeddings (``memory.config.d_model``).
        hidden_size: width H of the LM's input embeddings.
        num_heights: number of level tags (``memory.config.max_levels``).
        init_std: standard deviation of the output layer's initial weights.
    """

    def __init__(self, d_memory: int, hidden_size: int, num_heights: int, *, init_std: float = 0.01):
        super().__init__()
        for name, value in (("d_memory", d_memory), ("hidden_size", hidden_size), ("num_heights", num_heights)):
            if int(value) < 1:
                raise ValueError(f"MemoryProjector: {name} must be >= 1, got {value}")
        self.d_memory, self.hidden_size, self.num_heights = int(d_memory), int(hidden_size), int(num_heights)
        self.level_tag = nn.Embedding(self.num_heights, self.d_memory)
        nn.init.normal_(self.level_tag.weight, std=0.02)
        # Memory embeddings are often unit-norm (entries ~ 1/sqrt(D)); standardising them gives the
        # first layer inputs of unit scale, which it learns from many times faster.
        self.norm = nn.LayerNorm(self.d_memory)
        self.net = nn.Sequential(
            nn.Linear(self.d_memory, self.hidden_size), nn.GELU(), nn.Linear(self.hidden_size, self.hidden_size)
        )
        nn.init.normal_(self.net[2].weight, std=init_std)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, embeddings: torch.Tensor, heights: torch.Tensor) -> torch.Tensor:
        """``embeddings [B, M, D]`` float, ``heights [M]`` or ``[B, M]`` int64 (1 = leaves) -> ``[B, M, H]``.

        The output has the projector's dtype.
        """
        if embeddings.shape[-1] != self.d_memory:
            raise ValueError(
                f"MemoryProjector: embeddings are {embeddings.shape[-1]} wide, the projector expects {self.d_memory}"
            )
        if heights.numel() and (int(heights.min()) < 1 or int(heights.max()) > self.num_heights):
            raise ValueError(
                f"MemoryProjector: heights must be in [1, {self.num_heights}], "
                f"got [{int(heights.min())}, {int(heights.max())}]"
            )
        weight = self.net[0].weight
        x = embeddings.to(weight.dtype) + self.level_tag(heights.to(weight.device) - 1)
        return self.net(self.norm(x))


class MemoryAugmentedLM(nn.Module):
    """A causal LM (any Hugging Face ``PreTrainedModel`` with ``get_input_embeddings()``) plus a memory.

    Args:
        lm: the causal LM; H is the width of its input embeddings (usually ``lm.config.hidden_size``).
        memory: the ``HierarchicalMemory`` to read. It is deliberately **not** a submodule: its
            state lives outside the weights (``memory.save``), ``model.to(...)`` does not move it,
            and ``model.parameters()`` does not include its encoders. Retrieval runs where the
            memory is; the gathered embeddings are moved to the projector's device.
        t, k: beam per level and leaf beam passed to ``memory.retrieve`` (defaults: the memory's).
        max_levels: read only the ``max_levels`` finest levels (the leaves and their nearest
            ancestors); default: every level.
        freeze_lm: freeze the LM's weights and keep it in eval mode (no dropout) even in
            ``model.train()``.
        tokenizer: the LM's tokenizer (anything with ``decode(list[int]) -> str``); only needed to
            use the prompt itself as the memory query when ``memory_queries`` is not given.
        projector: a ``MemoryProjector`` to use (e.g. a trained one); default: a fresh one.
    """

    def __init__(
        self,
        lm: nn.Module,
        memory: HierarchicalMemory,
        *,
        t: int | Sequence[int] | None = None,
        k: int | None = None,
        max_levels: int | None = None,
        freeze_lm: bool = True,
        tokenizer=None,
        projector: MemoryProjector | None = None,
    ):
        super().__init__()
        if not hasattr(lm, "get_input_embeddings") or not callable(getattr(lm, "forward", None)):
            raise TypeError(f"MemoryAugmentedLM: lm must be a Hugging Face causal LM, got {type(lm).__name__}")
        if not isinstance(memory, HierarchicalMemory):
            raise TypeError(f"MemoryAugmentedLM: memory must be a HierarchicalMemory, got {type(memory).__name__}")
        if max_levels is not None and int(max_levels) < 1:
            raise ValueError(f"MemoryAugmentedLM: max_levels must be >= 1, got {max_levels}")
        embeddings = lm.get_input_embeddings()
        # The width of inputs_embeds is the input embedding's, which is config.hidden_size except
        # for models that project their embeddings (e.g. OPT-350m).
        hidden = getattr(embeddings, "embedding_dim", None) or lm.config.hidden_size
        if projector is None:
            projector = MemoryProjector(memory.config.d_model, hidden, memory.config.max_levels)
        elif projector.d_memory != memory.config.d_model:
            raise ValueError(
                f"MemoryAugmentedLM: projector takes {projector.d_memory}-wide embeddings but the memory's "
                f"d_model is {memory.config.d_model}"
            )
        elif projector.hidden_size != hidden:
            raise ValueError(
                f"MemoryAugmentedLM: projector gives {projector.hidden_size}-wide embeddings but the lm's "
                f"hidden size is {hidden}"
            )
        self.lm = lm
        object.__setattr__(self, "memory", memory)  # not registered: see the class docstring
        self.projector = projector.to(embeddings.weight.device)
        self.t, self.k = t, k
        self.max_levels = None if max_levels is None else int(max_levels)
        self.freeze_lm = freeze_lm
        self.tokenizer = tokenizer
        if freeze_lm:
            lm.requires_grad_(False)
            lm.eval()
        # GPT-2 and Llama take position_ids; a model that does not derives positions itself.
        self._lm_takes_position_ids = "position_ids" in inspect.signature(lm.forward).parameters

    def train(self, mode: bool = True) -> MemoryAugmentedLM:
        super().train(mode)
        if self.freeze_lm:
            self.lm.eval()  # dropout in a frozen LM would only add noise to the projector's gradient
        return self

    # ------------------------------------------------------------------------------------ retrieval
    def retrieve(self, queries) -> RetrievalResult:
        """``memory.retrieve(queries, t=self.t, k=self.k)`` (query embeddings moved to the memory's device)."""
        if isinstance(queries, torch.Tensor) and queries.is_floating_point():
            queries = queries.detach().to(self.memory.tree.emb[0].device)
        return self.memory.retrieve(queries, t=self.t, k=self.k)

    def gather(self, queries, memory: HierarchicalMemory | None = None):
        """Retrieve for a batch of B queries and gather the selected nodes' embeddings, unprojected.

        Args:
            queries: what ``memory.encode_queries`` accepts: texts, token-id sequences of the
                memory's tokenizer, or query embeddings ``[B, D]`` / ``[B, P, D]``.
            memory: the memory to read (default: ``self.memory``); e.g. one memory per example
                when each example has its own haystack.

        Returns:
            ``(embeddings [B, M, D] float32, heights [M] int64, valid [B, M] bool)``: the nodes
            retrieved at every read level, coarse (top) to fine (leaves), each level's beam best
            first; ``M = sum of the beams``; zero where ``valid`` is False (no node). Detached:
            the memory is read without gradient. Can be computed once and passed to ``forward``
            as ``gathered=`` while the memory and its ranker do not change.
        """
        memory = self.memory if memory is None else memory
        if isinstance(queries, torch.Tensor) and queries.is_floating_point():
            queries = queries.detach().to(memory.tree.emb[0].device)
        result = memory.retrieve(queries, t=self.t, k=self.k)
        levels = memory.num_levels
        if levels == 0:
            raise ValueError("MemoryAugmentedLM: the memory is empty; add documents before reading it")
        first = levels - min(levels, self.max_levels or levels)  # index in result.ids (top -> bottom)
        gathered, heights, valid = [], [], []
        with torch.no_grad():
            for j in range(first, levels):
                ids, height = result.ids[j], levels - j
                table = memory.tree.emb[height - 1]
                ok = ids >= 0
                gathered.append(table[ids.clamp(min=0).to(table.device)].float() * ok[..., None].to(table.device))
                heights.append(torch.full((ids.shape[1],), height, dtype=torch.int64))
                valid.append(ok)
        return torch.cat(gathered, 1).detach(), torch.cat(heights), torch.cat(valid, 1)

    def memory_embeddings(self, queries=None, gathered=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The projected memory prefix for a batch of B queries (or of ``gathered``, see ``gather``).

        Returns:
            ``(embeddings [B, M, H], valid [B, M] bool)`` in ``gather``'s slot order, with the
            projector's dtype and device, zero where ``valid`` is False (no node). Gradients reach
            the projector only.
        """
        embeddings, heights, valid = self.gather(queries) if gathered is None else gathered
        if embeddings.dim() != 3 or valid.shape != embeddings.shape[:2] or heights.shape[-1] != embeddings.shape[1]:
            raise ValueError(
                "MemoryAugmentedLM: gathered must be (embeddings [B, M, D], heights [M] or [B, M], valid [B, M]), got "
                f"{tuple(embeddings.shape)}, {tuple(heights.shape)}, {tuple(valid.shape)}"
            )
        device = self.projector.net[0].weight.device
        valid = valid.to(device)
        projected = self.projector(embeddings.detach().to(device), heights.to(device))
        return projected * valid[..., None].to(projected.dtype), valid

    # ---------------------------------------------------------------------------------------- inputs
    def _queries(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory_queries):
        if memory_queries is not None:
            return memory_queries
        if self.tokenizer is None:
            raise ValueError(
                "MemoryAugmentedLM: memory_queries is required (texts, token ids of the memory's tokenizer, or "
                "query embeddings [B, D]); input_ids are token ids of the LM, which the memory cannot read. "
                "Pass tokenizer= to the constructor to use the decoded prompt as the query instead."
            )
        special = set(getattr(self.tokenizer, "all_special_ids", None) or ())
        texts = []
        for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            texts.append(self.tokenizer.decode([i for i, m in zip(row, mask) if m and i not in special]))
        return texts

    def prepare_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, memory_queries=None, gathered=None
    ) -> dict[str, torch.Tensor]:
        """The LM's inputs for ``[memory prefix, prompt]``, ready for ``lm(**inputs)``.

        The prefix comes from ``gathered`` (what ``gather`` returned for these rows) when given,
        else from retrieving ``memory_queries``.

        Returns a dict with ``inputs_embeds [B, M + T, H]`` (the LM's embedding dtype),
        ``attention_mask [B, M + T]`` (the prompt mask's dtype; invalid memory slots are 0 and
        come first) and, when the LM takes them, ``position_ids [B, M + T]`` int64.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"MemoryAugmentedLM: input_ids must be an integer tensor [B, T], got {shape}")
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"MemoryAugmentedLM: attention_mask is {tuple(attention_mask.shape)} but input_ids is "
                f"{tuple(input_ids.shape)}"
            )
        if gathered is None:
            queries = self._queries(input_ids, attention_mask, memory_queries)
            count = 1 if isinstance(queries, str) else len(queries)
            if count != batch:
                raise ValueError(
                    f"MemoryAugmentedLM: memory_queries has {count} queries but input_ids has {batch} rows"
                )
            memory, valid = self.memory_embeddings(queries)
        else:
            if memory_queries is not None:
                raise ValueError("MemoryAugmentedLM: pass memory_queries or gathered, not both")
            memory, valid = self.memory_embeddings(gathered=gathered)
            if memory.shape[0] != batch:
                raise ValueError(f"MemoryAugmentedLM: gathered has {memory.shape[0]} rows but input_ids has {batch}")
        # Invalid slots to the very left, valid ones after them in their coarse-to-fine order (a
        # stable sort): the invalid slots then act exactly like left padding.
        order = torch.argsort(valid.to(torch.int8), dim=1, stable=True)
        memory = memory.gather(1, order[..., None].expand_as(memory))
        valid = valid.gather(1, order)
        tokens = self.lm.get_input_embeddings()(input_ids)
        embeds = torch.cat([memory.to(device=tokens.device, dtype=tokens.dtype), tokens], 1)
        mask = torch.cat([valid.to(tokens.device, attention_mask.dtype), attention_mask.to(tokens.device)], 1)
        # Positions count attended tokens only, so masked slots (in front, or the prompt's own left
        # padding between the memory and the prompt) leave no gap; masked positions get 0.
        inputs = {"inputs_embeds": embeds, "attention_mask": mask}
        if self._lm_takes_position_ids:
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return inputs

    @staticmethod
    def _reject(kwargs: dict, names: tuple[str, ...], where: str) -> None:
        for name in names:
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"MemoryAugmentedLM.{where}: {name} is built from input_ids and the memory; do not pass it"
                )

    # --------------------------------------------------------------------------------------- running
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        memory_queries=None,
        gathered=None,
        **kwargs,
    ):
        """Run the LM on ``[memory prefix, prompt]``.

        Args:
            input_ids: the prompt, token ids of the LM ``[B, T]`` int64 (left or right padded).
            attention_mask: ``[B, T]`` (1 = token, 0 = padding); default all ones.
            labels: ``[B, T]`` int64 for the prompt (``-100`` = ignored); the memory slots get
                ``-100``. As usual for causal LMs the labels are shifted inside the LM's loss, so
                the first prompt token's label is predicted from the last memory slot.
            memory_queries: the queries of the memory, one per row (see ``memory_embeddings``);
                default: the decoded prompt, which needs ``tokenizer=`` in the constructor.
            gathered: instead of ``memory_queries``, the output of ``gather`` for these rows.
            **kwargs: passed to the LM (not ``inputs_embeds`` or ``position_ids``).

        Returns:
            the LM's output over ``M + T`` positions: ``logits [B, M + T, V]``, whose last T
            positions are the prompt's, and ``loss`` when ``labels`` are given.
        """
        self._reject(kwargs, ("inputs_embeds", "position_ids"), "forward")
        inputs = self.prepare_inputs(input_ids, attention_mask, memory_queries, gathered)
        memory_len = inputs["inputs_embeds"].shape[1] - input_ids.shape[1]
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"MemoryAugmentedLM.forward: labels is {tuple(labels.shape)} but input_ids is "
                    f"{tuple(input_ids.shape)}"
                )
            labels = torch.cat([labels.new_full((labels.shape[0], memory_len), IGNORE_INDEX), labels], 1)
            labels = labels.to(inputs["inputs_embeds"].device)
        return self.lm(**inputs, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        memory_queries=None,
        gathered=None,
        **generate_kwargs,
    ):
        """Generate after ``[memory prefix, prompt]`` with ``lm.generate(inputs_embeds=..., ...)``.

        Prompts of different lengths should be **left** padded (as for any decoder-only
        ``generate``). ``generate_kwargs`` go to ``lm.generate`` (``max_new_tokens``,
        ``do_sample``, ...). Returns the new tokens only, ``[B, <= max_new_tokens]`` int64 (or
        the LM's generate output object when ``return_dict_in_generate=True``).
        """
        self._reject(generate_kwargs, ("inputs_embeds", "position_ids"), "generate")
        # Passing position_ids keeps forward's convention; generate() extends them by one per new token.
        inputs = self.prepare_inputs(input_ids, attention_mask, memory_queries, gathered)
        return self.lm.generate(**inputs, **generate_kwargs)


# ------------------------------------------------------------------------------------------ training
def _collate_queries(queries: list):
    """Per-example memory queries -> one batch ``memory.encode_queries`` accepts."""
    embedded = [isinstance(q, torch.Tensor) and q.is_floating_point() for q in queries]
    if all(embedded):
        shapes = {tuple(q.shape) for q in queries}
        if len(shapes) != 1:
            raise ValueError(f"train_projector: query embeddings of one batch differ in shape: {sorted(shapes)}")
        return torch.stack(queries)
    if any(embedded):
        raise ValueError("train_projector: examples mix query embeddings with texts / token ids")
    return [q.tolist() if isinstance(q, torch.Tensor) else q for q in queries]


def _collate(batch: list, pad_id: int = 0):
    """``(memory_query, prompt_ids, answer_ids)`` examples -> queries, input_ids, attention_mask, labels.

    Each row is prompt + answer, right padded; labels are the answer tokens, ``-100`` elsewhere.
    """
    rows, label_rows = [], []
    for i, (_, prompt, answer) in enumerate(batch):
        prompt = torch.as_tensor(prompt, dtype=torch.int64).flatten()
        answer = torch.as_tensor(answer, dtype=torch.int64).flatten()
        if answer.numel() == 0:
            raise ValueError(f"train_projector: example {i} of the batch has no answer tokens")
        rows.append(torch.cat([prompt, answer]))
        label_rows.append(torch.cat([torch.full_like(prompt, IGNORE_INDEX), answer]))
    width = max(r.numel() for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, (row, label) in enumerate(zip(rows, label_rows)):
        input_ids[i, : row.numel()], labels[i, : row.numel()], mask[i, : row.numel()] = row, label, 1
    return _collate_queries([example[0] for example in batch]), input_ids, mask, labels


def train_projector(
    model: MemoryAugmentedLM,
    examples: Sequence[tuple],
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 8,
    progress: bool = False,
    seed: int = 0,
) -> list[float]:
    """Train the parameters of ``model`` that require grad (the projector; the LM if not frozen).

    Args:
        examples: ``(memory_query, prompt_ids, answer_ids)`` triples: the memory query (a text,
            token ids of the memory's tokenizer, or a query embedding ``[D]`` / ``[P, D]``) and
            the prompt and answer as token ids of the LM.
        steps: optimizer steps (AdamW, no weight decay), each on ``batch_size`` examples drawn
            without replacement from a reshuffled pass over ``examples`` (seeded by ``seed``).

    The loss is the LM's cross-entropy on the answer tokens only, with teacher forcing: the LM
    reads memory prefix + prompt + answer and the prompt positions are labelled ``-100``.
    Returns the loss of every step. The model is left in the train/eval mode it was in.
    """
    from tqdm.auto import tqdm

    examples = list(examples)
    if not examples:
        raise ValueError("train_projector: examples is empty")
    for i, example in enumerate(examples):
        if not isinstance(example, (tuple, list)) or len(example) != 3:
            raise ValueError(f"train_projector: examples[{i}] must be (memory_query, prompt_ids, answer_ids)")
    if int(steps) < 0 or int(batch_size) < 1:
        raise ValueError(f"train_projector: need steps >= 0 and batch_size >= 1, got {steps} and {batch_size}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_projector: the model has no parameter that requires grad")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    device = model.lm.get_input_embeddings().weight.device
    was_training = model.training
    model.train()
    losses, queue = [], []
    try:
        with tqdm(range(int(steps)), desc="training projector", disable=not progress) as bar:
            for _ in bar:
                while len(queue) < min(batch_size, len(examples)):
                    queue.extend(torch.randperm(len(examples), generator=generator).tolist())
                batch, queue = [examples[i] for i in queue[:batch_size]], queue[batch_size:]
                queries, input_ids, mask, labels = _collate(batch)
                loss = model(
                    input_ids.to(device),
                    attention_mask=mask.to(device),
                    labels=labels.to(device),
                    memory_queries=queries,
                ).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        model.train(was_training)
    return losses
