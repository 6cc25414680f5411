"""Length-sorted batching shared by the extraction pass and prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_tokenizer

from stc_transformers.features_stc import token_spans
from stc_transformers.tokenization import LengthSortedBatches


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batches_run_longest_first_and_cover_every_text_once(padding_side):
    texts = ["w1", "w1 w2 w3 w4", "w5 w6", "w7 w8 w9", "w1 w2", "w3"]
    batches = LengthSortedBatches(make_tiny_tokenizer(padding_side=padding_side), texts, max_length=3, batch_size=4)
    assert len(batches) == 2
    assert sorted(np.concatenate(batches.index).tolist()) == list(range(len(texts)))
    first = batches.batch(0)
    assert first["input_ids"].shape == (4, 3)  # truncated to max_length, padded to the longest row of the batch
    assert batches.lengths[batches.index[0]].tolist() == [3, 3, 2, 2]
    # a sorted batch is a few runs of equal spans: pooling slices them instead of masking
    assert len(token_spans(first["attention_mask"])) == 2
    second = batches.batch(1, device=torch.device("cpu"))
    assert second["attention_mask"].sum(1).tolist() == [1, 1]


def test_a_text_that_tokenizes_to_nothing_is_refused():
    with pytest.raises(ValueError, match="Text 1 tokenizes to nothing"):
        LengthSortedBatches(make_tiny_tokenizer(), ["w1", "   "], max_length=None, batch_size=2)
