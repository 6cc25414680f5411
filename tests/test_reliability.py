"""Reliability: damaged checkpoints fail loudly, interrupted saves never load silently, reduced precision stays
finite, and the same seed / checkpoint gives bit-identical predictions."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import transformers.modeling_utils as modeling_utils
from conftest import STCModelTester, make_tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

from stc_transformers import STCForSequenceClassification
from stc_transformers.extraction import FeatureCache
from stc_transformers.features_stc import pool
from stc_transformers.modeling_stc import STCHead
from stc_transformers.selection import block_statistics


TESTER = STCModelTester()
INPUTS = TESTER.inputs()
FP16_MAX = torch.finfo(torch.float16).max  # 65504


@pytest.fixture(autouse=True)
def quiet_transformers():
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    yield
    hf_logging.set_verbosity(verbosity)
    hf_logging.enable_progress_bar()


def logits(model, inputs=INPUTS):
    with torch.no_grad():
        return model(**inputs).logits


def saved(tmp_path, name="ckpt", arch="bert", seed=0, **kwargs):
    model = TESTER.model(arch, seed=seed, num_labels=2, **kwargs)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


# --------------------------------------------------------------------------------------------------------------------
# damaged checkpoints
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["empty", "inside_length", "inside_header", "inside_data", "last_byte"])
def test_truncated_weights_fail_loudly(tmp_path, cut):
    _, folder = saved(tmp_path)
    weights = folder / "model.safetensors"
    raw = weights.read_bytes()
    size = {"empty": 0, "inside_length": 5, "inside_header": 8 + header_length(weights) // 2,
            "inside_data": len(raw) // 2 + 3, "last_byte": len(raw) - 1}[cut]
    weights.write_bytes(raw[:size])
    with pytest.raises(OSError, match="truncated or corrupted"):
        STCForSequenceClassification.from_pretrained(folder)


_HEADER_CASE = {}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.floats(0, 1, exclude_max=True), flip=st.sampled_from([0x01, 0x02, 0x20, 0x80, 0xFF]))
def test_corrupted_header_byte_fails_or_changes_nothing(tmp_path_factory, position, flip):
    """Any one-byte corruption of the safetensors header (names, dtypes, shapes, offsets) either raises a clear
    OSError or (only for bytes of the free-form metadata) loads the exact same weights: never a silent change."""
    if not _HEADER_CASE:
        tmp = tmp_path_factory.mktemp("header")
        model, folder = saved(tmp, arch="bert")
        _HEADER_CASE.update(model=model, folder=folder, raw=(folder / "model.safetensors").read_bytes())
    folder, raw = _HEADER_CASE["folder"], _HEADER_CASE["raw"]
    index = int(position * (8 + struct.unpack("<Q", raw[:8])[0]))
    damaged = bytearray(raw)
    damaged[index] ^= flip
    (folder / "model.safetensors").write_bytes(bytes(damaged))
    try:
        loaded = STCForSequenceClassification.from_pretrained(folder)
    except OSError as error:
        assert "corrupted" in str(error)
    else:
        assert torch.equal(logits(loaded), logits(_HEADER_CASE["model"]))
    finally:
        (folder / "model.safetensors").write_bytes(raw)


def rewrite_weights(folder: Path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "change,key",
    [
        (lambda t: t.pop("head.classifier.bias"), "head.classifier.bias"),
        (lambda t: t.pop("backbone.encoder.layer.1.output.dense.weight"), "backbone.encoder.layer.1.output.dense"),
        (lambda t: t.update({"backbone.extra.weight": torch.zeros(3)}), "backbone.extra.weight"),
        (lambda t: t.update({"head.feature_scale_renamed": t.pop("head.feature_scale")}), "head.feature_scale"),
    ],
    ids=["missing_head", "missing_backbone", "unexpected", "renamed"],
)
def test_missing_or_unexpected_weights_are_refused(tmp_path, change, key):
    """transformers 5 only logs these and initialises missing weights at random; STC refuses the checkpoint."""
    _, folder = saved(tmp_path)
    rewrite_weights(folder, change)
    for loader in (STCForSequenceClassification, AutoModelForSequenceClassification):
        with pytest.raises(OSError, match="incomplete or corrupted") as error:
            loader.from_pretrained(folder)
        assert key in str(error.value)


def test_complete_checkpoint_still_reports_loading_info(tmp_path):
    model, folder = saved(tmp_path)
    loaded, info = STCForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(logits(loaded), logits(model))


def test_mismatched_shape_fails_loudly(tmp_path):
    _, folder = saved(tmp_path)
    rewrite_weights(folder, lambda t: t.update({"head.classifier.bias": torch.zeros(5)}))
    with pytest.raises(RuntimeError, match="size"):
        STCForSequenceClassification.from_pretrained(folder)


# --------------------------------------------------------------------------------------------------------------------
# interrupted saves
# --------------------------------------------------------------------------------------------------------------------

_real_writer = modeling_utils.safe_save_file


def fail_before_weights(*args, **kwargs):
    raise OSError("simulated: disk full before the weights")


def fail_mid_write(tensors, filename, metadata=None):
    _real_writer(tensors, filename, metadata=metadata)
    data = Path(filename).read_bytes()
    Path(filename).write_bytes(data[: len(data) // 2])
    raise OSError("simulated: disk full while writing")


def fail_on_second_shard():
    calls = []

    def writer(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("simulated: disk full on shard 2")
        _real_writer(tensors, filename, metadata=metadata)

    return writer


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".stc-saving-")]


@pytest.mark.parametrize("failure", ["before_weights", "mid_write", "second_shard"])
def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, failure):
    shards = {"max_shard_size": "100KB"} if failure == "second_shard" else {}
    old = TESTER.model("bert", seed=0, num_labels=2, id2label={0: "neg", 1: "pos"})
    new = TESTER.model("bert", seed=1, num_labels=2, id2label={0: "bad", 1: "good"})
    folder = tmp_path / "ckpt"
    old.save_pretrained(folder, **shards)
    before = sorted(p.name for p in folder.iterdir())
    writer = {"before_weights": fail_before_weights, "mid_write": fail_mid_write,
              "second_shard": fail_on_second_shard()}[failure]
    with mock.patch.object(modeling_utils, "safe_save_file", writer), pytest.raises(OSError, match="simulated"):
        new.save_pretrained(folder, **shards)
    assert sorted(p.name for p in folder.iterdir()) == before and not leftovers(folder)
    loaded = STCForSequenceClassification.from_pretrained(folder)
    assert loaded.config.id2label == {0: "neg", 1: "pos"}
    assert torch.equal(logits(loaded), logits(old))


def test_crash_while_swapping_files_in_fails_loudly(tmp_path):
    old, folder = saved(tmp_path, seed=0)
    new = TESTER.model("bert", seed=1, num_labels=2)
    real_replace, moved = os.replace, []

    def replace(src, dst):
        if moved:
            raise KeyboardInterrupt  # killed after the first file moved in
        moved.append(dst)
        real_replace(src, dst)

    with mock.patch("os.replace", replace), pytest.raises(KeyboardInterrupt):
        new.save_pretrained(folder)
    assert not (folder / "config.json").exists() and not leftovers(folder)
    with pytest.raises(OSError, match="config.json"):
        STCForSequenceClassification.from_pretrained(folder)
    new.save_pretrained(folder)  # saving again repairs it
    assert torch.equal(logits(STCForSequenceClassification.from_pretrained(folder)), logits(new))


@pytest.mark.parametrize("old_shards,new_shards", [("100KB", None), (None, "100KB")])
def test_resave_keeps_other_files_and_drops_stale_weights(tmp_path, old_shards, new_shards):
    folder = tmp_path / "ckpt"
    make_tiny_tokenizer().save_pretrained(folder)
    (folder / "training_args.bin").write_bytes(b"trainer state")
    TESTER.model("bert", seed=0, num_labels=2).save_pretrained(folder, max_shard_size=old_shards or "50GB")
    new = TESTER.model("bert", seed=1, num_labels=2)
    new.save_pretrained(folder, max_shard_size=new_shards or "50GB")
    names = {p.name for p in folder.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "training_args.bin", "config.json"} <= names
    weights = {n for n in names if n.startswith("model") and ".safetensors" in n}
    if new_shards:
        assert "model.safetensors" not in weights and "model.safetensors.index.json" in weights
    else:
        assert weights == {"model.safetensors"}
    assert not leftovers(folder)
    assert torch.equal(logits(STCForSequenceClassification.from_pretrained(folder)), logits(new))


# --------------------------------------------------------------------------------------------------------------------
# precision
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reduced_precision_backbone_gives_finite_float32_features(arch, dtype):
    reference = TESTER.model(arch, num_labels=3, poolings=["mean", "max", "first", "last"])
    model = TESTER.model(arch, num_labels=3, poolings=["mean", "max", "first", "last"])
    model.backbone.to(dtype)
    assert next(model.backbone.parameters()).dtype == dtype
    assert model.head.classifier.weight.dtype == model.head.feature_mean.dtype == torch.float32
    with torch.no_grad():
        features, expected = model.pooled_features(**INPUTS), reference.pooled_features(**INPUTS)
        out = model(**INPUTS, labels=torch.tensor([0, 1, 2]))
    assert features.dtype == torch.float32 and torch.isfinite(features).all()
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    # each feature within a few roundings of the float32 one (per element, so zeroed small features would fail);
    # the small absolute term covers features near zero computed from rounded larger values
    eps, scale = torch.finfo(dtype).eps, expected.abs().amax()
    assert ((features - expected).abs() <= 8 * eps * expected.abs() + 4 * eps * scale).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loading_in_half_precision_keeps_the_head_float32(tmp_path, dtype):
    model, folder = saved(tmp_path, arch="bert")
    loaded = STCForSequenceClassification.from_pretrained(folder, dtype=dtype)
    assert next(loaded.backbone.parameters()).dtype == dtype
    assert {t.dtype for t in loaded.head.state_dict().values()} == {torch.float32}
    expected = logits(model)
    assert expected.abs().amax() > 0.1  # logits far from zero: the tolerance below tells a wrong model apart
    tolerance = 20 * torch.finfo(dtype).eps * expected.abs().amax()  # a few roundings of the logits' size
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("method", ["mean", "max", "first", "last"])
def test_pool_of_fp16_activations_near_the_maximum_does_not_overflow(method):
    generator = torch.Generator().manual_seed(0)
    states = (FP16_MAX - 1000 * torch.rand(4, 9, 6, generator=generator)).to(torch.float16)
    states[:2, ::2] *= -1  # rows 0-1: alternating signs near both ends of the range; rows 2-3: all near +max
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[0, 6:] = 0
    mask[1, :3] = 0
    pooled = pool(states, mask, method)
    assert pooled.dtype == torch.float32 and torch.isfinite(pooled).all()
    assert torch.isinf(states[2:].sum(1)).all()  # a naive fp16 sum overflows
    reference = []
    for row in range(4):
        real = states[row][mask[row].bool()].double().numpy()
        reference.append({"mean": real.mean(0), "max": real.max(0), "first": real[0], "last": real[-1]}[method])
    np.testing.assert_allclose(pooled.double().numpy(), np.stack(reference), rtol=1e-6)
    variance = pooled.var(0)  # statistics over pooled features are float32 (float64 in the fit), never fp16
    assert torch.isfinite(variance).all()
    np.testing.assert_allclose(variance.double().numpy(), np.stack(reference).var(0, ddof=1), rtol=1e-3)


def test_standardisation_statistics_of_huge_features_are_finite(tmp_path):
    """`block_statistics` (float64 accumulation) on a cache of features near the fp16 maximum."""
    rng = np.random.default_rng(0)
    values = (FP16_MAX - rng.random((2, 500, 4)) * 10).astype(np.float32)
    values[:, :, 1] = rng.normal(0, 1, (2, 500))
    values[:, :, 2] = 60000.0  # constant feature -> scale 1
    np.save(tmp_path / "hidden_max.npy", values)
    cache = FeatureCache(tmp_path, {"num_texts": 500, "blocks": [{"source": "hidden", "pooling": "max"}]})
    mean, scale = block_statistics(cache, chunk_rows=64)[("hidden", "max")]
    assert np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()
    np.testing.assert_allclose(mean, values.astype(np.float64).mean(1), rtol=1e-6)
    np.testing.assert_allclose(scale[:, [0, 1, 3]], values.astype(np.float64).std(1)[:, [0, 1, 3]], rtol=1e-3)
    assert (scale[:, 2] == 1.0).all()
    head = STCHead(4, 2)
    head.feature_mean.copy_(torch.from_numpy(mean[0]))
    head.feature_scale.copy_(torch.from_numpy(scale[0]))
    standardized = head.standardized(torch.from_numpy(values[0]))
    assert standardized.dtype == torch.float32 and torch.isfinite(standardized).all()
    assert standardized[:, [0, 1, 3]].std(0).sub(1).abs().max() < 1e-2


def test_fp16_overflow_inside_the_backbone_fails_the_fit_loudly(tmp_path):
    from stc_transformers.extraction import extract_features

    model = TESTER.model("llama", num_labels=2)
    with torch.no_grad():
        model.backbone.layers[0].mlp.up_proj.weight.mul_(1e4)
        model.backbone.layers[0].mlp.gate_proj.weight.mul_(1e4)
    model.backbone.to(torch.float16)
    texts = ["w1 w2 w3 w4 w5 w6", "w7 w8 w9"]
    with pytest.raises(ValueError, match="float16"):
        extract_features(model, make_tiny_tokenizer(), texts, tmp_path, progress=False)


# --------------------------------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------------------------------

_FINGERPRINT = """
import hashlib, sys, torch
sys.path.insert(0, {tests!r})
from conftest import STCModelTester
model = STCModelTester().model("llama", seed=7, num_labels=3)
digest = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    digest.update(name.encode()); digest.update(tensor.numpy().tobytes())
with torch.no_grad():
    digest.update(model(**STCModelTester.inputs()).logits.numpy().tobytes())
