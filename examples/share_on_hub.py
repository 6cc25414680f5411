"""Share a fitted STC classifier on the Hugging Face Hub with `push_to_hub`.

What it shows: `model.push_to_hub(repo_id)` uploads the weights, the config (with `auto_map`), the three modeling
files and the model card, so anyone can load the model with

    pipeline("text-classification", model=repo_id, trust_remote_code=True)

even without `stc-transformers` installed. The tokenizer goes up next to it (as the files it saves, without the
default model card that `tokenizer.push_to_hub` would add).

It pushes the quickstart checkpoint (`outputs/quickstart-minilm-rotten-tomatoes`, run examples/quickstart.py
first) or, when that is missing, fits a small classifier on the shipped 300-snippet sample (~30 s).

Needs a Hub token with write access. Without one it prints how to log in and exits cleanly:

    hf auth login            # or: export HF_TOKEN=hf_...
    python examples/share_on_hub.py [user/repo-name] [--public]

The repository is created private unless `--public` is given. Same thing from the command line:

    stc push --model outputs/quickstart-minilm-rotten-tomatoes --repo-id user/repo-name --private
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import huggingface_hub


ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "outputs" / "quickstart-minilm-rotten-tomatoes"
SMALL = ROOT / "outputs" / "share-on-hub-minilm-sample"


def fitted_checkpoint() -> Path:
    """The quickstart checkpoint, or a small one fitted now on the shipped sample."""
    if (QUICKSTART / "config.json").is_file():
        return QUICKSTART
    from transformers import AutoTokenizer

    from stc_transformers import STCForSequenceClassification
    from stc_transformers.backbones import minilm_path
    from stc_transformers.data import load_sample_dataset
    from stc_transformers.trainer import STCTrainer, STCTrainingArguments

    print(f"{QUICKSTART.relative_to(ROOT)} not found: fitting a small classifier on the shipped sample first.")
    data = load_sample_dataset()
    model = STCForSequenceClassification.from_backbone_pretrained(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    trainer = STCTrainer(model, STCTrainingArguments(output_dir=str(SMALL), max_length=128, progress=False),
                         train_dataset=data["train"], eval_dataset=data["validation"], processing_class=tokenizer,
                         dataset_name="movie_valence sample (stc-transformers built-in)")
    trainer.train()
    model.config.fit_summary["backbone"] = "sentence-transformers/all-MiniLM-L6-v2"
    trainer.evaluate(data["test"], metric_key_prefix="test")  # recorded in the config: the card reports it
    trainer.save_model(str(SMALL))
    return SMALL


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Push a fitted STC classifier to the Hugging Face Hub.")
    parser.add_argument("repo_id", nargs="?", default=None,
                        help="user/repo-name (default: <your user name>/stc-minilm-rotten-tomatoes)")
    parser.add_argument("--public", action="store_true", help="create the repository as public (default: private)")
    args = parser.parse_args(argv)  # before anything is pushed: --help or a typo never uploads
    token = huggingface_hub.get_token()
    if token is None:
        print("No Hugging Face token found, so nothing was pushed. To share a model:\n"
              "  1. create a token with write access at https://huggingface.co/settings/tokens\n"
              "  2. run `hf auth login` (or `export HF_TOKEN=hf_...`)\n"
              "  3. run `python examples/share_on_hub.py your-name/stc-minilm-rotten-tomatoes`")
        return 0

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import stc_transformers  # noqa: F401  (registers the STC classes with the Auto classes)

    repo_id = args.repo_id or f"{huggingface_hub.whoami(token=token)['name']}/stc-minilm-rotten-tomatoes"
    checkpoint = fitted_checkpoint()
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)

    # weights + config + modeling files + model card (rewritten with the repository id in its usage snippet)
    commit = model.push_to_hub(repo_id, private=not args.public, commit_message="Upload STC classifier")
    # the tokenizer files, in a second commit
    with tempfile.TemporaryDirectory() as folder:
        files = tokenizer.save_pretrained(folder)
        operations = [huggingface_hub.CommitOperationAdd(path_in_repo=Path(f).name, path_or_fileobj=f) for f in files]
        huggingface_hub.HfApi().create_commit(repo_id, operations=operations, commit_message="Upload tokenizer",
                                              token=token)
    print(f"Pushed {checkpoint.relative_to(ROOT)} to https://huggingface.co/{repo_id} (commit {commit.commit_url})")
    print(f'Try it: pipeline("text-classification", model="{repo_id}", trust_remote_code=True)')
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
