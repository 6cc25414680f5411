"""STCForSequenceClassification on tiny random backbones of ten architectures, plus the real MiniLM."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import ARCHITECTURES, STCModelTester, make_tiny_tokenizer
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, pipeline

from stc_transformers import STCConfig, STCForSequenceClassification
from stc_transformers.modeling_stc import feature_groups, group_size
from stc_transformers.tokenization import prepare_tokenizer


def zero_layer_weights(model, layer):
    """Zero the head columns of one layer so sparsify can drop it."""
    start = 0
    with torch.no_grad():
        for group in feature_groups(model.config, model.source_dims):
            size = group_size(group)
            if group["layer"] == layer:
                model.head.classifier.weight[:, start : start + size] = 0
            start += size


@pytest.mark.parametrize("arch", ARCHITECTURES)
class TestEveryArchitecture:
    def test_forward_shapes_and_feature_count(self, tester, arch):
        model = tester.model(arch, num_labels=4)
        out = model(**tester.inputs())
        assert out.logits.shape == (3, 4)
        assert out.loss is None
        dims = model.source_dims
        expected = len(model.config.poolings) * tester.num_layers * (dims["hidden"] + dims["mlp"])
        assert model.selector.num_features == expected
        assert dims["hidden"] == tester.hidden
        assert dims["mlp"] == (4 * tester.hidden if arch == "gpt2" else tester.intermediate)

    @pytest.mark.parametrize(
        "problem_type,num_labels,labels",
        [
            ("single_label_classification", 3, torch.tensor([0, 2, 1])),
            ("multi_label_classification", 3, torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 0]])),
            ("regression", 1, torch.tensor([0.5, -1.0, 2.0])),
        ],
    )
    def test_loss_for_each_problem_type(self, tester, arch, problem_type, num_labels, labels):
        model = tester.model(arch, num_labels=num_labels, problem_type=problem_type)
        out = model(**tester.inputs(), labels=labels)
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        F = torch.nn.functional
        losses = {"single_label_classification": lambda z: F.cross_entropy(z, labels),
                  "multi_label_classification": lambda z: F.binary_cross_entropy_with_logits(z, labels),
                  "regression": lambda z: F.mse_loss(z.squeeze(-1), labels)}
        torch.testing.assert_close(out.loss, losses[problem_type](out.logits))
        tuple_out = model(**tester.inputs(), labels=labels, return_dict=False)
        assert isinstance(tuple_out, tuple)
        torch.testing.assert_close(tuple_out[0], out.loss)
        torch.testing.assert_close(tuple_out[1], out.logits)

    def test_save_load_and_auto_round_trip(self, tester, arch, tmp_path):
        model = tester.model(arch, num_labels=3)
        inputs = tester.inputs()
        expected = model(**inputs).logits
        model.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").exists()
        assert not list(tmp_path.glob("*.bin"))
        assert isinstance(AutoConfig.from_pretrained(tmp_path), STCConfig)
        for loader in (STCForSequenceClassification, AutoModelForSequenceClassification):
            loaded = loader.from_pretrained(tmp_path).eval()
            assert isinstance(loaded, STCForSequenceClassification)
            torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)

    def test_sparsify_early_exit_gives_same_logits(self, tester, arch, tmp_path):
        model = tester.model(arch, num_labels=2)
        zero_layer_weights(model, tester.num_layers - 1)
        inputs = tester.inputs()
        dense = model(**inputs).logits
        model.sparsify(eta=1.0, truncate=False)
        assert model.config.exit_layer == tester.num_layers - 2
        untruncated = model(**inputs).logits
        torch.testing.assert_close(untruncated, dense)
        eos = model.config.text_config.eos_token_id
        model.config.text_config.eos_token_id = [1, 2, 3][: tester.num_layers]  # one id per layer, by chance
        model.truncate_backbone()
        kept = tester.num_layers if model.layer_map.shared else tester.num_layers - 1  # a reused block stays
        assert model.layer_map.num_layers == model.config.text_config.num_hidden_layers == kept
        assert model.config.text_config.eos_token_id == [1, 2, 3]  # token ids are not per-layer settings
        model.config.text_config.eos_token_id = eos
        torch.testing.assert_close(model(**inputs).logits, untruncated, rtol=0, atol=0)
        model.save_pretrained(tmp_path)
        loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        assert loaded.layer_map.num_layers == kept
        torch.testing.assert_close(loaded(**inputs).logits, untruncated, rtol=0, atol=0)

    def test_inference_stops_at_the_last_down_projection_it_needs(self, tester, arch):
        """When the last layer read gives only MLP neurons, inference stops at that layer's down-projection: the
        same logits as a full forward (with gradients, nothing stops), and the down-projection never runs."""
        model = tester.model(arch, num_labels=2, sources=["mlp"], poolings=["mean", "max"])
        inputs = tester.inputs()
        calls = []
        runs = model.layer_map.num_layers // len(model.layer_map.layers)  # calls per forward (ALBERT: every layer)
        handle = model.layer_map.down_projections[-1].register_forward_hook(lambda *_: calls.append(1))
        full = model(**inputs).logits
        assert len(calls) == runs
        with torch.inference_mode():
            stopped = model(**inputs).logits
        handle.remove()
        assert len(calls) == 2 * runs - 1
        torch.testing.assert_close(stopped, full)  # T5 differs by 1e-7 with and without autograd

    def test_exit_layer_up_projection_computes_only_the_kept_neurons(self, tester, arch):
        """When inference stops at the exit layer's MLP, that layer's up-projection(s) compute only its kept neurons
        (checked once on a probe pass): the same logits as at full width, and the modules get their own forward
        back after each pass. One block running every layer (ALBERT) is never narrowed."""
        model = tester.model(arch, num_labels=2, sources=["hidden", "mlp"], poolings=["mean", "max"])
        last = tester.num_layers - 1
        selection = [{"source": "hidden", "pooling": "mean", "layer": 0, "neurons": [1, 5, 7]},
                     {"source": "mlp", "pooling": "mean", "layer": last, "neurons": [0, 3, 20]},
                     {"source": "mlp", "pooling": "max", "layer": last, "neurons": [3, 9, 36]}]
        model.set_selection(selection, torch.randn(2, 9), torch.zeros(2), truncate=False)
        inputs = tester.inputs()
        widths = []
        with torch.inference_mode():
            narrowed = model(**inputs).logits  # the first pass checks the narrowing
            modules = model._narrowed
            handles = [m.register_forward_hook(lambda m, a, out: widths.append(out.shape[-1])) for m, _ in modules]
            torch.testing.assert_close(model(**inputs).logits, narrowed, rtol=0, atol=0)
        for handle in handles:
            handle.remove()
        assert bool(modules) == (not model.layer_map.shared)
        assert widths == [5 * parts for _, parts in modules]  # the union {0, 3, 9, 20, 36}, per gate/up part
        assert all("forward" not in vars(module) for module, _ in modules)
        model._narrowed = []  # full width
        with torch.inference_mode():
            torch.testing.assert_close(narrowed, model(**inputs).logits)
        torch.testing.assert_close(narrowed, model(**inputs).logits)  # with gradients: nothing stops or narrows
        assert model._narrowed == []

    def test_gradients_equal_with_activation_checkpointing(self, tester, arch):
        model = tester.model(arch, num_labels=2)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model.train()
        inputs, labels = tester.inputs(), torch.tensor([0, 1, 1])

        def gradients():
            torch.manual_seed(0)  # functional dropout (e.g. OPT's) draws the same masks in both runs
            model.zero_grad()
            model(**inputs, labels=labels).loss.backward()
            return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        plain = gradients()
        assert model.supports_gradient_checkpointing == model.backbone.supports_gradient_checkpointing
        if not model.backbone.supports_gradient_checkpointing:  # e.g. MPNet: transformers refuses, clearly
            with pytest.raises(ValueError, match="does not support activation checkpointing"):
                model.activation_checkpointing_enable()
            return
        model.activation_checkpointing_enable()
        assert all(layer.gradient_checkpointing for layer in model.layer_map.layers)
        checkpointed = gradients()
        assert plain.keys() == checkpointed.keys()
        assert any(name.startswith("backbone.") for name in plain)
        for name in plain:
            torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_reentrant_checkpointing_fails_loudly(tester):
    model = tester.model("llama", num_labels=2).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RuntimeError, match="use_reentrant"):
        model(**tester.inputs(), labels=torch.tensor([0, 1, 1])).loss.backward()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_decoder_batches_match_single_texts(tester, arch, padding_side):
    """Last-token and mean pooling are right for left and right padding: a padded batch equals one-by-one runs."""
    model = tester.model(arch, num_labels=2, poolings=["last", "mean", "max", "first"])
    tokenizer = make_tiny_tokenizer(pad=False, padding_side=padding_side)
    prepare_tokenizer(tokenizer, model)
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id
    texts = ["w1 w2 w3 w4 w5", "w6 w7", "w8"]
    batch = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    single = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts])
    torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_roberta_positions_do_not_depend_on_the_pad_token(padding_side):
    """RoBERTa numbers positions from the ids (`!= padding_idx`); STC counts them from the mask, so a tokenizer
    padding with another token (EOS, as `prepare_tokenizer` gives decoder tokenizers) changes nothing."""
    config = AutoConfig.for_model("roberta", vocab_size=99, **MORE_BACKBONES["roberta"][0])
    torch.manual_seed(0)
    model = STCForSequenceClassification(STCConfig(text_config=config.to_dict())).eval()
    rows = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([10, 11])]
    ids = torch.full((2, 5), 2)  # padded with id 2, not RoBERTa's padding index 1
    mask = torch.zeros(2, 5, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(5 - len(row), 5) if padding_side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    single = torch.cat([model.pooled_features(row[None]) for row in rows])
    torch.testing.assert_close(model.pooled_features(ids, mask), single, rtol=1e-4, atol=1e-5)


def test_pipeline_with_labels_top_k_and_multi_label(tester, tmp_path):
    labels = {0: "neg", 1: "neu", 2: "pos"}
    model = tester.model("llama", num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    tokenizer = prepare_tokenizer(make_tiny_tokenizer(pad=False), model)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        classifier = pipeline("text-classification", model=str(tmp_path))
        top = classifier(["w1 w2 w3", "w4"])
        every = classifier(["w1 w2 w3"], top_k=None)
    assert top[0]["label"] in labels.values()
    assert [d["label"] for d in every[0]] and sorted(d["label"] for d in every[0]) == sorted(labels.values())
    assert abs(sum(d["score"] for d in every[0]) - 1) < 1e-5
    # the pipeline agrees with the model's own forward
    logits = model(**tokenizer(["w1 w2 w3"], return_tensors="pt")).logits[0]
    assert every[0][0]["label"] == labels[int(logits.argmax())]

    multi = tester.model("bert", num_labels=3, problem_type="multi_label_classification", id2label=labels,
                         label2id={v: k for k, v in labels.items()})
    classifier = pipeline("text-classification", model=multi, tokenizer=make_tiny_tokenizer())
    scores = classifier("w5 w6", top_k=None)
    with torch.no_grad():
        probs = torch.sigmoid(multi(**make_tiny_tokenizer()(["w5 w6"], return_tensors="pt")).logits[0])
    by_label = {d["label"]: d["score"] for d in scores}
    for i, name in labels.items():
        assert by_label[name] == pytest.approx(float(probs[i]), abs=1e-5)


def test_from_backbone_pretrained_keeps_weights_bit_identical(tester, tmp_path):
    torch.manual_seed(0)
    backbone = AutoModel.from_config(tester.backbone_config("llama"))
    backbone.save_pretrained(tmp_path / "backbone")
    model = STCForSequenceClassification.from_backbone_pretrained(tmp_path / "backbone", num_labels=2)
    reference = backbone.state_dict()
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    assert model.config.text_config._attn_implementation == backbone.config._attn_implementation
    assert not any(module.training for module in model.modules())  # in eval mode, as `from_pretrained` gives it


def test_causal_attention_survives_round_trip(tester, tmp_path):
    """Causality is preserved: a decoder's feature for a prefix does not depend on later tokens."""
    torch.manual_seed(0)
    AutoModel.from_config(tester.backbone_config("llama")).save_pretrained(tmp_path / "backbone")
    model = STCForSequenceClassification.from_backbone_pretrained(tmp_path / "backbone", num_labels=2, poolings=["first"])
    model.save_pretrained(tmp_path / "stc")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "stc").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    other = torch.tensor([[5, 9, 10, 11]])
    for m in (model.eval(), loaded):
        torch.testing.assert_close(m.pooled_features(ids), m.pooled_features(other))
    torch.testing.assert_close(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_bfloat16_backbone_keeps_float32_head(tester, tmp_path):
    torch.manual_seed(0)
    AutoModel.from_config(tester.backbone_config("qwen2")).save_pretrained(tmp_path / "backbone")
    model = STCForSequenceClassification.from_backbone_pretrained(
        tmp_path / "backbone", num_labels=2, dtype=torch.bfloat16
    )
    assert next(model.backbone.parameters()).dtype == torch.bfloat16
    assert model.head.classifier.weight.dtype == torch.float32
    out = model(**tester.inputs(), labels=torch.tensor([0, 1, 0]))
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.loss)
    model.save_pretrained(tmp_path / "stc")
    loaded = STCForSequenceClassification.from_pretrained(tmp_path / "stc", dtype=torch.bfloat16)
    assert loaded.head.classifier.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.eval()(**tester.inputs()).logits, model.eval()(**tester.inputs()).logits)


