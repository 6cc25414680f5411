"""Long inputs (`STCConfig.long_input_chunks`): overlapping chunks cut on token ids, recombined per pooling.

References are computed by hand: the chunk boundaries from the stride arithmetic, the backbone run on every chunk
alone (batch of one, no padding), and the chunk features combined by the pooling's own rule.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import STCModelTester, make_tiny_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModel, RobertaConfig, pipeline

from stc_transformers import STCConfig, STCForSequenceClassification
from stc_transformers.features_stc import ChunkPlan, backbone_window


WINDOW, OVERLAP = 8, 3


def chunked_model(arch, pooling, *, window=WINDOW, overlap=OVERLAP, chunks=True, seed=0, sources=("hidden", "mlp")):
    config = STCModelTester().backbone_config(arch)
    config.max_position_embeddings = window
    torch.manual_seed(seed)
    stc = STCConfig(text_config=config.to_dict(), num_labels=3, poolings=[pooling], sources=list(sources),
                    long_input_chunks=chunks, chunk_overlap=overlap)
    return STCForSequenceClassification(stc).eval()


def hand_chunks(length, window=WINDOW, overlap=OVERLAP):
    """[start, end) of each chunk: stride window - overlap, stop once a chunk reaches the end."""
    if length <= window:
        return [(0, length)]
    bounds, start = [], 0
    while True:
        bounds.append((start, min(start + window, length)))
        if start + window >= length:
            return bounds
        start += window - overlap


def padded_batch(lengths, side, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = max(lengths)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    texts = []
    for row, n in enumerate(lengths):
        tokens = torch.randint(3, 99, (n,), generator=generator)
        texts.append(tokens)
        where = slice(0, n) if side == "right" else slice(total - n, total)
        ids[row, where], mask[row, where] = tokens, 1
    return ids, mask, texts


def hand_combined(model, tokens, pooling):
    """Run the model on each chunk alone (unchunked path) and combine the chunk features by hand."""
    features, counts = [], []
    for start, end in hand_chunks(tokens.numel()):
        piece = tokens[start:end].unsqueeze(0)
        with torch.no_grad():
            features.append(model.pooled_features(piece, torch.ones_like(piece)))
        counts.append(end - start)
    stacked = torch.cat(features)
    if pooling == "mean":
        weights = torch.tensor(counts, dtype=torch.float32).unsqueeze(1)
        return (stacked * weights).sum(0) / weights.sum()
    if pooling == "max":
        return stacked.amax(0)
    return stacked[0] if pooling == "first" else stacked[-1]


# --------------------------------------------------------------------------------------------------------------------
# the chunk layout
# --------------------------------------------------------------------------------------------------------------------


def test_chunk_layout_by_hand():
    mask = torch.zeros(3, 20, dtype=torch.long)
    mask[0, :] = 1  # 20 tokens
    mask[1, 11:] = 1  # 9 tokens, left padded
    mask[2, :8] = 1  # exactly one window
    plan = ChunkPlan.build(mask, WINDOW, OVERLAP)
    assert plan.rows.tolist() == [0, 0, 0, 0, 1, 1, 2]
    starts = [int(index[0]) for index in plan.token_index]
    counts = plan.mask.sum(1).tolist()
    assert list(zip(starts, counts)) == [(0, 8), (5, 8), (10, 8), (15, 5), (11, 8), (16, 4), (0, 8)]
    assert plan.slots.tolist() == [[0, 1, 2, 3], [4, 5, 0, 0], [6, 0, 0, 0]]
    assert plan.slot_mask.sum(1).tolist() == [4, 2, 1]


@settings(max_examples=50, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    window=st.integers(1, 12),
    data=st.data(),
)
def test_chunks_cover_every_token_with_the_configured_overlap(lengths, window, data):
    overlap = data.draw(st.integers(0, window - 1))
    side = data.draw(st.sampled_from(["left", "right"]))
    _, mask, _ = padded_batch(lengths, side) if max(lengths) else (None, torch.zeros(len(lengths), 1), None)
    plan = ChunkPlan.build(mask, window, overlap)
    for row, n in enumerate(lengths):
        chunk_ids = plan.slots[row][plan.slot_mask[row]].tolist()
        real = torch.nonzero(mask[row]).flatten().tolist()
        pieces = [plan.token_index[c][plan.mask[c].bool()].tolist() for c in chunk_ids]
        assert len(chunk_ids) == len(hand_chunks(n, window, overlap))
        assert all(len(p) <= window for p in pieces)
        if n == 0:
            assert pieces == [[]]
            continue
        assert pieces[0][0] == real[0] and pieces[-1][-1] == real[-1]
        assert sorted(set(sum(pieces, []))) == real
        for left, right in zip(pieces, pieces[1:]):
            assert len(set(left) & set(right)) == overlap
            assert len(left) == window


def test_overlap_must_be_smaller_than_the_window():
    model = chunked_model("bert", "mean", overlap=WINDOW)
    ids = torch.randint(3, 99, (1, 20))
    with pytest.raises(ValueError, match="chunk_overlap"):
        model.pooled_features(ids)


def test_window_follows_max_positions_and_roberta_offset():
    assert chunked_model("bert", "mean")._window == WINDOW
    assert chunked_model("gpt2", "mean", window=11)._window == 11
    roberta = AutoModel.from_config(RobertaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4,
                                                  intermediate_size=37, max_position_embeddings=20, pad_token_id=1))
    assert backbone_window(roberta) == 20 - 1 - 1  # positions start after the padding index


# --------------------------------------------------------------------------------------------------------------------
# features against hand-computed references
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pooling", ["mean", "max", "first", "last"])
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_chunked_features_equal_hand_combined_chunks(arch, pooling, side):
    model = chunked_model(arch, pooling)
    ids, mask, texts = padded_batch([20, 9, 5, 13], side)
    with torch.no_grad():
        features = model.pooled_features(ids, mask)
    assert features.shape == (4, model.selector.num_features)
    for row, tokens in enumerate(texts):
        torch.testing.assert_close(features[row], hand_combined(model, tokens, pooling), rtol=1e-5, atol=1e-5)


def test_chunked_mean_is_the_mean_over_all_chunk_tokens():
    """Independent of STC's hooks: BERT's own hidden states, averaged over the tokens of every chunk with numpy."""
    model = chunked_model("bert", "mean", sources=("hidden",))
    ids, mask, texts = padded_batch([20], "right")
    with torch.no_grad():
        features = model.pooled_features(ids, mask)[0].numpy().reshape(3, -1)  # [layers, hidden]
        states = [model.backbone(texts[0][a:b].unsqueeze(0), output_hidden_states=True).hidden_states
                  for a, b in hand_chunks(20)]
    for layer in range(3):
        tokens = np.concatenate([s[layer + 1][0].numpy() for s in states])  # 8 + 8 + 8 + 5 rows
        assert tokens.shape[0] == 29
        np.testing.assert_allclose(features[layer], tokens.mean(0), rtol=1e-5, atol=1e-5)


def test_token_type_ids_and_inputs_embeds_are_chunked_alongside():
    model = chunked_model("bert", "max", seed=1)
    ids, mask, texts = padded_batch([20, 11], "right", seed=3)
    types = (torch.arange(20) >= 10).long().expand(2, 20).clone()
    with torch.no_grad():
        features = model.pooled_features(ids, mask, token_type_ids=types)
        expected = []
        for tokens, row_types in zip(texts, types):
            pieces = [model.pooled_features(tokens[a:b][None], token_type_ids=row_types[a:b][None])
                      for a, b in hand_chunks(tokens.numel())]
            expected.append(torch.cat(pieces).amax(0))
        torch.testing.assert_close(features, torch.stack(expected), rtol=1e-5, atol=1e-5)
        embeds = model.backbone.get_input_embeddings()(ids)
        from_embeds = model.pooled_features(attention_mask=mask, token_type_ids=types, inputs_embeds=embeds)
    torch.testing.assert_close(from_embeds, features, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# short texts, defaults, errors
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_short_texts_are_unchanged_by_chunking(arch):
    on, off = chunked_model(arch, "mean", chunks=True), chunked_model(arch, "mean", chunks=False)
    assert torch.equal(on.state_dict()["head.classifier.weight"], off.state_dict()["head.classifier.weight"])
    ids, mask, _ = padded_batch([8, 5, 2], "right")
    with torch.no_grad():
        inputs = {"input_ids": ids, "attention_mask": mask}
        assert torch.equal(on(**inputs).logits, off(**inputs).logits)
        # a batch padded past the window whose texts all fit: one chunk each, padding trimmed, same values
        wide_ids = torch.cat([ids, torch.zeros(3, 6, dtype=torch.long)], 1)
        wide_mask = torch.cat([mask, torch.zeros(3, 6, dtype=torch.long)], 1)
        torch.testing.assert_close(on.pooled_features(wide_ids, wide_mask), off.pooled_features(ids, mask),
                                   rtol=1e-5, atol=1e-5)


def test_chunking_is_opt_in():
    assert STCConfig(text_config=STCModelTester().backbone_config("bert").to_dict()).long_input_chunks is False
    off = chunked_model("bert", "mean", chunks=False)
    with pytest.raises(ValueError, match="20 tokens but BertModel reads at most 8: truncate.*long_input_chunks"):
        off.pooled_features(torch.randint(3, 99, (1, 20)))  # BERT's position table has 8 rows
    off.config.long_input_chunks = True
    assert off.pooled_features(torch.randint(3, 99, (1, 20))).shape[0] == 1


def test_position_ids_cannot_be_combined_with_chunks():
    model = chunked_model("bert", "mean")
    ids = torch.randint(3, 99, (1, 20))
    with pytest.raises(ValueError, match="position_ids"):
        model(input_ids=ids, position_ids=torch.arange(20)[None])


def test_gradients_flow_through_chunks():
    model = chunked_model("llama", "mean").train()
    ids, mask, _ = padded_batch([20, 9], "left")
    loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2])).loss
    loss.backward()
    grad = model.backbone.get_input_embeddings().weight.grad
    assert grad is not None and grad[ids[0, -1]].abs().sum() > 0  # the last chunk's tokens reached the loss


# --------------------------------------------------------------------------------------------------------------------
# the two users of `pooled_features`: the pipeline and the fit's feature extraction
# --------------------------------------------------------------------------------------------------------------------


def test_pipeline_reads_long_texts_in_chunks(tmp_path):
    model = chunked_model("bert", "mean", window=16, overlap=4)
    tokenizer = make_tiny_tokenizer()
    text = " ".join(f"w{i % 90}" for i in range(50))
    encoded = tokenizer(text, truncation=False, return_tensors="pt")
    assert encoded["input_ids"].shape[1] == 50 > model._window
    with torch.no_grad():
        probs = model(**encoded).logits.softmax(-1)[0]
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None)
    for call in (classifier([text])[0], classifier([text], truncation=False)[0]):
        scores = {item["label"]: item["score"] for item in call}
        assert scores == pytest.approx({model.config.id2label[i]: float(p) for i, p in enumerate(probs)}, abs=1e-6)


def test_feature_extraction_for_the_fit_uses_the_same_chunking(tmp_path):
    from stc_transformers.extraction import extract_features

    model = chunked_model("bert", "max", window=16, overlap=4)
    tokenizer = make_tiny_tokenizer()
    texts = [" ".join(f"w{(i * 7 + j) % 90}" for j in range(n)) for i, n in enumerate([50, 3, 31])]
    cache = extract_features(model, tokenizer, texts, tmp_path, max_length=None, batch_size=2, progress=False)
    block = cache.array("hidden", "max")  # [layers, texts, hidden]
    for i, text in enumerate(texts):
        encoded = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            features = model.pooled_features(**encoded)[0]
        hidden = features[: 3 * 32].reshape(3, 32).numpy()
        np.testing.assert_allclose(block[:, i], hidden, rtol=1e-5, atol=1e-5)
