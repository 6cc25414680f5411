"""push_to_hub, offline: `HfApi` calls are patched to write into a temporary "hub" folder, then the model is loaded
back from it with the package and, in a subprocess without the package, with `trust_remote_code=True`.

This module imports no `stc_transformers` at import time: the subprocess imports `install_fake_hub` from it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch


MODELING_FILES = ("modeling_stc.py", "configuration_stc.py", "features_stc.py")
TOKEN = "hf_fake_token"


def install_fake_hub(root, setattr=setattr):
    """Patch `HfApi` so repositories are folders under `root`; returns the list of commits (repo_id, files)."""
    from huggingface_hub import HfApi

    root, commits = Path(root), []

    def create_repo(self, repo_id, **kwargs):
        (root / repo_id).mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        files = []
        for operation in operations:
            target = root / repo_id / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(operation.path_or_fileobj, target)
            files.append(operation.path_in_repo)
        commits.append((repo_id, sorted(files)))
        return SimpleNamespace(oid="0" * 40, commit_url=f"https://hub.invalid/{repo_id}")

    def file_exists(self, repo_id, filename, **kwargs):
        return (root / repo_id / filename).is_file()

    def hf_hub_download(self, repo_id, filename, **kwargs):
        return str(root / repo_id / filename)

    for name, function in [("create_repo", create_repo), ("create_commit", create_commit),
                           ("file_exists", file_exists), ("hf_hub_download", hf_hub_download)]:
        setattr(HfApi, name, function)
    return commits


@pytest.fixture
def hub(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    return SimpleNamespace(root=root, commits=install_fake_hub(root, monkeypatch.setattr))


@pytest.fixture(scope="module")
def model():
    from test_interpret import fitted_model

    return fitted_model("gpt2").eval()


def test_push_uploads_everything_and_reloads_with_and_without_the_package(model, hub, tmp_path):
    from conftest import STCModelTester
    from transformers import AutoModelForSequenceClassification

    inputs = STCModelTester.inputs()
    expected = model(**inputs).logits
    model.push_to_hub("me/stc-one", token=TOKEN, tags=["my-tag"])
    repo = hub.root / "me/stc-one"
    (repo_id, files), = hub.commits
    assert repo_id == "me/stc-one"
    assert {"config.json", "model.safetensors", "README.md", "stc_layer_scores.png", *MODELING_FILES} <= set(files)
    config = json.loads((repo / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_stc.STCConfig",
                                  "AutoModelForSequenceClassification": "modeling_stc.STCForSequenceClassification"}
    readme = (repo / "README.md").read_text()
    assert 'model="me/stc-one"' in readme and "- my-tag" in readme

    # (a) with the package
    loaded = AutoModelForSequenceClassification.from_pretrained(repo).eval()
    torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)

    # (b) without it, through the shipped code; then push that model again and load the second upload
    np.save(tmp_path / "ids.npy", inputs["input_ids"].numpy())
    np.save(tmp_path / "mask.npy", inputs["attention_mask"].numpy())
    script = f"""
import sys, numpy as np, torch
sys.modules["stc_transformers"] = None  # the package cannot be imported
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_hub import install_fake_hub
from transformers import AutoModelForSequenceClassification
root, out = {str(hub.root)!r}, {str(tmp_path)!r}
commits = install_fake_hub(root)
ids, mask = torch.from_numpy(np.load(out + "/ids.npy")), torch.from_numpy(np.load(out + "/mask.npy"))
model = AutoModelForSequenceClassification.from_pretrained(root + "/me/stc-one", trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
np.save(out + "/remote.npy", model(input_ids=ids, attention_mask=mask).logits.detach().numpy())
model.push_to_hub("me/stc-two", token="{TOKEN}")
print("FILES", sorted(commits[0][1]))
again = AutoModelForSequenceClassification.from_pretrained(root + "/me/stc-two", trust_remote_code=True).eval()
np.save(out + "/again.npy", again(input_ids=ids, attention_mask=mask).logits.detach().numpy())
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # another process: CPU kernels may sum in another order (memory alignment), so not bit for bit
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "remote.npy")), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "again.npy")), expected, rtol=1e-5, atol=1e-6)
    second = hub.root / "me/stc-two"
    for name in MODELING_FILES:
        assert (second / name).is_file(), name
    assert "auto_map" in json.loads((second / "config.json").read_text())
    assert not (second / "README.md").exists()  # no card without the package; the repo keeps its own


def test_push_keeps_a_user_written_card_on_the_hub(model, hub):
    repo = hub.root / "me/stc-own-card"
    repo.mkdir(parents=True)
    (repo / "README.md").write_text("# Written by hand\n")
    model.push_to_hub("me/stc-own-card", token=TOKEN)
    assert (repo / "README.md").read_text() == "# Written by hand\n"
    (_, files), = hub.commits
    assert "README.md" not in files and "model.safetensors" in files
    # a card we generated earlier is replaced
    (repo / "README.md").write_text("<!-- Generated by stc-transformers: old -->\n# old\n")
    model.push_to_hub("me/stc-own-card", token=TOKEN)
    assert "## Selected neurons" in (repo / "README.md").read_text()


def test_save_pretrained_with_push_to_hub(model, hub, tmp_path):
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/stc-saved", token=TOKEN)
    assert (tmp_path / "local" / "README.md").exists() and (tmp_path / "local" / "model.safetensors").exists()
    assert (hub.root / "me/stc-saved" / "README.md").exists()
    assert (hub.root / "me/stc-saved" / "modeling_stc.py").exists()


def test_push_without_a_token_fails_clearly(model, hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalTokenNotFoundError

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    for token in (None, True, False):
        with pytest.raises(LocalTokenNotFoundError, match=r"hf auth login.*token="):
            model.push_to_hub("me/stc-no-token", token=token)
    with pytest.raises(LocalTokenNotFoundError, match="hf auth login"):
        model.save_pretrained(hub.root.parent / "x", push_to_hub=True)
    assert hub.commits == [] and not (hub.root / "me/stc-no-token").exists()
