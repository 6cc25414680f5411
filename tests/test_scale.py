"""Scale-out: feature extraction and training across several processes (accelerate), and PEFT/LoRA backbones.

The multi-process tests launch 2 CPU processes (gloo) with `accelerate launch --multi_gpu --num_processes 2`: on a
machine without GPUs that is accelerate's torchrun launcher, and the processes pick the CPU/gloo backend themselves
(`ACCELERATE_USE_CPU=1`, read by `distributed_state()` and by `TrainingArguments`). `accelerate launch --cpu` starts a
single process unless it is given an mpirun hostfile, so it cannot be used for this. The tests are skipped, with the
launcher's own error, when processes cannot be started or cannot meet here (no torch.distributed/gloo, ports refused).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STCModelTester, make_tiny_tokenizer
from test_trainer import synthetic_texts
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from stc_transformers import STCForSequenceClassification
from stc_transformers.extraction import IN_PAGE_CACHE, ON_DISK, PROGRESS_FILE, distributed_state, extract_features
from stc_transformers.trainer import STCTrainer, STCTrainingArguments


REPO = Path(__file__).resolve().parents[1]
READY = "STC-WORKER-READY"

multi_process = pytest.mark.skipif(
    sys.platform == "win32"
    or not torch.distributed.is_available()
    or not torch.distributed.is_gloo_available()
    or importlib.util.find_spec("accelerate") is None,
    reason="multi-process tests need torch.distributed with the gloo backend and accelerate (not on Windows)",
)


def launch(script: Path, *args, processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `script` under `accelerate launch` with `processes` CPU processes; skip if they cannot start or meet."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0",  # a free port: other jobs may hold 29500
               str(script), *map(str, args)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=script.parent, timeout=timeout)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        if output.count(READY) < processes:  # the processes never met (before any of our code ran): environment
            pytest.skip(f"cannot launch {processes} processes with accelerate here:\n{output[-2000:]}")
        raise AssertionError(f"the {processes}-process run failed (rc {result.returncode}):\n{output[-6000:]}")
    assert output.count(READY) == processes, output[-3000:]
    return result


def save_tiny_backbone(folder: Path, arch: str = "bert"):
    """A tiny random backbone (fixed seed) and the word-level tokenizer, saved where every process loads them."""
    torch.manual_seed(0)
    AutoModel.from_config(STCModelTester().backbone_config(arch)).save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)


COMMON = f'''
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist

# the launcher's rendezvous first, before any stc_transformers code: a failure up to here is the environment's
dist.init_process_group("gloo")
dist.barrier()
print("{READY}", dist.get_rank(), dist.get_world_size(), flush=True)

from stc_transformers.extraction import distributed_state

work = Path(sys.argv[1])
state = distributed_state()  # must find the 2 CPU processes by itself (ACCELERATE_USE_CPU=1, no CUDA)
assert state is not None and state.num_processes == 2 and state.backend == "gloo", state
spec = json.loads((work / "spec.json").read_text())
'''

WORKER = COMMON + '''
from transformers import AutoTokenizer
from stc_transformers import STCForSequenceClassification
from stc_transformers.extraction import extract_features
from stc_transformers.trainer import STCTrainer, STCTrainingArguments

tokenizer = AutoTokenizer.from_pretrained(work / "backbone")
model = STCForSequenceClassification.from_backbone_pretrained(work / "backbone", num_labels=2).to(state.device)
cache = extract_features(model, tokenizer, spec["texts"], work / "cache", batch_size=4, commit_every=2,
                         progress=False, accelerator=state)
assert cache.complete, cache.meta
try:  # processes that disagree on the texts are refused on every process, before any of them writes
    extract_features(model, tokenizer, spec["texts"][state.process_index:], work / "cache", progress=False,
                     accelerator=state)
except ValueError as error:
    assert "disagree" in str(error), error
else:
    raise AssertionError("processes with different texts were not refused")

# STCTrainer under the same launch: shared extraction, search on the main process, the fit sent to every process
model = STCForSequenceClassification.from_backbone_pretrained(work / "backbone", num_labels=2)
trainer = STCTrainer(model, STCTrainingArguments(**spec["args"]), train_dataset=(spec["texts"], spec["labels"]),
                     eval_dataset=(spec["val_texts"], spec["val_labels"]), processing_class=tokenizer)
result = trainer.train()
trainer.save_model(work / "fitted")
logits = trainer.predict(spec["val_texts"]).predictions
(work / f"fit-{state.process_index}.json").write_text(json.dumps(
    {"selection": model.config.selection, "score": result.validation_score, "logits": logits.tolist()}))

# the plain HF Trainer on the dense (unfitted) head, DDP over the same processes
import numpy as np
from datasets import Dataset
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

model = STCForSequenceClassification.from_backbone_pretrained(work / "backbone", num_labels=2).freeze_backbone()
data = Dataset.from_dict({"text": spec["texts"], "label": spec["labels"]})
data = data.map(lambda b: tokenizer(b["text"], truncation=True), batched=True, remove_columns=["text"])
args = TrainingArguments(output_dir=str(work / "hf_out"), per_device_train_batch_size=4, max_steps=3,
                         learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                         disable_tqdm=True, seed=0)
trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                  data_collator=DataCollatorWithPadding(tokenizer))
before = model.head.classifier.weight.detach().clone()
output = trainer.train()
assert trainer.args.world_size == 2 and trainer.args.parallel_mode.value == "distributed", trainer.args
assert not torch.equal(before, model.head.classifier.weight)
trainer.save_model(str(work / "hf_saved"))
head = model.head.classifier.weight.detach().numpy()
np.save(work / f"head-{state.process_index}.npy", head)  # DDP keeps the copies in step
(work / f"steps-{state.process_index}.json").write_text(json.dumps({"steps": output.global_step}))

# `stc fit` under the same launch: every process extracts, the main process searches, evaluates, saves and reports
from stc_transformers.cli import main as cli_main

if state.is_main_process:
    Dataset.from_dict({"text": spec["texts"], "label": spec["labels"]}).to_csv(work / "cli_train.csv")
state.wait_for_everyone()
code = cli_main(["fit", "--model", str(work / "backbone"), "--data", str(work / "cli_train.csv"),
                 "--output-dir", str(work / "cli_out"), "--max-length", "32", "--batch-size", "4", "--etas", "0.9",
                 "--final-strengths", "0.1", "--max-iter", "50", "--device", "cpu", "--no-progress"])
assert code == 0, code
'''


def write_spec(work: Path, **spec):
    work.mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(json.dumps(spec))


def fit_args(output_dir) -> dict:
    return dict(output_dir=str(output_dir), progress=False, max_length=32, batch_size=4, etas=(0.9,),
                strength_ratios=(0.1, 0.01), final_strengths=(1e-1,), max_iter=50, device="cpu")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One 2-process launch of WORKER (starting processes costs more than the work): extraction into a shared cache,
    an STCTrainer fit and save, and a few HF Trainer steps on the dense head."""
    work = tmp_path_factory.mktemp("two_processes")
    save_tiny_backbone(work / "backbone")
    texts, labels = synthetic_texts(90, seed=5)
    write_spec(work, texts=texts[:70], labels=labels[:70], val_texts=texts[70:], val_labels=labels[70:],
               args=fit_args(work / "out"))
    (work / "worker.py").write_text(WORKER)
    result = launch(work / "worker.py", work)
    (work / "launch_output.txt").write_text(result.stdout + result.stderr)
    return work


