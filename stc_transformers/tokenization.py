"""Tokenizer preparation shared by the fit, the CLI and the examples."""

from __future__ import annotations


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
