"""Encoders of the tree: ChunkEncoder (tokens -> level 1) and LevelEncoder (level k -> level k+1).

Both read their output off a CLS query through the fused ``cls_pool`` kernel. The CLS query starts
at zero, and a zero query gives every row the same attention weight, so an untrained encoder pools
as a **mean**: with a pretrained sentence encoder (mean-pooled, like MiniLM) a zero query
reproduces its sentence embedding exactly, and a fresh level encoder makes each parent the
(normalised) mean of its children. That is what makes an untrained hierarchy usable; training
(``mllm.training``) moves the query away from zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import mllm_kernels as mk


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX): then bf16 autocast pays off."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class CLSReadout(nn.Module):
    """Multi-head CLS pooling of ragged rows + output projection, initialised to the plain mean.

    ``forward(x [N, D], offsets int64 [C+1]) -> [C, D]``. ``query`` is ``[heads, D]`` (zeros: a mean);
    ``out`` maps the concatenated heads back to D and starts as the average of the heads.
    """

    def __init__(self, d_model: int, heads: int = 1, normalize: bool = True):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(heads, d_model))
        self.out = nn.Linear(heads * d_model, d_model)
        with torch.no_grad():
            self.out.weight.copy_(torch.eye(d_model).repeat(1, heads) / heads)
            self.out.bias.zero_()
        self.normalize = normalize

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        pooled = mk.cls_pool(x, self.query.to(x.dtype), offsets)  # [C, heads, D]
        out = self.out(pooled.flatten(1).to(self.out.weight.dtype))
        return F.normalize(out, dim=-1) if self.normalize else out


def _identity_layer(d_model: int, heads: int) -> nn.TransformerEncoderLayer:
    """A pre-norm transformer layer whose residual branches start at zero, i.e. the identity."""
    layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True)
    for linear in (layer.self_attn.out_proj, layer.linear2):
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    return layer


def _padded(x: torch.Tensor, lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rows ``x [sum(lengths), D]`` -> ``[len(lengths), width, D]`` and its validity mask."""
    valid = torch.arange(width, device=x.device) < lengths[:, None]
    out = x.new_zeros(lengths.numel(), width, x.shape[-1])
    out[valid] = x
    return out, valid


class TransformerBackbone(nn.Module):
    """A small transformer over the tokens of each chunk, trained from scratch.

    ``forward(ids [C, L] (padded), lengths [C]) -> (hidden [C, L, D], valid bool [C, L])``.
    """

    def __init__(self, vocab_size: int, d_model: int, num_layers: int = 2, heads: int = 4, max_len: int = 512):
        super().__init__()
        self.args = {
            "vocab_size": vocab_size,
            "d_model": d_model,
            "num_layers": num_layers,
            "heads": heads,
            "max_len": max_len,
        }
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor):
        if ids.shape[1] > self.position_embedding.num_embeddings:
            raise ValueError(
                f"TransformerBackbone: chunks of {ids.shape[1]} tokens exceed max_len {self.args['max_len']}"
            )
        valid = torch.arange(ids.shape[1], device=ids.device) < lengths[:, None]
        positions = torch.arange(ids.shape[1], device=ids.device)
        hidden = self.token_embedding(ids) + self.position_embedding(positions)
        hidden = self.layers(hidden, src_key_padding_mask=~valid)
        return self.norm(hidden), valid


class HFBackbone(nn.Module):
    """A pretrained Hugging Face encoder (BERT-like) loaded from a local directory; frozen by default.

    Adds the tokenizer's [CLS] ... [SEP] (``cls_id``, ``sep_id``) around each chunk, and reports those positions as valid,
    so that mean pooling matches the sentence-transformers pooling the model was trained with.
    """

    def __init__(self, path: str, cls_id: int, sep_id: int, name: str | None = None, trainable: bool = False):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.path, self.name = str(path), name or str(path)
        config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True).eval()
        self.model.requires_grad_(trainable)
        self.d_model = config.hidden_size
        self.max_len = config.max_position_embeddings - 2
        self.cls_id, self.sep_id = cls_id, sep_id

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor):
        count, width = ids.shape
        if width > self.max_len:
            raise ValueError(f"HFBackbone: chunks of {width} tokens exceed the model's {self.max_len}")
        framed = ids.new_zeros(count, width + 2)
        framed[:, 0] = self.cls_id
        framed[:, 1:-1] = ids
        framed[torch.arange(count), lengths + 1] = self.sep_id
        valid = torch.arange(width + 2, device=ids.device) < (lengths + 2)[:, None]
        hidden = self.model(input_ids=framed * valid, attention_mask=valid.long()).last_hidden_state
        return hidden, valid

    def fingerprint(self) -> str:
        """sha256 over the weights: a saved memory's keys are valid only with the same encoder."""
        import hashlib

        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