def test_reduced_precision_warns_about_features_steadier_than_its_rounding(tester):
    """A head standardising a feature of spread 2e-5 around 8.0 (older fits selected such max-pooled outlier
    dimensions) warns in bfloat16, where 8.0 rounds to steps of 0.06, and not in float32; under autocast the head
    still computes in float32."""
    from transformers.testing_utils import CaptureLogger

    from stc_transformers import modeling_stc

    inputs = tester.inputs()
    modeling_stc.logger.warning_once.cache_clear()
    model = tester.model("bert")
    with CaptureLogger(modeling_stc.logger) as captured:
        model(**inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(**inputs).logits
    assert captured.out == "" and logits.dtype == torch.float32
    model = tester.model("bert")
    model.head.feature_mean[3], model.head.feature_scale[3] = 8.0, 2e-5
    with CaptureLogger(modeling_stc.logger) as captured:
        model(**inputs)
    assert captured.out == ""
    def float16():
        model.backbone.to(torch.float16)
        return contextlib.nullcontext()

    for dtype, context in {"bfloat16": lambda: torch.autocast("cpu", dtype=torch.bfloat16), "float16": float16}.items():
        with CaptureLogger(modeling_stc.logger) as captured, context():
            model(**inputs)
        assert f"1 of the head's features vary over the training texts by less than 1% of their size: in {dtype}" \
            in captured.out


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace:DeprecationWarning",
                            "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("arch,padding_side", [("bert", "right"), ("llama", "left")])
def test_torch_export_and_jit_trace_give_the_eager_logits(tester, arch, padding_side):
    """A fitted (sparsified, truncated) model exports with `torch.export`, the first step of `torch.onnx.export`,
    with dynamic batch size and length, also with a bfloat16 backbone whose head warns in eager mode; the exported
    program gives the eager logits on other shapes and paddings. `torch.jit.trace` (the older ONNX exporter) keeps
    no batch's padding as a constant."""
    model = tester.model(arch)
    zero_layer_weights(model, 2)
    model.sparsify(0.5)
    assert model.backbone.config.num_hidden_layers == 2  # truncated after layer 1
    inputs = tester.inputs(batch=4, length=9, padding_side=padding_side)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens", max=64)}
    for dtype in (torch.float32, torch.bfloat16):
        model.backbone.to(dtype)
        model.head.feature_mean[0], model.head.feature_scale[0] = 8.0, 2e-5  # too steady for bfloat16
        program = torch.export.export(model, (), kwargs=dict(inputs), dynamic_shapes={name: dims for name in inputs})
        for batch, length in ((3, 7), (5, 11)):
            other = tester.inputs(batch=batch, length=length, seed=1, padding_side=padding_side)
            with torch.no_grad():
                expected = model(**other).logits
            torch.testing.assert_close(program.module()(**other).logits, expected)
    model.backbone.to(torch.float32)
    with torch.no_grad():
        traced = torch.jit.trace(model, example_kwarg_inputs=dict(inputs), strict=False)
        other = tester.inputs(batch=4, length=9, seed=1, padding_side=padding_side)
        other["attention_mask"][2, slice(3, None) if padding_side == "right" else slice(0, 6)] = 0  # padded now
        torch.testing.assert_close(traced(**other)["logits"], model(**other).logits)


def test_l1_strength_adds_penalty_only_in_training(tester):
    model = tester.model("bert", num_labels=2, l1_strength=0.01)
    labels = torch.tensor([0, 1, 1])
    eval_loss = model.eval()(**tester.inputs(), labels=labels).loss
    train_model = model.train()
    for module in train_model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    train_loss = train_model(**tester.inputs(), labels=labels).loss
    penalty = 0.01 * model.head.classifier.weight.abs().sum()
    torch.testing.assert_close(train_loss, eval_loss + penalty)


def test_sparsify_keeps_smallest_set_reaching_eta(tester):
    model = tester.model("bert", num_labels=2, sources=["hidden"], poolings=["mean"])
    with torch.no_grad():
        model.head.classifier.weight.zero_()
        # layer 0: importances 9, 4, 1 (+ zeros); eta 0.7 of 14 = 9.8 needs 9 then 4 -> neurons 3 and 5
        model.head.classifier.weight[0, 3] = 3.0
        model.head.classifier.weight[1, 5] = 2.0
        model.head.classifier.weight[0, 7] = 1.0
    model.sparsify(eta=0.7)
    assert model.config.selection == [{"source": "hidden", "pooling": "mean", "layer": 0, "neurons": [3, 5]}]
    assert model.config.exit_layer == 0 and len(model.layer_map.layers) == 1
    assert model.head.classifier.weight.shape == (2, 2)


def test_remote_code_loads_without_the_package(tester, tmp_path):
    model = tester.model("gpt2", num_labels=2)
    zero_layer_weights(model, 2)
    model.sparsify(0.9)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSequenceClassification"] == "modeling_stc.STCForSequenceClassification"
    for name in ("modeling_stc.py", "configuration_stc.py", "features_stc.py"):
        assert (tmp_path / name).exists()
    inputs = tester.inputs()
    np.save(tmp_path / "ids.npy", inputs["input_ids"].numpy())
    np.save(tmp_path / "mask.npy", inputs["attention_mask"].numpy())
    expected = model(**inputs).logits
    script = f"""
import sys, numpy as np, torch
sys.modules["stc_transformers"] = None  # the package cannot be imported
from transformers import AutoModelForSequenceClassification
path = {str(tmp_path)!r}
model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
ids, mask = torch.from_numpy(np.load(path + "/ids.npy")), torch.from_numpy(np.load(path + "/mask.npy"))
np.save(path + "/remote.npy", model(input_ids=ids, attention_mask=mask).logits.detach().numpy())
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # another process: CPU kernels may sum in another order (memory alignment), so not bit for bit
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "remote.npy")), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------


def test_unknown_pooling_or_source_names(tester):
    with pytest.raises(ValueError, match="Unknown pooling.*choose"):
        tester.stc_config("bert", poolings=["median"])
    with pytest.raises(ValueError, match="Unknown source.*choose"):
        tester.stc_config("bert", sources=["attention"])


def assert_captures_match_the_backbone(model, inputs, hidden_index: int = 2):
    """The pooled hidden and MLP means of layer 1 equal the backbone's own tensors, averaged over real tokens.
    `hidden_index`: layer 1's output in `hidden_states` (2, after the embeddings, in most models)."""
    mlp_inputs = []
    handles = [projection.register_forward_pre_hook(lambda m, args: mlp_inputs.append(args[0]))
               for projection in model.layer_map.down_projections[1:2] if projection is not None]  # mlp source
    with torch.no_grad():
        pooled = model.pooled_features(**inputs)
        hidden = model.backbone(**inputs, output_hidden_states=True).hidden_states
    for handle in handles:
        handle.remove()
    mask = inputs["attention_mask"].bool()
    names = model.feature_names()
    sources = [("hidden", hidden[hidden_index])]
    sources += [("mlp", mlp.reshape(mask.shape[0], -1, mlp.shape[-1])[:, : mask.shape[1]]) for mlp in mlp_inputs[:1]]
    for source, states in sources:
        columns = [i for i, n in enumerate(names) if n[:3] == (source, "mean", 1)]
        expected = torch.stack([states[row][mask[row]].mean(0) for row in range(mask.shape[0])])
        torch.testing.assert_close(pooled[:, columns], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["opt", "mpnet"])
def test_captured_features_match_the_backbone_tensors(tester, arch):
    """OPT runs its MLP on tokens flattened over the batch, MPNet's blocks are plain modules (no
    `GradientCheckpointingLayer`): both are captured and pooled like the others."""
    assert_captures_match_the_backbone(tester.model(arch, num_labels=2, poolings=["mean"]), tester.inputs())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mlp_as_wide_as_the_hidden_state_is_found_by_name(arch):
    """With intermediate_size == hidden_size the shapes cannot tell the down-projection from other square
    matrices; its usual name does, and it is the module found when the sizes differ."""
    def names(model):
        modules = {module: name for name, module in model.backbone.named_modules()}
        return [modules[projection] for projection in model.layer_map.down_projections]

    wide = STCModelTester(intermediate=32).model(arch)
    assert names(wide) == names(STCModelTester(intermediate=37).model(arch))


UNUSUAL_BACKBONES = {
    "yoso": {},  # its default position ids start at 2, not 0
    "fnet": {},  # no attention mask: padding reaches real tokens, so positions must be the backbone's own
    "longformer": {"attention_window": [4] * 3},  # pads the 7 tokens to 8 inside, and drops them at the end
    "big_bird": {"attention_type": "block_sparse", "block_size": 2, "num_random_blocks": 1},  # pads to blocks
}


@pytest.mark.parametrize("model_type", UNUSUAL_BACKBONES)
def test_captured_features_match_unusual_backbones(tester, model_type):
    config = AutoConfig.for_model(model_type, vocab_size=99, hidden_size=32, num_hidden_layers=3,
                                  num_attention_heads=4, intermediate_size=37, pad_token_id=0,
                                  max_position_embeddings=64, **UNUSUAL_BACKBONES[model_type])
    torch.manual_seed(0)
    model = STCForSequenceClassification(STCConfig(text_config=config.to_dict(), poolings=["mean"])).eval()
    assert_captures_match_the_backbone(model, tester.inputs())


_DECODER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=37, pad_token_id=0, bos_token_id=1, eos_token_id=1)
_MOE = dict(_DECODER, intermediate_size=32)  # the fused expert kernels need 16-byte aligned rows
MORE_BACKBONES = {  # model type: (config arguments, sources)
    "roberta": (dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                     pad_token_id=1, max_position_embeddings=64), ["hidden", "mlp"]),
    "distilbert": (dict(dim=32, n_layers=3, n_heads=4, hidden_dim=37, pad_token_id=0), ["hidden", "mlp"]),
    "electra": (dict(embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=37, pad_token_id=0), ["hidden", "mlp"]),
    "gemma2": (dict(_DECODER, head_dim=8, layer_types=
                    ["sliding_attention", "full_attention", "sliding_attention"]), ["hidden", "mlp"]),
    "phi3": (_DECODER, ["hidden", "mlp"]),
    "falcon": (dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, pad_token_id=0), ["hidden", "mlp"]),
    "gpt_neox": (dict(_DECODER), ["hidden", "mlp"]),
    "bloom": (dict(hidden_size=32, n_layer=3, n_head=4, pad_token_id=0), ["hidden", "mlp"]),
    "gpt_bigcode": (dict(n_embd=32, n_layer=3, n_head=4, pad_token_id=0), ["hidden", "mlp"]),
    "mixtral": (dict(_MOE, num_local_experts=4, num_experts_per_tok=2), ["hidden"]),  # MoE: hidden only
    "qwen3_moe": (dict(_MOE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16), ["hidden"]),
    "mamba": (dict(hidden_size=32, num_hidden_layers=3, state_size=4, pad_token_id=0), ["hidden"]),  # state-space
}


