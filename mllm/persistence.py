"""Saving and loading a HierarchicalMemory: one safetensors file, written atomically.

The file holds the config, the level embeddings, keys and liveness, the chunk map (each leaf's
document and token span), the documents' tokens and titles, and the weights of the level
encoders, the ranker and the chunk encoder. A frozen pretrained backbone (e.g. MiniLM) is stored
by name with a fingerprint of its weights instead of 90 MB of copies; loading checks that the
backbone found has the same fingerprint, because the keys are only valid with it.

Removed documents leave nothing behind: their tokens and titles are gone from the memory and
their leaves are zeros, and ``save`` replaces the whole file.
"""

from __future__ import annotations

import torch

from .config import MemoryConfig
from .encoders import ChunkEncoder, HFBackbone, TransformerBackbone
from .storage import MemoryFileError, load_tensors, save_tensors

_KIND = "mllm.HierarchicalMemory"


def _frozen_backbone(encoder: ChunkEncoder) -> bool:
    return isinstance(encoder.backbone, HFBackbone) and not any(p.requires_grad for p in encoder.backbone.parameters())


def encoder_spec(encoder: ChunkEncoder) -> dict:
    """How to rebuild ``encoder``'s architecture (its weights travel as tensors)."""
    readout = {"heads": encoder.readout.query.shape[0], "normalize": encoder.readout.normalize}
    if isinstance(encoder.backbone, TransformerBackbone):
        return {"kind": "transformer", "args": encoder.backbone.args, "tokenizer": encoder.tokenizer.spec(), **readout}
    if isinstance(encoder.backbone, HFBackbone):
        if not hasattr(encoder.backbone, "_fingerprint"):
            encoder.backbone._fingerprint = encoder.backbone.fingerprint()
        return {
            "kind": "pretrained",
            "name": encoder.backbone.name,
            "fingerprint": encoder.backbone._fingerprint,
            "frozen": _frozen_backbone(encoder),
            **readout,
        }
    raise TypeError(f"save: cannot describe a backbone of type {type(encoder.backbone).__name__}")


def encoder_from_spec(spec: dict) -> ChunkEncoder:
    if spec["kind"] == "transformer":
        from .tokenizers import ByteTokenizer

        if spec["tokenizer"]["kind"] != "bytes":
            raise ValueError(f"load: cannot rebuild tokenizer {spec['tokenizer']}; pass encoder=")
        args = spec["args"]
        return ChunkEncoder.from_scratch(
            args["d_model"],
            args["num_layers"],
            args["heads"],
            spec["heads"],
            args["max_len"],
            ByteTokenizer(),
            spec["normalize"],
        )
    if spec["kind"] == "pretrained":
        from .pretrained import pretrained_encoder

        return pretrained_encoder(
            spec["name"], heads=spec["heads"], normalize=spec["normalize"], trainable=not spec["frozen"]
        )
    raise ValueError(f"load: unknown encoder kind {spec['kind']!r}")


def save_memory(memory, path) -> None:
    """Write ``memory`` to ``path`` (temporary file, fsync, rename: never half-written)."""
    tree = memory.tree
    doc_ids = sorted(memory.doc_tokens)
    tokens = [memory.doc_tokens[i] for i in doc_ids]
    lengths = torch.tensor([t.numel() for t in tokens], dtype=torch.int64)
    tensors = {
        "leaf_doc": memory.leaf_doc,
        "leaf_span": memory.leaf_span,
        "doc_ids": torch.tensor(doc_ids, dtype=torch.int64),
        "doc_token_offsets": torch.nn.functional.pad(lengths.cumsum(0), (1, 0)),
        "doc_tokens": torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.int32),
    }
    for height in range(len(tree.emb)):
        tensors[f"tree.{height}.emb"] = tree.emb[height]
        tensors[f"tree.{height}.keys"] = tree.keys[height]
        tensors[f"tree.{height}.live"] = tree.live[height]
    skip = "encoder.backbone." if _frozen_backbone(memory.encoder) else None
    for name, value in memory.state_dict().items():
        if skip is None or not name.startswith(skip):
            tensors["params." + name] = value
    metadata = {
        "kind": _KIND,
        "config": memory.config.to_dict(),
        "encoder": encoder_spec(memory.encoder),
        "titles": [memory.doc_titles[i] for i in doc_ids],
        "next_doc_id": memory.next_doc_id,
        "levels": len(tree.emb),
    }
    save_tensors(path, tensors, metadata)


def _require(condition: bool, path, message: str) -> None:
    if not condition:
        raise MemoryFileError(f"memory file {path} is inconsistent: {message}")