class ChunkEncoder(nn.Module):
    """Level 1: the tokens of each chunk -> one embedding per chunk, read off a CLS query.

    ``forward(ids [C, L] int64, lengths [C] int64) -> [C, D] float32`` (L2-normalised when
    ``normalize``). ``ids`` is padded on the right; row c holds ``lengths[c] >= 1`` tokens.
    The backbone is a ``TransformerBackbone`` (from scratch) or an ``HFBackbone`` (pretrained);
    ``tokenizer`` turns text into ids. Build one with ``ChunkEncoder.from_scratch`` or
    ``mllm.pretrained.minilm_encoder``. Setting ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs
    the backbone under ``torch.autocast``: on CPUs with native bf16 (``cpu_has_native_bf16()``)
    MiniLM encodes about 1.7x faster, with embeddings within 1e-4 cosine of float32.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        d_model: int,
        heads: int = 1,
        normalize: bool = True,
        autocast_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.d_model = d_model
        self.readout = CLSReadout(d_model, heads, normalize)
        self.autocast_dtype = autocast_dtype

    @classmethod
    def from_scratch(
        cls,
        d_model: int = 256,
        num_layers: int = 2,
        heads: int = 4,
        cls_heads: int = 1,
        max_len: int = 512,
        tokenizer=None,
        normalize: bool = True,
    ) -> ChunkEncoder:
        """A transformer chunk encoder with fresh weights (byte tokenizer unless one is given)."""
        from .tokenizers import ByteTokenizer

        tokenizer = tokenizer or ByteTokenizer()
        backbone = TransformerBackbone(tokenizer.vocab_size, d_model, num_layers, heads, max_len)
        return cls(backbone, tokenizer, d_model, cls_heads, normalize)

    @property
    def max_chunk_tokens(self) -> int:
        return self.backbone.max_len if isinstance(self.backbone, HFBackbone) else self.backbone.args["max_len"]

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or lengths.shape != ids.shape[:1]:
            raise ValueError(
                f"ChunkEncoder: ids must be [C, L] and lengths [C], got {tuple(ids.shape)} and {tuple(lengths.shape)}"
            )
        if ids.shape[0] and int(lengths.min()) < 1:
            raise ValueError("ChunkEncoder: every chunk needs at least one token")
        with torch.autocast(ids.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            hidden, valid = self.backbone(ids, lengths)
        offsets = F.pad(valid.sum(1).cumsum(0), (1, 0))
        return self.readout(hidden[valid], offsets)


class LevelEncoder(nn.Module):
    """Level k+1 from groups of up to ``fanout`` level-k embeddings.

    ``forward(children [M, D], offsets int64 [G+1]) -> [G, D]``: group g is
    ``children[offsets[g]:offsets[g+1]]`` (non-empty). Optional transformer layers let the
    children attend to each other first; they start as the identity (zeroed residual branches),
    and the CLS query starts at zero, so a fresh LevelEncoder returns the normalised mean.
    """

    def __init__(
        self, d_model: int, fanout: int, num_layers: int = 0, heads: int = 4, cls_heads: int = 1, normalize: bool = True
    ):
        super().__init__()
        self.fanout = fanout
        self.layers = nn.ModuleList(_identity_layer(d_model, heads) for _ in range(num_layers))
        self.position = nn.Parameter(torch.zeros(fanout, d_model)) if num_layers else None
        self.readout = CLSReadout(d_model, cls_heads, normalize)

    def forward(self, children: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if self.layers:
            lengths = offsets.diff()
            hidden, valid = _padded(children, lengths, self.fanout)
            hidden = hidden + self.position
            for layer in self.layers:
                hidden = layer(hidden, src_key_padding_mask=~valid)
            children = hidden[valid]
        return self.readout(children, offsets)