@pytest.mark.parametrize("model_type", MORE_BACKBONES)
def test_captured_features_match_more_backbones(tester, model_type):
    """Encoders and decoders beyond the ones the other tests fit, and MoE / state-space blocks with the hidden
    source: the hooks read the backbone's own layer outputs (and MLP neurons)."""
    arguments, sources = MORE_BACKBONES[model_type]
    config = AutoConfig.for_model(model_type, vocab_size=99, **arguments)
    torch.manual_seed(0)
    model = STCForSequenceClassification(STCConfig(text_config=config.to_dict(), poolings=["mean"],
                                                   sources=sources)).eval()
    # Mamba's hidden_states start at the first layer's output, not at the embeddings
    assert_captures_match_the_backbone(model, tester.inputs(), hidden_index=1 if model_type == "mamba" else 2)
    if sources == ["hidden"]:
        with pytest.raises(ValueError, match="no single dense MLP"):
            STCForSequenceClassification(STCConfig(text_config=config.to_dict()))


def test_backbones_with_other_layouts_are_refused(tester):
    """Sequence-first states (XLNet), blocks called around their hooks (SqueezeBERT) and layers that are not one
    stack (CANINE) get an error that says so, never features pooled over the wrong axis."""
    from transformers import CanineConfig, SqueezeBertConfig, XLNetConfig

    xlnet = XLNetConfig(vocab_size=99, d_model=32, n_layer=3, n_head=4, d_inner=37, pad_token_id=0)
    squeeze = SqueezeBertConfig(vocab_size=99, hidden_size=32, embedding_size=32, num_hidden_layers=3,
                                num_attention_heads=4, intermediate_size=37, pad_token_id=0, q_groups=1, k_groups=1,
                                v_groups=1, post_attention_groups=1, intermediate_groups=1, output_groups=1)
    for config, match in ((xlnet, r"shape \(7, 3, 32\) for a batch of 3 texts of 7 tokens.*not supported"),
                          (squeeze, r"without calling the hooks of its blocks.*not supported")):
        model = STCForSequenceClassification(STCConfig(text_config=config.to_dict(), sources=["hidden"])).eval()
        with pytest.raises(ValueError, match=match):
            model(**tester.inputs())
    with pytest.raises(ValueError, match="no single dense MLP"):  # its MLP is a 1-D convolution
        STCForSequenceClassification(STCConfig(text_config=squeeze.to_dict()))
    model = tester.model("bert")  # a down-projection replaced after the model was built, as quantize_dynamic does
    layer = model.backbone.encoder.layer[1].output
    layer.dense = torch.nn.Linear(layer.dense.in_features, layer.dense.out_features)
    for gradients in (True, False):
        with torch.set_grad_enabled(gradients), pytest.raises(ValueError, match=r"mlp of layer 1 never came.*replaced"):
            model(**tester.inputs())
    canine = CanineConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                          num_hash_buckets=64, max_position_embeddings=64)
    with pytest.raises(ValueError, match="not one stack of blocks"):
        STCForSequenceClassification(STCConfig(text_config=canine.to_dict()))