def load_memory(path, *, mmap: bool = False, verify: bool = True, encoder: ChunkEncoder | None = None):
    """Read a memory written by ``save_memory``; raises ``MemoryFileError`` for a damaged file."""
    from .memory import HierarchicalMemory

    tensors, meta = load_tensors(path, mmap=mmap, verify=verify)
    if meta.get("kind") != _KIND:
        raise MemoryFileError(f"memory file {path} does not hold a HierarchicalMemory (kind {meta.get('kind')!r})")
    try:
        config = MemoryConfig.from_dict(meta["config"])
        spec, titles, levels = meta["encoder"], meta["titles"], int(meta["levels"])
        next_doc_id = int(meta["next_doc_id"])
    except (KeyError, TypeError, ValueError) as error:
        raise MemoryFileError(f"memory file {path} has bad metadata: {error}") from error
    if encoder is None:
        encoder = encoder_from_spec(spec)
    memory = HierarchicalMemory(encoder, config)
    if spec["kind"] == "pretrained" and spec.get("frozen", True):
        found = encoder_spec(encoder).get("fingerprint")
        if found != spec["fingerprint"]:
            raise MemoryFileError(
                f"memory file {path} was built with encoder {spec['name']} of fingerprint "
                f"{spec['fingerprint'][:12]}..., but the encoder found has {str(found)[:12]}..."
            )
    params = {name[len("params.") :]: value for name, value in tensors.items() if name.startswith("params.")}
    missing, unexpected = memory.load_state_dict(params, strict=False)
    missing = [m for m in missing if not (spec["kind"] == "pretrained" and m.startswith("encoder.backbone."))]
    _require(not missing and not unexpected, path, f"weights missing {missing[:5]}, unexpected {unexpected[:5]}")
    _restore_tree(memory, tensors, levels, path)
    _restore_documents(memory, tensors, titles, next_doc_id, path)
    return memory


def _restore_tree(memory, tensors: dict, levels: int, path) -> None:
    config, tree = memory.config, memory.tree
    try:
        tree.emb = [tensors[f"tree.{h}.emb"] for h in range(levels)]
        tree.keys = [tensors[f"tree.{h}.keys"] for h in range(levels)]
        tree.live = [tensors[f"tree.{h}.live"] for h in range(levels)]
        memory.leaf_doc, memory.leaf_span = tensors["leaf_doc"], tensors["leaf_span"]
    except KeyError as error:
        raise MemoryFileError(f"memory file {path} lacks tensor {error}") from error
    _require(1 <= levels <= config.max_levels, path, f"{levels} levels")
    for h in range(levels):
        n, emb, keys, live = tree.emb[h].shape[0], tree.emb[h], tree.keys[h], tree.live[h]
        _require(emb.dtype == torch.float32 and emb.shape == (n, config.d_model), path, f"level {h} embeddings")
        _require(keys.dtype == config.key_torch_dtype and keys.shape == emb.shape, path, f"level {h} keys")
        _require(live.dtype == torch.bool and live.shape == (n,), path, f"level {h} liveness")
        if h + 1 < levels:
            _require(tree.emb[h + 1].shape[0] == -(-n // config.fanout), path, f"level {h + 1} size")
    _require(tree.emb[-1].shape[0] <= config.fanout or (levels == 1 and tree.emb[0].shape[0] == 0), path, "top level")
    n_leaves = tree.emb[0].shape[0]
    _require(memory.leaf_doc.dtype == torch.int64 and memory.leaf_doc.shape == (n_leaves,), path, "leaf_doc")
    _require(memory.leaf_span.dtype == torch.int64 and memory.leaf_span.shape == (n_leaves, 2), path, "leaf_span")


def _restore_documents(memory, tensors: dict, titles: list, next_doc_id: int, path) -> None:
    doc_ids, offsets, tokens = tensors["doc_ids"], tensors["doc_token_offsets"], tensors["doc_tokens"]
    n = doc_ids.numel()
    _require(len(titles) == n and offsets.shape == (n + 1,), path, "document table sizes")
    _require(
        n == 0 or (int(doc_ids.min()) >= 0 and int(doc_ids.max()) < next_doc_id and bool((doc_ids.diff() > 0).all())),
        path,
        "document ids",
    )
    _require(
        int(offsets[0]) == 0 and bool((offsets.diff() >= 0).all()) and int(offsets[-1]) == tokens.numel(),
        path,
        "document token offsets",
    )
    live_docs = memory.leaf_doc[memory.tree.live[0]]
    _require(bool(torch.isin(live_docs, doc_ids).all()), path, "a leaf belongs to no document")
    bounds = offsets.diff()
    memory.doc_tokens = {int(d): tokens[offsets[i] : offsets[i + 1]] for i, d in enumerate(doc_ids.tolist())}
    memory.doc_titles = {int(d): str(titles[i]) for i, d in enumerate(doc_ids.tolist())}
    memory.next_doc_id = next_doc_id
    index = torch.searchsorted(doc_ids, live_docs)
    spans = memory.leaf_span[memory.tree.live[0]]
    _require(
        bool((spans[:, 0] >= 0).all())
        and bool((spans[:, 1] <= bounds[index]).all())
        and bool((spans[:, 0] < spans[:, 1]).all()),
        path,
        "leaf token spans",
    )