@multi_process
def test_multi_process_cache_is_bit_identical_to_single_process(launched, tmp_path):
    work = launched
    spec = json.loads((work / "spec.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(work / "backbone")
    model = STCForSequenceClassification.from_backbone_pretrained(work / "backbone", num_labels=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes (OMP_NUM_THREADS=1): CPU kernels sum thread-dependently
    try:
        single = extract_features(model, tokenizer, spec["texts"], tmp_path, batch_size=4, progress=False)
    finally:
        torch.set_num_threads(threads)
    (merged_dir,) = [p for p in (work / "cache").iterdir() if p.is_dir()]
    assert merged_dir.name == single.path.name  # same fingerprint: same model, tokenizer settings and texts
    merged = json.loads((merged_dir / "meta.json").read_text())
    assert merged["batches_done"] == merged["num_batches"] == single.meta["num_batches"] == 18
    assert {k: v for k, v in merged.items() if k != "seconds"} == {k: v for k, v in single.meta.items()
                                                                    if k != "seconds"}
    assert not (merged_dir / PROGRESS_FILE).exists()
    for source, pooling in single.blocks:
        array = np.load(merged_dir / f"{source}_{pooling}.npy")
        assert array.any(axis=(0, 2)).all()  # every text has its rows
        np.testing.assert_array_equal(array, single.array(source, pooling))


@multi_process
def test_stc_trainer_under_accelerate_launch(launched, tmp_path):
    """Every process ends with the main process's fit; only the main process saves; it equals a 1-process fit."""
    work = launched
    spec = json.loads((work / "spec.json").read_text())
    fits = [json.loads((work / f"fit-{rank}.json").read_text()) for rank in range(2)]
    assert fits[0]["selection"] == fits[1]["selection"] and fits[0]["selection"]
    np.testing.assert_allclose(fits[1]["logits"], fits[0]["logits"], atol=1e-6)
    assert (work / "out" / "candidates.csv").exists()
    loaded = AutoModelForSequenceClassification.from_pretrained(work / "fitted").eval()
    assert loaded.config.selection == fits[0]["selection"]
    batch = AutoTokenizer.from_pretrained(work / "fitted")(spec["val_texts"], padding=True, return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_allclose(loaded(**batch).logits.numpy(), fits[0]["logits"], atol=1e-5)
    # the same fit in one process (it reuses the cache the processes wrote, so only the search runs here)
    single = STCTrainer(STCForSequenceClassification.from_backbone_pretrained(work / "backbone", num_labels=2),
                        STCTrainingArguments(**fit_args(tmp_path), cache_dir=str(work / "out" / "feature_cache")),
                        train_dataset=(spec["texts"], spec["labels"]),
                        eval_dataset=(spec["val_texts"], spec["val_labels"]),
                        processing_class=AutoTokenizer.from_pretrained(work / "backbone"))
    result = single.train()
    assert single.model.config.selection == fits[0]["selection"]
    assert result.validation_score == pytest.approx(fits[0]["score"], abs=1e-9)


@multi_process
def test_hf_trainer_dense_head_under_accelerate_launch(launched):
    work = launched
    spec = json.loads((work / "spec.json").read_text())
    assert [json.loads((work / f"steps-{r}.json").read_text())["steps"] for r in range(2)] == [3, 3]
    head = np.load(work / "head-0.npy")
    np.testing.assert_array_equal(np.load(work / "head-1.npy"), head)  # DDP kept the copies in step
    loaded = AutoModelForSequenceClassification.from_pretrained(work / "hf_saved").eval()
    assert isinstance(loaded, STCForSequenceClassification)
    np.testing.assert_array_equal(loaded.head.classifier.weight.detach().numpy(), head)
    tokenizer = AutoTokenizer.from_pretrained(work / "hf_saved")
    with torch.no_grad():
        logits = loaded(**tokenizer(spec["val_texts"][:5], padding=True, return_tensors="pt")).logits
    assert logits.shape == (5, 2) and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------------------------------
# Sharded extraction in one process: threads stand in for processes (a barrier for `wait_for_everyone`)
# ------------------------------------------------------------------------------------------------------------------


class ThreadRank:
    """The part of `PartialState` that `extract_features` uses, for one of `size` threads."""

    def __init__(self, rank: int, size: int, barrier: threading.Barrier):
        self.process_index, self.num_processes, self.barrier = rank, size, barrier
        self.is_main_process = rank == 0

    def wait_for_everyone(self):
        self.barrier.wait(timeout=60)


def run_ranks(size, work):
    """Run `work(rank_state)` in `size` threads; an error in one breaks the barrier for the others."""
    barrier = threading.Barrier(size)
    errors = [None] * size

    def target(rank):
        try:
            work(ThreadRank(rank, size, barrier))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors[rank] = error
            barrier.abort()

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


@pytest.mark.parametrize("rebooted, durable_seconds", [(False, 300.0), (True, 300.0), (True, 0.0)])
def test_sharded_extraction_resumes_after_a_crash(tmp_path, monkeypatch, rebooted, durable_seconds):
    """Rank 1 of 2 dies in its 4th batch (one commit done: to the page cache, or with `DURABLE_SECONDS` passed, to
    disk); a pass with 3 ranks does only the batches not committed, and after a reboot also those whose rows were
    only in the page cache."""
    from stc_transformers import extraction

    if rebooted and extraction.boot_id() is None:
        pytest.skip("the boot id is read on Linux; elsewhere every commit is durable")
    monkeypatch.setattr(extraction, "DURABLE_SECONDS", durable_seconds)
    tester, tokenizer = STCModelTester(), make_tiny_tokenizer()
    tokenizers = [make_tiny_tokenizer() for _ in range(3)]  # one per rank: a fast tokenizer is not thread-safe
    texts, _ = synthetic_texts(45, seed=4)
    reference = extract_features(tester.model("llama"), tokenizer, texts, tmp_path / "ref", batch_size=4,
                                 progress=False)
    models = [tester.model("llama") for _ in range(3)]  # one per rank: hooks are per model
    calls = {id(m): 0 for m in models}
    original = type(models[0]).pooled_features
    crash_rank_1 = {"on": True}

    def counting(self, *args, **kwargs):
        calls[id(self)] += 1
        if crash_rank_1["on"] and self is models[1] and calls[id(self)] == 4:
            raise KeyboardInterrupt("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(models[0]), "pooled_features", counting)

    def extract(state):
        rank = state.process_index
        return extract_features(models[rank], tokenizers[rank], texts, tmp_path / "run", batch_size=4,
                                commit_every=2, progress=False, accelerator=state)

    errors = run_ranks(2, extract)
    assert isinstance(errors[1], KeyboardInterrupt)
    (folder,) = (tmp_path / "run").iterdir()
    flags = np.load(folder / PROGRESS_FILE)
    # 12 batches: rank 0 did all of 0, 2, ..., 10 (on disk at its end); rank 1 committed 1 and 3 to the page cache,
    # or to disk where commits are durable (5 was computed, not committed)
    in_page_cache = durable_seconds > 0 and extraction.boot_id() is not None
    committed = IN_PAGE_CACHE if in_page_cache else ON_DISK
    assert (flags[::2] == ON_DISK).all() and flags[1] == flags[3] == committed and not flags[5::2].any()
    meta_file = folder / "meta.json"
    assert json.loads(meta_file.read_text())["batches_done"] == 0
    done_before = 6 if rebooted and in_page_cache else 8
    if rebooted:
        meta = json.loads(meta_file.read_text())
        meta_file.write_text(json.dumps({**meta, "boot_id": "another boot"}))

    crash_rank_1["on"] = False
    for model in models:
        calls[id(model)] = 0
    results = []
    assert run_ranks(3, lambda state: results.append(extract(state))) == [None] * 3
    assert sum(calls.values()) == 12 - done_before  # nothing already on disk was recomputed
    assert all(cache.complete for cache in results) and not (folder / PROGRESS_FILE).exists()
    for block in reference.blocks:
        np.testing.assert_array_equal(results[0].array(*block), reference.array(*block))
    # the finished cache is reused by a single process without running the backbone
    crash_rank_1["on"] = True
    assert extract_features(models[1], tokenizer, texts, tmp_path / "run", batch_size=4, progress=False).complete


def test_single_process_needs_no_accelerate_state(monkeypatch):
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed_state() is None


# ------------------------------------------------------------------------------------------------------------------
# PEFT / LoRA
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft calls it
def test_early_exit_drops_the_layers_of_a_lora_backbone():
    """LoRA renames the backbone's weights (`base_layer`, `lora_A`): truncation still drops the layers after the exit
    (its check compares what the configs rebuild, not the wrapped modules), with the same logits."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    stc = STCModelTester(num_layers=4).model("bert", num_labels=2)
    lora = get_peft_model(stc, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["head"])).eval()
    inputs = STCModelTester.inputs()
    stc.set_selection([{"source": "hidden", "pooling": "mean", "layer": 1, "neurons": [0, 1]}], torch.randn(2, 2),
                      torch.zeros(2), truncate=False)
    with torch.no_grad():
        expected = lora(**inputs).logits
    stc.truncate_backbone()
    assert stc.layer_map.num_layers == stc.config.text_config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(lora(**inputs).logits, expected)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft calls it
@pytest.mark.parametrize(
    "arch,targets,dtype",
    [("bert", ["query", "value"], torch.float32), ("llama", ["q_proj", "v_proj", "down_proj"], torch.bfloat16)],
)
def test_lora_backbone_with_stc_head_round_trips(tmp_path, arch, targets, dtype):
    """LoRA on the backbone, the STC head trained in full and saved with the adapter; then merged into a plain STC
    checkpoint.

    The combination that works (peft 0.21, transformers 5.23):

        peft_model = get_peft_model(stc_model, LoraConfig(target_modules=[...backbone projections...],
                                                          modules_to_save=["head"]))   # no task_type

    - `modules_to_save=["head"]` saves the whole `STCHead` (classifier and standardisation buffers) in the adapter
      file, in float32 (STC keeps the head float32 even on a bfloat16 backbone; peft keeps LoRA weights float32).
      `task_type="SEQ_CLS"` also runs, but makes peft wrap only `head.classifier` (its default `modules_to_save`),
      so the standardisation statistics would come from the base model: use no task_type.
    - Any backbone linear can be a target, the MLP down-projection that STC reads too: STC hooks the input of the
      original module, which LoRA keeps as `base_layer` and calls with the same input, and the block outputs.
    - Reload: `PeftModel.from_pretrained(<fresh STC model from the same base>, adapter_dir)`: identical logits.
    - `merge_and_unload()` gives back an `STCForSequenceClassification` with the trained head; its
      `save_pretrained` is an ordinary STC checkpoint for `AutoModelForSequenceClassification` (identical logits).
      Merging a bfloat16 backbone rounds the merged weights to bfloat16, so merged and unmerged logits are only close.
    """
    pytest.importorskip("peft")
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    torch.manual_seed(0)
    AutoModel.from_config(STCModelTester().backbone_config(arch)).save_pretrained(tmp_path / "base")
    stc = STCForSequenceClassification.from_backbone_pretrained(tmp_path / "base", num_labels=2, dtype=dtype)
    base_weights = {n: p.detach().clone() for n, p in stc.backbone.named_parameters()}
    lora = get_peft_model(stc, LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=["head"]))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert all("lora_" in n or ".head.modules_to_save." in n for n in trainable), trainable
    assert any(".head.modules_to_save.default.classifier." in n for n in trainable)
    inputs, labels = STCModelTester.inputs(), torch.tensor([0, 1, 1])
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    for _ in range(2):
        lora(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    lora.eval()
    with torch.no_grad():
        expected = lora(**inputs).logits
    assert expected.dtype == torch.float32
    assert stc.head.modules_to_save["default"].classifier.weight.dtype == torch.float32

    lora.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    head = {k: v for k, v in saved.items() if ".head." in k}
    assert {k.rsplit("head.", 1)[1] for k in head} == {"classifier.weight", "classifier.bias", "feature_mean",
                                                        "feature_scale"}
    assert all(v.dtype == torch.float32 for v in head.values())

    fresh = STCForSequenceClassification.from_backbone_pretrained(tmp_path / "base", num_labels=2, dtype=dtype).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(**inputs).logits, expected)  # a different random head: the adapter matters
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=0, atol=0)

    merged = reloaded.merge_and_unload()
    assert type(merged) is STCForSequenceClassification and type(merged.head).__name__ == "STCHead"
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert merged.head.classifier.weight.dtype == torch.float32 and next(merged.backbone.parameters()).dtype == dtype
    changed = [n for n, p in merged.backbone.named_parameters() if not torch.equal(p, base_weights[n])]
    assert changed and all(any(t in n for t in targets) for n in changed)  # LoRA was merged into its targets only
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(merged_logits, expected, rtol=0, atol=tolerance)

    merged.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=dtype).eval()
    assert isinstance(loaded, STCForSequenceClassification)
    assert loaded.head.classifier.weight.dtype == torch.float32 and next(loaded.backbone.parameters()).dtype == dtype
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, merged_logits, rtol=0, atol=0)


@multi_process
def test_cli_fit_under_accelerate_launch(launched):
    """`accelerate launch stc fit ...`: one report, one checkpoint written by the main process, the cache removed."""
    work = launched
    output = (work / "launch_output.txt").read_text()
    assert output.count("Fitted STC on") == 1 and output.count("Saved to") == 1
    metrics = json.loads((work / "cli_out" / "metrics.json").read_text())
    loaded = AutoModelForSequenceClassification.from_pretrained(work / "cli_out")
    assert loaded.config.selection and metrics["num_features"] == loaded.config.num_selected_features
    assert not (work / "cli_out" / "feature_cache").exists()


def test_processes_resume_a_pass_interrupted_before_a_reboot_from_its_last_durable_commit(tmp_path, monkeypatch):
    """A single-process pass committed 7 of 12 batches, 6 of them synced to disk, then the machine rebooted: two
    processes resuming it agree to redo the batches from the 7th (the main process saves the rewound progress
    before the others read it) and finish to the same cache."""
    from stc_transformers import extraction

    if extraction.boot_id() is None:
        pytest.skip("the boot id is read on Linux; elsewhere every commit is durable")
    tester, texts = STCModelTester(), synthetic_texts(45, seed=4)[0]
    reference = extract_features(tester.model("llama"), make_tiny_tokenizer(), texts, tmp_path / "ref",
                                 batch_size=4, progress=False)
    models, tokenizers = [tester.model("llama") for _ in range(2)], [make_tiny_tokenizer() for _ in range(2)]
    extract_features(models[0], tokenizers[0], texts, tmp_path / "run", batch_size=4, progress=False)
    (meta_file,) = (tmp_path / "run").glob("*/meta.json")
    meta = json.loads(meta_file.read_text())
    meta.update(batches_done=7, batches_durable=6, boot_id="another boot")
    meta_file.write_text(json.dumps(meta))
    calls = {id(m): 0 for m in models}
    original = type(models[0]).pooled_features

    def counting(self, *args, **kwargs):
        calls[id(self)] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(models[0]), "pooled_features", counting)
    results = []
    assert run_ranks(2, lambda state: results.append(extract_features(
        models[state.process_index], tokenizers[state.process_index], texts, tmp_path / "run", batch_size=4,
        progress=False, accelerator=state))) == [None] * 2
    assert sum(calls.values()) == 12 - 6 and all(calls.values())
    for cache in results:
        assert cache.complete
        for block in reference.blocks:
            np.testing.assert_array_equal(cache.array(*block), reference.array(*block))