print(digest.hexdigest())
"""


def fingerprint(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    digest.update(logits(model).numpy().tobytes())
    return digest.hexdigest()


def test_same_seed_same_model_and_predictions():
    first, second = TESTER.model("llama", seed=7, num_labels=3), TESTER.model("llama", seed=7, num_labels=3)
    assert fingerprint(first) == fingerprint(second)
    assert torch.equal(logits(first), logits(second))
    assert not torch.equal(logits(TESTER.model("llama", seed=8, num_labels=3)), logits(first))


def test_same_seed_same_model_in_a_fresh_process():
    """A new interpreter with another hash seed builds the same weights and predicts the same bits."""
    script = _FINGERPRINT.format(tests=str(Path(__file__).parent))
    env = {**os.environ, "PYTHONHASHSEED": "12345", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                            check=True)
    assert result.stdout.strip().splitlines()[-1] == fingerprint(TESTER.model("llama", seed=7, num_labels=3))


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "modernbert"])
def test_save_load_predict_is_bit_identical(tmp_path, arch):
    model = TESTER.model(arch, num_labels=3, poolings=["mean", "max", "first", "last"])
    for side in ("right", "left"):
        inputs = TESTER.inputs(padding_side=side)
        expected = logits(model, inputs)
        model.save_pretrained(tmp_path / side)
        for _ in range(2):
            loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / side)
            assert torch.equal(logits(loaded, inputs), expected)
    saved_config = json.loads((tmp_path / "right" / "config.json").read_text())
    assert saved_config["model_type"] == "stc"


def test_sparsified_and_chunked_model_round_trips_bit_identically(tmp_path):
    config = TESTER.backbone_config("bert")
    config.max_position_embeddings = 8
    torch.manual_seed(3)
    from stc_transformers import STCConfig

    model = STCForSequenceClassification(
        STCConfig(text_config=config.to_dict(), num_labels=2, long_input_chunks=True, chunk_overlap=2)
    ).eval()
    model.sparsify(eta=0.5)
    inputs = {"input_ids": torch.randint(3, 99, (2, 19)), "attention_mask": torch.ones(2, 19, dtype=torch.long)}
    inputs["attention_mask"][1, 12:] = 0
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = STCForSequenceClassification.from_pretrained(tmp_path)
    assert loaded.config.long_input_chunks and loaded.config.selection == model.config.selection
    assert torch.equal(logits(loaded, inputs), expected)
