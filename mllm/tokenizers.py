"""Tokenizers for the chunk encoder: text <-> token ids, without special tokens.

Special tokens ([CLS], [SEP], ...) are the backbone's business: a chunk is ``chunk_size`` content
tokens, and a backbone that needs markers around its input adds them itself.
"""

from __future__ import annotations

from collections.abc import Sequence


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255) plus a padding id: no vocabulary file, no download.

    The tokenizer of encoders trained from scratch (and of the tests).
    """

    name = "bytes"
    vocab_size = 257
    pad_id = 256

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"kind": "bytes"}


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (never from the network)."""

    def __init__(self, path: str, name: str | None = None):
        from transformers import AutoTokenizer

        self.path = str(path)
        self.name = name or self.path
        self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.vocab_size = len(self._tokenizer)
        self.pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        self.cls_id, self.sep_id = self._tokenizer.cls_token_id, self._tokenizer.sep_token_id
        if self.cls_id is None or self.sep_id is None:
            raise ValueError(
                f"HFTokenizer: {self.name} has no [CLS]/[SEP] tokens; only BERT-like encoders are supported"
            )

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        # Long documents are split into chunks later, so the model's length limit does not apply here.
        self._tokenizer.model_max_length = 1 << 62
        return self._tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids))

    def spec(self) -> dict:
        return {"kind": "pretrained", "name": self.name}