def test_encoder_decoder_backbones_give_their_encoder_or_a_clear_error(tester, tmp_path):
    from transformers import BartConfig, T5ForConditionalGeneration, T5Model

    t5 = tester.backbone_config("t5")
    T5ForConditionalGeneration(t5).save_pretrained(tmp_path / "t5")
    model = STCForSequenceClassification.from_backbone_pretrained(tmp_path / "t5", num_labels=2).eval()
    assert type(model.backbone).__name__ == "T5EncoderModel"
    model.save_pretrained(tmp_path / "stc")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "stc").eval()
    inputs = tester.inputs()
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass the encoder only"):
        STCForSequenceClassification(STCConfig(text_config=t5.to_dict()), backbone=T5Model(t5))
    bart = BartConfig(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37)
    with pytest.raises(ValueError, match="encoder-decoder model without an encoder-only class"):
        STCForSequenceClassification(STCConfig(text_config=bart.to_dict()))
    with pytest.raises(ValueError, match="t5gemma config has no `num_hidden_layers`.*not supported"):
        STCForSequenceClassification(STCConfig(text_config=AutoConfig.for_model("t5gemma").to_dict()))


def _albert(**kwargs):
    from transformers import AlbertConfig

    config = AlbertConfig(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=4,
                          num_attention_heads=4, intermediate_size=37, **kwargs)
    torch.manual_seed(0)
    return config


