"""stc-transformers: Sparsify-then-Classify text classifiers on any pretrained transformer.

Importing the package registers `STCConfig` / `STCForSequenceClassification` with the transformers Auto classes,
so `AutoModelForSequenceClassification.from_pretrained` and `pipeline("text-classification")` accept STC
checkpoints, and `save_pretrained` writes `auto_map` plus the modeling files for `trust_remote_code` users.
"""

from transformers import AutoConfig, AutoModelForSequenceClassification

from .configuration_stc import STCConfig
from .modeling_stc import STCForSequenceClassification, STCPreTrainedModel
from .tokenization import prepare_tokenizer
from .trainer import STCTrainer, STCTrainingArguments, STCTrainOutput


__version__ = "0.1.0"

AutoConfig.register(STCConfig.model_type, STCConfig, exist_ok=True)
AutoModelForSequenceClassification.register(STCConfig, STCForSequenceClassification, exist_ok=True)
STCConfig.register_for_auto_class()
STCForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "STCConfig",
    "STCForSequenceClassification",
    "STCPreTrainedModel",
    "STCTrainer",
    "STCTrainingArguments",
    "STCTrainOutput",
    "prepare_tokenizer",
    "__version__",
]
