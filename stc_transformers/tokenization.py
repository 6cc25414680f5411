"""Tokenizer preparation shared by the fit, the CLI and the examples."""

from __future__ import annotations

import numpy as np


def prepare_tokenizer(tokenizer, model=None):
    """Give a tokenizer without a pad token (GPT-2, Llama) one, and record its id on `model.config`.

    The pad token only fills batches: pooling reads the attention mask, so any existing token works (EOS first).
    Left and right padding are both fine.
    """
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if fallback is None:
            raise ValueError(
                "The tokenizer has no pad, EOS, UNK or BOS token to pad batches with: add one with "
                "`tokenizer.add_special_tokens({'pad_token': ...})`."
            )
        tokenizer.pad_token = fallback
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def encode(tokenizer, texts: list, **kwargs):
    """Tokenize texts, or (text, text_pair) pairs (as checked by `extraction.check_texts`) as sentence pairs."""
    if texts and isinstance(texts[0], tuple):
        firsts, seconds = zip(*texts)
        return tokenizer(list(firsts), list(seconds), **kwargs)
    return tokenizer(texts, **kwargs)


class LengthSortedBatches:
    """Texts (or text pairs) tokenized once and cut into batches of similar token counts, longest first.

    Batches of similar lengths carry little padding, and pooling slices their few runs of equal spans instead of
    masking (`features_stc.token_spans`). `batch(number)` pads batch `number`; `index[number]` holds the input
    positions of its rows, so outputs go back in input order.
    """

    COLUMNS = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, tokenizer, texts: list, *, max_length: int | None, batch_size: int):
        self.tokenizer = tokenizer
        self.encodings = encode(tokenizer, texts, truncation=max_length is not None, max_length=max_length)
        self.lengths = np.array([len(ids) for ids in self.encodings["input_ids"]])
        if (self.lengths == 0).any():
            raise ValueError(f"Text {int(np.argmin(self.lengths))} tokenizes to nothing; drop it or fix the tokenizer.")
        order = np.argsort(-self.lengths, kind="stable")
        self.index = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        self.columns = [c for c in self.COLUMNS if c in self.encodings]

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, number: int, device=None) -> dict:
        rows = [{c: self.encodings[c][i] for c in self.columns} for i in self.index[number]]
        batch = self.tokenizer.pad(rows, return_tensors="pt")
        return {k: v.to(device) for k, v in batch.items()} if device is not None else dict(batch)