def test_backbone_running_one_block_for_every_layer(tester, tmp_path):
    """ALBERT runs one block for all its layers: layer k is the block's k-th call. The pooled features of every layer
    equal the backbone's own hidden states and MLP inputs, and the forward pass stops after the exit layer (the block
    cannot be dropped) with the logits of the full pass."""
    model = STCForSequenceClassification(STCConfig(text_config=_albert().to_dict(), poolings=["mean", "max"])).eval()
    assert model.layer_map.shared and model.layer_map.num_layers == 4 and len(model.layer_map.layers) == 1
    inputs = tester.inputs()
    mlp_inputs = []
    with torch.no_grad():
        pooled = model.pooled_features(**inputs)
        handle = model.layer_map.down_projections[0].register_forward_pre_hook(lambda m, a: mlp_inputs.append(a[0]))
        hidden = model.backbone(**inputs, output_hidden_states=True).hidden_states
    handle.remove()
    assert len(hidden) == 5 and len(mlp_inputs) == 4
    mask = inputs["attention_mask"].bool()
    names = model.feature_names()
    for layer in range(4):
        for source, states in (("hidden", hidden[layer + 1]), ("mlp", mlp_inputs[layer])):
            for pooling in ("mean", "max"):
                columns = [i for i, n in enumerate(names) if n[:3] == (source, pooling, layer)]
                rows = [states[row][mask[row]] for row in range(mask.shape[0])]
                expected = torch.stack([r.mean(0) if pooling == "mean" else r.amax(0) for r in rows])
                torch.testing.assert_close(pooled[:, columns], expected, rtol=1e-5, atol=1e-5)

    zero_layer_weights(model, 2)
    zero_layer_weights(model, 3)
    with torch.no_grad():
        full = model(**inputs).logits
    small = model.sparsify(eta=1.0)
    assert small.config.exit_layer == 1 and small.config.text_config.num_hidden_layers == 4
    calls = []
    small.layer_map.layers[0].register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, full, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2  # stopped after layer 1
    small.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, full, rtol=1e-5, atol=1e-5)

    loss = small.train()(**inputs, labels=torch.tensor([0, 1, 0])).loss  # with gradients: every layer runs
    loss.backward()
    assert small.backbone.encoder.albert_layer_groups[0].albert_layers[0].ffn.weight.grad.abs().sum() > 0


