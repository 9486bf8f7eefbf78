"""Level-1 autoencoding: reconstruct a chunk's tokens from its single chunk embedding.

A ``ChunkEncoder`` squeezes a chunk of up to ``chunk_size`` tokens into one ``[D]`` vector (its
CLS readout); a ``ChunkDecoder`` gives the tokens back from that vector (autoregressive by
default: each token also from the true ones before it). ``autoencode_loss`` is the objective,
usable by any trainer that wants level-1 embeddings to keep the content of their chunk;
:mod:`.convergence` runs the seed's convergence experiment with it (``mllm train autoencoder``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TOKENIZERS = ("minilm", "bytes")
DECODERS = ("causal", "parallel")


class ChunkDecoder(nn.Module):
    """Decoder of chunk embeddings ``[C, D]`` into token logits ``[C, L, K]`` (K: ``len(vocab)``).

    The input of position ``i`` is a learned position vector plus a linear map of the embedding
    (every position sees the embedding from the first layer on), followed by pre-norm transformer
    layers and a head. Two ways to read the chunk back:

    - ``causal=True`` (autoregressive, teacher-forced): position ``i`` also gets the true token
      ``i-1`` and attends only to earlier positions; position 0 has nothing but the embedding.
    - ``causal=False`` (non-autoregressive, like the seed's ``EmbDecoder``): all positions are
      predicted at once from the embedding alone, attending to each other (positions past a
      chunk's length are hidden), so only the embedding carries the chunk.

    Why causal is the default: on 2 CPU cores (d_model 256, MiniLM tokens, batch 32, lr 1e-3) it
    learns faster and further. After 300 steps (about 3 minutes) it reconstructs 22.6% of the
    held-out tokens, against 12.6% when decoding from another chunk's embedding (the control of
    ``evaluate``): the embedding itself is worth 10 points. The parallel decoder has been stuck
    at 10% since step 150 (10.1% at 300, control 3.0%): a 7-point embedding share. A
    teacher-forced decoder can lean on the preceding tokens like a language model, so its
    accuracy alone would overstate what the embedding holds: report it next to the control.
    ``token_dropout`` (previous tokens randomly hidden while training) is meant to shift the
    decoder onto the embedding; at 0.3 it gave the same 10-point share and a lower accuracy in
    300 steps, so it is off by default.

    Args:
        vocab_size: the tokenizer's ``vocab_size`` (token ids are in ``[0, vocab_size)``).
        d_model: width of the embeddings and of the decoder.
        num_layers, heads: depth and attention heads of the transformer (``d_model % heads == 0``).
        chunk_size: the most positions it can decode (one learned position vector each).
        causal: autoregressive (True) or all positions at once (False).
        token_dropout: while training, the fraction of previous tokens (causal inputs) replaced
            by the "unknown" input.
        vocab: int64 ``[K]``, the token ids the head predicts (default: all ``vocab_size``). A
            pretrained tokenizer's vocabulary is mostly unused by one corpus, and the head is the
            largest matmul: restricting it to the corpus' tokens (6.6k of MiniLM's 30.5k on the
            stdlib docs) makes a step several times cheaper.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        num_layers: int = 2,
        heads: int = 4,
        chunk_size: int = 128,
        causal: bool = True,
        vocab: torch.Tensor | None = None,
        token_dropout: float = 0.0,
    ):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("chunk_size", chunk_size)):
            if value < 1:
                raise ValueError(f"ChunkDecoder: {name} must be >= 1, got {value}")
        if num_layers < 1 or heads < 1:
            raise ValueError(f"ChunkDecoder: needs num_layers >= 1 and heads >= 1, got {num_layers} and {heads}")
        if d_model % heads:
            raise ValueError(f"ChunkDecoder: d_model ({d_model}) must be divisible by heads ({heads})")
        vocab = torch.arange(vocab_size) if vocab is None else torch.as_tensor(vocab, dtype=torch.int64)
        if vocab.dim() != 1 or vocab.numel() == 0:
            raise ValueError(
                f"ChunkDecoder: vocab must be a non-empty 1-D tensor of token ids, got {tuple(vocab.shape)}"
            )
        if int(vocab.min()) < 0 or int(vocab.max()) >= vocab_size or vocab.unique().numel() != vocab.numel():
            raise ValueError(f"ChunkDecoder: vocab must hold distinct token ids in [0, {vocab_size})")
        self.args = {
            "vocab_size": vocab_size,
            "d_model": d_model,
            "num_layers": num_layers,
            "heads": heads,
            "chunk_size": chunk_size,
            "causal": causal,
            "token_dropout": token_dropout,
        }
        if not 0 <= token_dropout < 1:
            raise ValueError(f"ChunkDecoder: token_dropout must be in [0, 1), got {token_dropout}")
        self.causal, self.token_dropout = causal, token_dropout
        # token_ids[k]: the token of class k; class_of[token]: its class, -1 outside the vocab.
        self.register_buffer("token_ids", vocab.clone())
        class_of = torch.full((vocab_size,), -1, dtype=torch.int64)
        class_of[vocab] = torch.arange(vocab.numel())
        self.register_buffer("class_of", class_of)
        self.condition = nn.Linear(d_model, d_model)
        self.position = nn.Parameter(torch.randn(chunk_size, d_model) * 0.02)
        # Inputs of the causal decoder: one row per class, and a last one for tokens outside the vocab.
        self.token_embedding = nn.Embedding(vocab.numel() + 1, d_model) if causal else None
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab.numel())

    def extra_repr(self) -> str:
        return f"classes={self.token_ids.numel()}, " + ", ".join(f"{k}={v}" for k, v in self.args.items())

    def features(
        self, embedding: torch.Tensor, lengths: torch.Tensor, ids: torch.Tensor | None = None, width: int | None = None
    ) -> torch.Tensor:
        """Hidden states ``[C, width, D]`` float32 of positions ``0..width-1`` (before the head).

        ``embedding``: ``[C, D]``; ``lengths``: int64 ``[C]``, the tokens of each chunk; ``ids``:
        int64 ``[C, >= width - 1]``, the chunk's tokens (needed when ``causal``: position ``i`` reads
        token ``i - 1``). ``width`` defaults to ``max(lengths)``. A position past a chunk's length
        never influences the real ones (causal order, or masked), so a chunk decodes the same in any
        batch, whatever it is padded to and with; the states of those positions are garbage.
        """
        count, d_model = embedding.shape if embedding.dim() == 2 else (None, None)
        if d_model != self.args["d_model"]:
            raise ValueError(
                f"ChunkDecoder: embeddings must be [C, {self.args['d_model']}], got {tuple(embedding.shape)}"
            )
        if lengths.shape != (count,):
            raise ValueError(f"ChunkDecoder: lengths must be [{count}], got {tuple(lengths.shape)}")
        width = int(lengths.max()) if width is None else width
        if not 1 <= width <= self.args["chunk_size"]:
            raise ValueError(f"ChunkDecoder: width must be in [1, {self.args['chunk_size']}], got {width}")
        # Chunk embeddings are L2-normalised (entries ~ 1/sqrt(D)): rescale to unit-variance entries
        # so that the default Linear init conditions the inputs about as strongly as a token would.
        embedding = embedding.to(self.position.dtype) * math.sqrt(d_model)
        inputs = self.position[:width] + self.condition(embedding)[:, None]
        if self.causal:
            if ids is None or ids.dim() != 2 or ids.shape[0] != count or ids.shape[1] < width - 1:
                raise ValueError(f"ChunkDecoder: a causal decoder needs ids [{count}, >= {width - 1}]")
            previous = self.class_of[ids[:, : width - 1]]
            unknown = previous < 0
            if self.training and self.token_dropout:
                # Hiding some previous tokens makes the embedding, not the prefix, the way to the answer.
                unknown = unknown | (torch.rand(previous.shape, device=previous.device) < self.token_dropout)
            previous = torch.where(unknown, self.token_ids.numel(), previous)
            inputs = inputs + F.pad(self.token_embedding(previous), (0, 0, 1, 0))
            mask = nn.Transformer.generate_square_subsequent_mask(width, device=inputs.device, dtype=inputs.dtype)
            hidden = self.layers(inputs, mask=mask, is_causal=True)
        else:
            padding = torch.arange(width, device=lengths.device) >= lengths[:, None]
            hidden = self.layers(inputs, src_key_padding_mask=padding)
        return self.norm(hidden)

    def forward(self, embedding, lengths, ids=None, width=None) -> torch.Tensor:
        """Logits ``[C, width, K]`` over the ``K`` classes of ``token_ids`` (see ``features``)."""
        return self.head(self.features(embedding, lengths, ids, width))

    @torch.no_grad()
    def decode(self, embedding: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        """Greedy reconstruction: the token ids of each chunk, ``lengths[c]`` of them.

        Non-causal: the argmax of every position at once. Causal: token by token, each fed back.
        """
        width = int(lengths.max())
        if not self.causal:
            ids = self.token_ids[self(embedding, lengths).argmax(-1)]
        else:
            ids = torch.zeros(embedding.shape[0], width, dtype=torch.int64, device=embedding.device)
            for i in range(width):
                ids[:, i] = self.token_ids[self(embedding, lengths, ids, i + 1)[:, i].argmax(-1)]
        return [row[: int(n)].tolist() for row, n in zip(ids, lengths)]


def _check_batch(ids: torch.Tensor, lengths: torch.Tensor) -> None:
    if ids.dim() != 2 or lengths.shape != ids.shape[:1]:
        raise ValueError(
            f"autoencode_loss: ids must be [C, L] and lengths [C], got {tuple(ids.shape)} and {tuple(lengths.shape)}"
        )
    if ids.dtype != torch.int64 or lengths.dtype != torch.int64:
        raise ValueError(f"autoencode_loss: ids and lengths must be int64, got {ids.dtype} and {lengths.dtype}")
    if ids.shape[0] == 0:
        raise ValueError("autoencode_loss: empty batch")
    if int(lengths.min()) < 1 or int(lengths.max()) > ids.shape[1]:
        raise ValueError(f"autoencode_loss: lengths must be in [1, {ids.shape[1]}]")


def decode_loss(decoder: ChunkDecoder, embedding: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor):
    """``autoencode_loss`` from given embeddings ``[C, D]`` (e.g. another chunk's, as a control)."""
    _check_batch(ids, lengths)
    valid = torch.arange(ids.shape[1], device=ids.device) < lengths[:, None]
    hidden = decoder.features(embedding, lengths, ids, ids.shape[1])
    # The head (the largest matmul) runs on the real tokens only: padding costs neither compute nor loss.
    logits = decoder.head(hidden[valid]).float()
    targets = decoder.class_of[ids[valid]]
    loss = F.cross_entropy(logits, targets, ignore_index=-1)
    accuracy = (logits.argmax(-1) == targets).float().mean().detach()
    return loss, accuracy


def autoencode_loss(encoder, decoder: ChunkDecoder, ids: torch.Tensor, lengths: torch.Tensor):
    """The level-1 autoencoding objective: encode each chunk, decode its tokens back.

    Args:
        encoder: a ``ChunkEncoder`` (``(ids, lengths) -> [C, D]``).
        decoder: a ``ChunkDecoder`` of the same ``d_model``.
        ids: int64 ``[C, L]``, padded on the right; the padding ids are never read.
        lengths: int64 ``[C]``, the real tokens of each row, in ``[1, L]``.

    Returns:
        ``(loss, accuracy)``: the mean cross-entropy over the real tokens (float32 scalar, with
        gradient) and the fraction of them the argmax gets right (float32 scalar, detached). A
        token outside the decoder's ``vocab`` adds no loss and counts as a miss.
    """
    _check_batch(ids, lengths)
    return decode_loss(decoder, encoder(ids, lengths), ids, lengths)


def make_tokenizer(name: str):
    """``"minilm"``: the offline MiniLM WordPiece tokenizer; ``"bytes"``: UTF-8 bytes."""
    from ..tokenizers import ByteTokenizer, HFTokenizer

    if name == "bytes":
        return ByteTokenizer()
    if name == "minilm":
        from ..pretrained import MINILM, _model_dir

        return HFTokenizer(str(_model_dir(MINILM)), name=MINILM)
    raise ValueError(f"autoencoder: tokenizer must be one of {TOKENIZERS}, got {name!r}")


def chunk_dataset(tokenizer, chunk_size: int = 128, max_chunks: int | None = None, texts=None):
    """Chunks of ``chunk_size`` tokens of the stdlib docstrings (or of ``texts``), as the memory cuts them.

    Each document is split on its own (chunks never cross documents; a document's last chunk
    may be shorter), exactly like ``HierarchicalMemory``, so the encoder trains on the chunks it
    will embed. Returns ``(ids int64 [C, chunk_size], lengths int64 [C])``: row c holds
    ``lengths[c] >= 1`` tokens, then ``tokenizer.pad_id``. ``max_chunks`` keeps the first chunks.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_dataset: chunk_size must be >= 1, got {chunk_size}")
    if max_chunks is not None and max_chunks < 1:
        raise ValueError(f"chunk_dataset: max_chunks must be >= 1 or None, got {max_chunks}")
    if texts is None:
        from ..corpus import stdlib_docstrings

        # Every document gives at least one chunk, so max_chunks documents are enough.
        texts = [doc.text for doc in stdlib_docstrings(max_docs=max_chunks)]
    rows = []
    for tokens in tokenizer.encode(list(texts)):
        rows += [tokens[start : start + chunk_size] for start in range(0, len(tokens), chunk_size)]
        if max_chunks is not None and len(rows) >= max_chunks:
            break
    rows = rows[:max_chunks]
    if not rows:
        raise ValueError("chunk_dataset: the texts hold no tokens")
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.int64)
    ids = torch.full((len(rows), chunk_size), tokenizer.pad_id, dtype=torch.int64)
    for c, row in enumerate(rows):
        ids[c, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return ids, lengths
