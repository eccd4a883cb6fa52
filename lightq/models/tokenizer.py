"""Prompt tokenizers for the umT5 text encoder: ``tokenizer(prompts) -> (ids [B, text_len], mask [B, text_len])``.

Both kinds clean each prompt like Wan (``clean='whitespace'``: runs of whitespace become one space, ends
stripped; the real one first fixes mojibake with ftfy and unescapes HTML twice), end it with the EOS token,
truncate to ``text_len`` (EOS kept) and pad with id 0 to ``text_len``; ``mask`` is 1 on real tokens, 0 on padding.

- ``load_tokenizer(folder_or_name, text_len)``: the umT5 sentencepiece tokenizer through
  ``transformers.AutoTokenizer``, from a Wan model folder (its ``google/umt5-xxl`` subfolder), a tokenizer
  folder, or a Hub name. Needs the ``tokenizer`` extra (transformers, sentencepiece, ftfy).
- ``load_tokenizer("byte", text_len, vocab=V)`` / ``ByteTokenizer(V, text_len)``: for the tiny model, no
  dependencies: UTF-8 byte ``b`` becomes id ``2 + b % (V - 2)`` (0 = pad, 1 = EOS).
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Protocol

import torch

from ..errors import LightqError

PAD_ID = 0
EOS_ID = 1
BYTE_TOKENIZER = "byte"
WAN_TOKENIZER_SUBFOLDER = "google/umt5-xxl"
INSTALL_HINT = "pip install 'transformers>=4.40' sentencepiece ftfy"


class Tokenizer(Protocol):
    text_len: int

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


def whitespace_clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise LightqError("tokenizer: expected a list of prompt strings; wrap a single prompt as [prompt]")
    return list(prompts)


def _check_text_len(text_len: int) -> None:
    if text_len < 1:
        raise LightqError(f"tokenizer: text_len must be >= 1, got {text_len}")


class ByteTokenizer:
    """Deterministic, dependency-free tokenizer over UTF-8 bytes, for toy vocabularies (``vocab >= 3``)."""

    def __init__(self, vocab: int, text_len: int):
        if vocab < 3:
            raise LightqError(f"ByteTokenizer: vocab must be >= 3 (pad, EOS and at least one byte id), got {vocab}")
        _check_text_len(text_len)
        self.vocab, self.text_len = vocab, text_len

    def encode(self, prompt: str) -> list[int]:
        data = whitespace_clean(prompt).encode("utf-8")[: self.text_len - 1]
        return [2 + b % (self.vocab - 2) for b in data] + [EOS_ID]

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = _check_prompts(prompts)
        ids = torch.full((len(prompts), self.text_len), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(prompts), self.text_len), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = self.encode(prompt)
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return ids, mask


class HFUMT5Tokenizer:
    """The umT5 tokenizer through ``transformers``, with Wan's cleaning, padding to ``text_len`` and truncation."""

    def __init__(self, source: str, text_len: int):
        _check_text_len(text_len)
        try:
            import ftfy
            from transformers import AutoTokenizer
        except Exception as exc:  # ImportError, or a broken install failing inside the import
            raise LightqError(f"the umT5 tokenizer needs transformers, sentencepiece and ftfy "
                              f"({type(exc).__name__}: {exc}); install: {INSTALL_HINT}") from exc
        self._fix_text = ftfy.fix_text
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as exc:
            raise LightqError(f"cannot load the umT5 tokenizer from '{source}' ({type(exc).__name__}: {exc}); "
                              f"point the model folder at a Wan2.1 download (it holds {WAN_TOKENIZER_SUBFOLDER}/) "
                              f"and check that sentencepiece is installed ({INSTALL_HINT})") from exc
        self.source, self.text_len = source, text_len

    def clean(self, prompt: str) -> str:
        return whitespace_clean(html.unescape(html.unescape(self._fix_text(prompt))).strip())

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [self.clean(p) for p in _check_prompts(prompts)]
        out = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.text_len,
                             add_special_tokens=True, return_tensors="pt")
        return out["input_ids"].long(), out["attention_mask"].long()


def _tokenizer_source(folder_or_name: str | Path) -> str:
    """A Wan model folder resolves to its ``google/umt5-xxl`` subfolder; anything else is passed on as is."""
    path = Path(folder_or_name)
    if (path / WAN_TOKENIZER_SUBFOLDER).is_dir():
        return str(path / WAN_TOKENIZER_SUBFOLDER)
    return str(folder_or_name)


def load_tokenizer(folder_or_name: str | Path, text_len: int, vocab: int | None = None) -> Tokenizer:
    """The tokenizer for a text encoder; ``"byte"`` (with ``vocab``) gives the ``ByteTokenizer`` of the tiny model."""
    if str(folder_or_name) == BYTE_TOKENIZER:
        if vocab is None:
            raise LightqError("load_tokenizer('byte', ...) needs vocab= (the text encoder's vocabulary size)")
        return ByteTokenizer(vocab, text_len)
    return HFUMT5Tokenizer(_tokenizer_source(folder_or_name), text_len)