def test_backbone_sharing_blocks_otherwise_is_refused():
    """ALBERT with two inner blocks runs its MLPs twice per layer: hidden states only. Several shared groups, and
    Funnel's stages (a list of lists, tokens pooled between stages), are refused even with as many stages as
    layers."""
    inner = _albert(inner_group_num=2)
    with pytest.raises(ValueError, match="MLP down-projection"):
        STCForSequenceClassification(STCConfig(text_config=inner.to_dict()))
    hidden_only = STCForSequenceClassification(STCConfig(text_config=inner.to_dict(), sources=["hidden"])).eval()
    with torch.no_grad():
        hidden = hidden_only.backbone(**STCModelTester.inputs(), output_hidden_states=True).hidden_states
        pooled = hidden_only.pooled_features(**STCModelTester.inputs())
    assert len(hidden) == 9  # transformers records both inner blocks: layer k of STC is its entry 2k + 2
    mask = STCModelTester.inputs()["attention_mask"].bool()
    expected = torch.stack([hidden[4][row][mask[row]].mean(0) for row in range(3)])
    columns = [i for i, name in enumerate(hidden_only.feature_names()) if name[:3] == ("hidden", "mean", 1)]
    torch.testing.assert_close(pooled[:, columns], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="share several blocks"):
        STCForSequenceClassification(STCConfig(text_config=_albert(num_hidden_groups=2).to_dict()))
    # as many inner blocks as layers: the group (run once per layer) is the block, not its inner list
    square = STCForSequenceClassification(STCConfig(text_config=_albert(inner_group_num=4).to_dict(),
                                                    sources=["hidden"])).eval()
    assert square.layer_map.shared and square.layer_map.path == "encoder.albert_layer_groups"
    with torch.no_grad():
        hidden = square.backbone(**STCModelTester.inputs(), output_hidden_states=True).hidden_states
        pooled = square.pooled_features(**STCModelTester.inputs())
    columns = [i for i, name in enumerate(square.feature_names()) if name[:3] == ("hidden", "mean", 1)]
    expected = torch.stack([hidden[8][row][mask[row]].mean(0) for row in range(3)])  # layer 1 = inner block 7
    torch.testing.assert_close(pooled[:, columns], expected, rtol=1e-5, atol=1e-5)
    funnel = AutoConfig.for_model("funnel", vocab_size=99, d_model=32, n_head=4, d_head=8, d_inner=37,
                                  block_sizes=[1, 1, 1], architectures=["FunnelModel"])
    with pytest.raises(ValueError, match="Cannot find the transformer blocks.*Funnel"):
        STCForSequenceClassification(STCConfig(text_config=funnel.to_dict(), sources=["hidden"]))


SHORTENING_CHANGES_THE_MODEL = {  # model type: config arguments; why the shortened config is another model
    "esmc": dict(num_attention_heads=4),  # its layers scale by sqrt(num_hidden_layers / 36)
    "gpt_neox_japanese": dict(num_attention_heads=4, intermediate_multiple_size=2),  # a bias on the last layer only
    "olmo_hybrid": dict(num_attention_heads=4, num_key_value_heads=2, linear_num_key_heads=4, linear_num_value_heads=4,
                        linear_key_head_dim=6, linear_value_head_dim=12,  # needs one attention layer: the last
                        layer_types=["linear_attention", "linear_attention", "full_attention"]),
}


@pytest.mark.parametrize("model_type", SHORTENING_CHANGES_THE_MODEL)
def test_early_exit_keeps_every_layer_where_a_shorter_config_is_another_model(model_type, tmp_path, caplog):
    """Dropping layers must leave the model that a reload rebuilds from the shortened config: where it would not,
    every layer stays (with a warning), the pass still stops at the exit layer, and a reload gives the same logits."""
    config = AutoConfig.for_model(model_type, vocab_size=99, hidden_size=32, num_hidden_layers=3, pad_token_id=0,
                                  **SHORTENING_CHANGES_THE_MODEL[model_type])
    torch.manual_seed(0)
    model = STCForSequenceClassification(STCConfig(text_config=config.to_dict(), sources=["hidden"])).eval()
    inputs = STCModelTester.inputs()
    calls = []
    model.layer_map.layers[2].register_forward_hook(lambda *args: calls.append(1))
    with caplog.at_level("WARNING"):
        model.set_selection([{"source": "hidden", "pooling": "mean", "layer": 0, "neurons": [0, 1]}],
                            torch.randn(2, 2), torch.zeros(2))
    assert "Early exit keeps all 3 layers" in caplog.text
    assert model.layer_map.num_layers == model.config.text_config.num_hidden_layers == 3
    with torch.no_grad():
        logits = model(**inputs).logits
    assert not calls  # stopped after layer 0
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(STCForSequenceClassification.from_pretrained(tmp_path)(**inputs).logits, logits)


def test_backbones_stc_cannot_read_are_refused_or_read_right(tester):
    """XLM keeps its layers' parts in parallel lists; CPM-Ant adds prompt tokens inside; a recurrent-depth backbone
    (Dory) runs a block twice per pass: each is refused. I-BERT's quantized position table numbers positions as
    RoBERTa does."""
    from transformers import AutoConfig

    xlm = AutoConfig.for_model("xlm", vocab_size=99, emb_dim=32, n_layers=3, n_heads=4, pad_index=0)
    with pytest.raises(ValueError, match="parallel lists"):
        STCForSequenceClassification(STCConfig(text_config=xlm.to_dict(), sources=["hidden"]))
    cpmant = AutoConfig.for_model("cpmant", vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  dim_head=8, dim_ff=48, prompt_length=4)
    dory = AutoConfig.for_model("dory", vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=8, intermediate_size=48, pad_token_id=0,
                                n_input_layers=1, n_recurrent_layers=1, n_output_layers=1)
    for config, match in ((cpmant, "tokens of its own"), (dory, "ran twice")):
        for sources in (["hidden", "mlp"], ["hidden"]):
            model = STCForSequenceClassification(STCConfig(text_config=config.to_dict(), sources=sources)).eval()
            with pytest.raises(ValueError, match=match), torch.no_grad():
                model(**tester.inputs())
    ibert = AutoConfig.for_model("ibert", vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_size=48, pad_token_id=0)
    torch.manual_seed(0)
    model = STCForSequenceClassification(STCConfig(text_config=ibert.to_dict(), sources=["hidden"])).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = model.backbone(input_ids=ids, output_hidden_states=True).hidden_states[2].mean(1)
        columns = [i for i, name in enumerate(model.feature_names()) if name[:3] == ("hidden", "mean", 1)]
        torch.testing.assert_close(model.pooled_features(ids)[:, columns], expected)


def test_moe_and_state_space_backbones_use_hidden_states_only():
    from transformers import JambaConfig, Qwen2MoeConfig

    moe = Qwen2MoeConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=37, moe_intermediate_size=16,
                         shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2)
    hybrid = JambaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=32, pad_token_id=0, attn_layer_period=2,
                         attn_layer_offset=1)  # Mamba + attention blocks
    for config in (moe, hybrid):
        with pytest.raises(ValueError, match="no single dense MLP.*sources=\\['hidden'\\]"):
            STCForSequenceClassification(STCConfig(text_config=config.to_dict()))
        hidden_only = STCForSequenceClassification(STCConfig(text_config=config.to_dict(), sources=["hidden"])).eval()
        assert hidden_only(**STCModelTester.inputs()).logits.shape == (3, 2)
        assert_captures_match_the_backbone(hidden_only, STCModelTester.inputs())  # layer 1 (not the last: normed)


def test_label_ids_out_of_range(tester):
    model = tester.model("bert", num_labels=3)
    inputs, logits = tester.inputs(), model(**tester.inputs()).logits
    ignored = model(**inputs, labels=torch.tensor([0, -100, 2])).loss  # -100: a row without a label
    torch.testing.assert_close(ignored, torch.nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([0, 2])))
    with pytest.raises(ValueError, match="class ids .*fractional.*problem_type='regression'"):
        model(**inputs, labels=torch.tensor([0.6, 1.4, 1.0]))
    with pytest.raises(ValueError, match=r"Label ids must be in \[0, 2\]"):
        model(**tester.inputs(), labels=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match=r"Label ids must be in \[0, 2\]"):
        model(**tester.inputs(), labels=torch.tensor([0, -1, 1]))


def test_multi_label_target_shape(tester):
    model = tester.model("bert", num_labels=3, problem_type="multi_label_classification")
    with pytest.raises(ValueError, match="one 0/1 column per label"):
        model(**tester.inputs(), labels=torch.tensor([[1.0, 0.0]] * 3))


def test_num_labels_mismatch_with_id2label(tester, tmp_path):
    with pytest.raises(ValueError, match="does not match `id2label`"):
        tester.stc_config("bert", num_labels=3, id2label={0: "a", 1: "b"})
    # loading a checkpoint with named labels and another `num_labels`: a new head, as in transformers
    tester.model("bert", id2label={0: "neg", 1: "pos"}).save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert loaded.config.id2label == {i: f"LABEL_{i}" for i in range(5)}
    assert loaded.head.classifier.weight.shape[0] == 5
    assert AutoConfig.from_pretrained(tmp_path).id2label == {0: "neg", 1: "pos"}


def test_empty_batch(tester):
    model = tester.model("bert")
    with pytest.raises(ValueError, match="Empty batch"):
        model(input_ids=torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="Empty batch"):
        model(input_ids=torch.zeros(2, 0, dtype=torch.long))


def test_checkpoint_of_wrong_type(tester, tmp_path):
    AutoModel.from_config(tester.backbone_config("llama")).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="'llama' checkpoint, not an STC one.*from_backbone_pretrained"):
        STCForSequenceClassification.from_pretrained(tmp_path / "llama")
    tester.model("bert").save_pretrained(tmp_path / "stc")
    with pytest.raises(ValueError, match="already an STC checkpoint, not a backbone.*from_pretrained"):
        STCForSequenceClassification.from_backbone_pretrained(tmp_path / "stc")


def test_extra_forward_arguments_are_ignored_with_a_warning(tester):
    """As transformers' classifiers: dataset columns a `Trainer` keeps (remove_unused_columns=False) are ignored;
    asked-for hidden states are not returned, and the warning says so."""
    from transformers.testing_utils import CaptureLogger

    from stc_transformers import modeling_stc

    model, inputs = tester.model("bert"), tester.inputs()
    expected = model(**inputs).logits
    with CaptureLogger(modeling_stc.logger) as captured:
        logits = model(**inputs, row_index=torch.arange(3), output_hidden_states=True).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert "ignores the arguments ['row_index']" in captured.out and "no hidden states" in captured.out


# ------------------------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------------------------


def _tiny_dataset(n=24, seed=0):
    from datasets import Dataset

    tokenizer = make_tiny_tokenizer()
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(0, 2))
        words = rng.integers(3 + 40 * label, 43 + 40 * label, size=int(rng.integers(2, 8)))
        texts.append(" ".join(f"w{w - 3}" for w in words))
        labels.append(label)
    data = Dataset.from_dict({"text": texts, "label": labels})
    return data.map(lambda b: tokenizer(b["text"], truncation=True), batched=True), tokenizer


def test_selection_indices_first_made_under_inference_mode_serve_autograd_later(tester):
    """The selector keeps one copy of its index tensors per device; the first one made inside `inference_mode`
    (e.g. `trainer.predict` on a GPU) must not be an inference tensor, or a later forward with gradients fails."""
    model = tester.model("bert", num_labels=2)
    with torch.no_grad():
        model.head.classifier.weight.normal_()
    model.sparsify(0.5, truncate=False)
    with torch.inference_mode():
        neurons, positions = model.selector._on("meta")  # a device other than the one the indices live on
    assert not any(index.is_inference() for index in [*neurons.values(), *positions])


def test_truncation_leaves_every_module_in_its_mode(tester):
    model = tester.model("bert", num_labels=2).train()
    model.backbone.eval()
    model.set_selection([{"source": "hidden", "pooling": "mean", "layer": 0, "neurons": [0]}], torch.ones(2, 1),
                        torch.zeros(2))
    assert model.layer_map.num_layers == 1
    assert model.training and model.head.training and not any(m.training for m in model.backbone.modules())


def test_feed_forward_chunking_is_named(tester):
    config = tester.backbone_config("bert")
    config.chunk_size_feed_forward = 4
    with pytest.raises(ValueError, match="chunks of 4 tokens.*chunk_size_feed_forward=0.*sources=\\['hidden'\\]"):
        STCForSequenceClassification(STCConfig(text_config=config.to_dict()))


def test_frozen_backbone_stays_in_eval_mode(tester):
    """Dropout in a frozen backbone would move the features the head standardises; the head itself trains."""
    model = tester.model("bert", num_labels=2, hidden_dropout_prob=0.5)
    inputs = tester.inputs()
    model.freeze_backbone().train()
    assert model.training and model.head.training and not model.backbone.training
    assert not any(module.training for module in model.backbone.modules())
    torch.testing.assert_close(model(**inputs).logits, model.eval()(**inputs).logits)
    model.train().freeze_backbone(False)
    assert model.backbone.training and all(p.requires_grad for p in model.backbone.parameters())
    assert not torch.equal(model(**inputs).logits, model(**inputs).logits)  # dropout is back


@pytest.mark.parametrize("frozen", [True, False])
def test_trainer_trains_saves_best_and_resumes(tester, tmp_path, frozen):
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    data, tokenizer = _tiny_dataset()
    model = tester.model("bert", num_labels=2).train()
    model.freeze_backbone(frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=1e-2,
        eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="loss",
        report_to=[], use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                      processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer))
    result = trainer.train()
    assert result.global_step == 6
    assert not torch.equal(before["head.classifier.weight"], model.head.classifier.weight)
    backbone_changed = not torch.equal(before["backbone.embeddings.word_embeddings.weight"],
                                       model.backbone.embeddings.word_embeddings.weight)
    assert backbone_changed is (not frozen)
    assert isinstance(trainer.model, STCForSequenceClassification)
    checkpoint = tmp_path / "checkpoint-3"
    assert (checkpoint / "model.safetensors").exists()
    # the best checkpoint (lowest evaluation loss) is the model at the end
    losses = {entry["step"]: entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry}
    best_step = min(losses, key=losses.get)
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best_step}")
    assert trainer.evaluate()["eval_loss"] == pytest.approx(losses[best_step], abs=1e-6)
    # resume from the epoch-1 checkpoint to the end: the same run as without the interruption
    resumed = Trainer(model=tester.model("bert", num_labels=2, seed=1).freeze_backbone(frozen), args=args,
                      train_dataset=data, eval_dataset=data, processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer))
    assert resumed.train(resume_from_checkpoint=str(checkpoint)).global_step == 6
    final = {n: p.detach() for n, p in trainer.model.named_parameters()}
    for name, parameter in resumed.model.named_parameters():
        torch.testing.assert_close(parameter.detach(), final[name], rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------------------------
# The real MiniLM encoder
# ------------------------------------------------------------------------------------------------------------------


def test_real_minilm_wraps_and_round_trips(minilm_path, tmp_path):
    from transformers import AutoTokenizer

    model = STCForSequenceClassification.from_backbone_pretrained(minilm_path, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    assert model.config.text_config.model_type == "bert"
    assert model.source_dims == {"hidden": 384, "mlp": 1536}
    reference = AutoModel.from_pretrained(minilm_path).eval()
    texts = ["A warm, funny and moving film.", "Dull."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    # the hidden/mean group of the last layer equals mean pooling of the reference model's last hidden state
    features = model.pooled_features(**batch)
    groups = feature_groups(model.config, model.source_dims)
    start = 0
    for group in groups:
        if (group["source"], group["pooling"], group["layer"]) == ("hidden", "mean", 5):
            break
        start += group_size(group)
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(features[:, start : start + 384], (hidden * mask).sum(1) / mask.sum(1), atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_exit_layer_is_not_narrowed_where_that_changes_its_neurons(tester):
    """An MLP whose activation mixes neurons (here a softmax over them) gives other values at a narrower width: the
    probe pass shows it, the layer keeps its full width and the logits are those of the full model."""
    model = tester.model("bert", num_labels=2, sources=["mlp"], poolings=["mean"])
    last = tester.num_layers - 1
    model.backbone.encoder.layer[last].intermediate.intermediate_act_fn = torch.nn.Softmax(-1)
    selection = [{"source": "mlp", "pooling": "mean", "layer": last, "neurons": [2, 4, 8]}]
    model.set_selection(selection, torch.randn(2, 3), torch.zeros(2), truncate=False)
    inputs = tester.inputs()
    with torch.inference_mode():
        stopped = model(**inputs).logits
    assert model._narrowed == []
    torch.testing.assert_close(stopped, model(**inputs).logits)
