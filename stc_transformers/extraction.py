"""Streaming feature extraction: one pass of the backbone, pooled features written to a memory-mapped cache.

The pass calls the model's own `pooled_features` on a dense (unfitted) STC model, so training and inference
features come from the same capture and pooling code. For every (source, pooling) the cache holds one float32
array `[num_layers, num_texts, dim]` on disk (`<source>_<pooling>.npy`, opened with `numpy.load(mmap_mode=...)`),
so peak memory does not grow with the dataset. Texts run longest first in length-sorted batches; progress is
committed atomically every few seconds, so an interrupted pass resumes where it stopped and never leaves a cache that
looks complete but is not. A commit records rows that are in the kernel's page cache, which outlives the process;
only every few minutes and at the end are the rows forced to disk (`os.fsync`, which on a busy CPU costs more than
the rest of the writing), and after a reboot a pass resumes from the last rows on disk (see `_commit`).

Several processes (`accelerate launch`, `torchrun`) can share one pass: `extract_features(..., accelerator=state)`
gives each process every `num_processes`-th pending batch; each writes its rows straight into the shared memory-mapped
arrays (rows are disjoint, so no locking) and records finished batches in a per-batch progress file (by the same
rule: in the page cache at each commit, on disk every few minutes), so an interrupted multi-process pass resumes too
(with any number of processes). The merged cache is the one a single
process writes, bit for bit on the same hardware (on CPU with the same number of threads per process: matrix kernels
sum in an order that depends on it).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import socket
import sys
import time
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .features_stc import autocast_dtype, eval_mode
from .modeling_stc import feature_groups, group_size
from .tokenization import LengthSortedBatches


CACHE_VERSION = 3  # 3: means pooled by a batched product (`features_stc.pool`), other rounding
COMMIT_SECONDS = 10.0  # default interval between commits (progress in meta.json)
DURABLE_SECONDS = 300.0  # interval between commits that also force the rows to disk (and at the end of a pass)
PROGRESS_FILE = "progress.npy"  # multi-process passes: one uint8 flag per batch, 0 = pending, and then:
ON_DISK = 1  # its rows are on disk
IN_PAGE_CACHE = 2  # its rows are in the page cache of the boot in meta.json (pending again after a reboot)


def check_texts(texts) -> list:
    """Texts must be non-empty strings; say which one is not.

    Sentence pairs (NLI, paraphrase) come as (text, text_pair) tuples or lists, or as dicts with "text" and
    "text_pair" keys like the `pipeline` takes; they are returned as tuples, and all inputs must be of one kind.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("No texts given: pass at least one example.")
    pairs = _as_pair(texts[0]) is not None
    checked = []
    for i, text in enumerate(texts):
        pair = _as_pair(text)
        if (pair is not None) != pairs:
            raise ValueError(
                f"Text {i} is a {type(text).__name__} but text 0 is a {type(texts[0]).__name__}: pass only "
                "strings, or only (text, text_pair) pairs."
            )
        if pair is not None and len(pair) != 2:
            raise ValueError(
                f"Text {i} is a {type(text).__name__} of {len(pair)} items: {text!r:.80}. Pass strings, or "
                "(text, text_pair) pairs of two strings."
            )
        for part in pair or (text,):
            if not isinstance(part, str):
                advice = ("Pairs hold two texts; give labelled rows as (texts, labels), two lists."
                          if pair is not None else "Clean the text column.")
                raise ValueError(f"Text {i} is a {type(part).__name__}, not a string: {part!r:.80}. {advice}")
            if all(char.isspace() or unicodedata.category(char) in ("Cc", "Cf") for char in part):
                raise ValueError(
                    f"Text {i} is empty or only whitespace, control or zero-width characters ({part!r:.40}). Drop "
                    "empty rows before fitting or predicting."
                )
        checked.append(pair or text)
    return checked


def _as_pair(text) -> tuple | None:
    """(text, text_pair) for a pair given as a 2-tuple/list or a {"text", "text_pair"} dict, else None."""
    if isinstance(text, dict) and set(text) == {"text", "text_pair"}:
        return text["text"], text["text_pair"]
    if isinstance(text, (tuple, list)):
        return tuple(text)
    return None


def _checksums(tensor: torch.Tensor) -> tuple[int, int]:
    """Exact integer checksums of a tensor's bytes (read as 16-bit words): their sum, and their sum weighted by
    position. Integer sums do not depend on the order of addition, so the thread count and the device do not
    change them, as they would change a floating-point sum."""
    data = tensor.detach().reshape(-1).contiguous().view(torch.uint8)
    if data.numel() % 2:
        data = torch.cat([data, data.new_zeros(1)])
    words, total, weighted, step = data.view(torch.int16), 0, 0, 1 << 22
    weights = torch.arange(min(step, words.numel()), device=words.device, dtype=torch.int32) % 65521 + 1
    for number, start in enumerate(range(0, words.numel(), step)):
        part = words[start : start + step]
        total += int(part.sum(dtype=torch.int64))
        # |word x weight| < 2^31: exact in int32; each slice weighted by its number
        weighted += (number + 1) * int((part.to(torch.int32) * weights[: part.numel()]).sum(dtype=torch.int64))
    return total, weighted


def _stored_parameters(backbone):
    """(name, values) of every parameter. Those that accelerate offloaded (`device_map` with "disk" or "cpu"
    offload: the parameter is on the meta device) are read from the weights map of the module's hook."""
    offloaded = {}
    for prefix, module in backbone.named_modules():
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        for local, param in module.named_parameters(recurse=False):
            if param.device.type == "meta" and weights is not None:
                offloaded[f"{prefix}.{local}" if prefix else local] = weights[local]
    for name, param in backbone.named_parameters():
        values = offloaded.get(name, param)
        if values.device.type == "meta":
            raise ValueError(f"The backbone parameter {name} has no values (meta device): load the weights first.")
        yield name, values


def model_fingerprint(model) -> str:
    """Identity of a backbone: its config and, per parameter, its dtype, shape, exact checksums of its bytes and an
    evenly strided sample. Fine-tuned weights, a few edited rows of an embedding or a cast to another dtype all
    change it; the thread count and the device do not (a cache written by several processes is reused by one)."""
    digest = hashlib.sha256(model.config.text_config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, param in _stored_parameters(model.backbone):
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].float()
            digest.update(f"{name} {param.dtype} {tuple(param.shape)} {_checksums(param)}".encode())
            digest.update(sample.cpu().numpy().tobytes())
    return digest.hexdigest()


def tokens_fingerprint(batches: LengthSortedBatches) -> str:
    """Identity of what the backbone reads: every text's token ids (and token types), as tokenized."""
    digest = hashlib.sha256()
    for column in batches.columns:
        digest.update(column.encode())
        values = batches.encodings[column]
        digest.update(np.asarray([len(row) for row in values], dtype=np.int64).tobytes())
        digest.update(np.concatenate([np.asarray(row, dtype=np.int64) for row in values]).tobytes())
    return digest.hexdigest()


def texts_fingerprint(texts: list) -> str:
    digest = hashlib.sha256()
    for text in texts:
        for part_number, part in enumerate((text,) if isinstance(text, str) else text):
            digest.update(b"\1" if part_number else b"")  # pairs differ from the single text of both parts
            digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


def empty_rows(*shape) -> np.ndarray:
    """An uninitialised float32 array for feature rows, from torch's allocator. numpy asks the kernel for huge pages
    for large arrays, and where the kernel defragments memory for them on demand (`transparent_hugepage/defrag =
    madvise`, a common default) the first touch of such an array stalls (measured: twice the time of reading it)."""
    return torch.empty(shape, dtype=torch.float32).numpy()


@dataclass
class FeatureCache:
    """A finished (or resumable) on-disk cache of pooled features for one list of texts."""

    path: Path
    meta: dict

    @property
    def num_texts(self) -> int:
        return self.meta["num_texts"]

    @property
    def blocks(self) -> list[tuple[str, str]]:
        return [(b["source"], b["pooling"]) for b in self.meta["blocks"]]

    @property
    def complete(self) -> bool:
        return self.meta["batches_done"] == self.meta["num_batches"]

    def array(self, source: str, pooling: str, mode: str = "r") -> np.ndarray:
        """Memory-mapped `[num_layers, num_texts, dim]` float32 array of one (source, pooling) block."""
        return np.load(self.path / f"{source}_{pooling}.npy", mmap_mode=mode)

    def read_rows(self, source: str, pooling: str, start: int, stop: int, layers=None, out=None) -> np.ndarray:
        """Rows start:stop of one block, `[layers, stop - start, dim]` float32 (all layers or the given ones), into
        `out` (default: a new `empty_rows`). Plain file reads: several times faster than the first touch of a memory
        map's pages."""
        array = self.array(source, pooling)
        num_layers, num_texts, dim = array.shape
        if not 0 <= start <= stop <= num_texts:
            raise IndexError(f"rows {start}:{stop} out of range for {num_texts} texts")
        layers = range(num_layers) if layers is None else list(layers)
        out = empty_rows(len(layers), stop - start, dim) if out is None else out
        row_bytes = dim * array.itemsize
        with open(array.filename, "rb", buffering=0) as file:
            for position, layer in enumerate(layers):
                target = memoryview(out[position]).cast("B")
                file.seek(array.offset + (layer * num_texts + start) * row_bytes)
                done = 0
                while done < target.nbytes:
                    read = file.readinto(target[done:])
                    if not read:
                        raise OSError(f"{array.filename} is shorter than its header says: re-extract the features")
                    done += read
        return out

    def tensor(self, source: str, pooling: str) -> torch.Tensor:
        """Zero-copy torch view of a block (read-only memory map)."""
        return torch.from_numpy(np.asarray(self.array(source, pooling, mode="c")))

    def save_meta(self):
        tmp = self.path / "meta.json.tmp"
        tmp.write_text(json.dumps(self.meta, indent=1))
        os.replace(tmp, self.path / "meta.json")


def _reserve_disk(file: Path, meta: dict) -> None:
    """Allocate a cache file's blocks now: a memory-mapped file is sparse, and a disk that fills while the pages are
    written kills the process (SIGBUS) instead of raising an error."""
    if not hasattr(os, "posix_fallocate"):  # not on macOS / Windows
        return
    size = file.stat().st_size
    with open(file, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError as error:
            if error.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # file systems without it
                return
            total = sum(b["num_layers"] * b["dim"] for b in meta["blocks"]) * meta["num_texts"] * 4
            raise OSError(
                error.errno, f"No room for the feature cache in {file.parent} (it needs {total / 1e9:.2f} GB): free "
                "disk space, or give `cache_dir=` (`--cache-dir`) on a larger disk"
            ) from error


def _open_cache(path: Path, meta: dict) -> FeatureCache:
    """Open an existing cache with the same fingerprint, or create empty arrays for a new one."""
    meta_file = path / "meta.json"
    if meta_file.exists():
        stored = json.loads(meta_file.read_text())
        if stored.get("fingerprint") == meta["fingerprint"] and stored.get("version") == CACHE_VERSION:
            cache = FeatureCache(path, stored)
            if not cache.complete and cache.meta.get("boot_id") != boot_id():
                # rebooted since: rows only in the page cache may be lost. Saved, so that every process of a
                # multi-process pass resumes from the same batch.
                cache.meta["batches_done"] = cache.meta.get("batches_durable", cache.meta["batches_done"])
                cache.meta["boot_id"] = boot_id()
                _forget_page_cache_batches(path / PROGRESS_FILE)
                cache.save_meta()
            return cache
    path.mkdir(parents=True, exist_ok=True)
    (path / PROGRESS_FILE).unlink(missing_ok=True)  # progress of an older, different pass
    for block in meta["blocks"]:
        shape = (block["num_layers"], meta["num_texts"], block["dim"])
        array = np.lib.format.open_memmap(path / f"{block['source']}_{block['pooling']}.npy", "w+", np.float32, shape)
        _reserve_disk(Path(array.filename), meta)
        del array
    cache = FeatureCache(path, meta)
    cache.save_meta()
    return cache


def _forget_page_cache_batches(progress_file: Path) -> None:
    """After a reboot, the batches of a multi-process pass whose rows were only in the page cache are pending again."""
    if progress_file.exists():
        flags = np.load(progress_file, mmap_mode="r+")
        flags[flags == IN_PAGE_CACHE] = 0
        flags.flush()


def extract_features(
    model,
    tokenizer,
    texts,
    cache_dir,
    *,
    max_length: int | None = 256,
    batch_size: int = 32,
    commit_every: int | None = None,
    progress: bool = True,
    description: str = "Extracting features",
    accelerator=None,
    weights_fingerprint: str | None = None,
) -> FeatureCache:
    """Run the backbone once over `texts` and cache every layer's pooled features under `cache_dir`.

    `model` must be a dense STC model (before any fit). A cache with the same fingerprint (model weights, the
    texts' token ids, padding, batching) is reused; an unfinished one resumes at the first uncommitted batch.
    Progress is committed every `commit_every` batches, by default every `COMMIT_SECONDS` (10) seconds of work.

    `accelerator`: an `accelerate.Accelerator` or `PartialState` (see `distributed_state()`). With more than one
    process, every process must call this with the same model weights, texts and `cache_dir`, its model on its own
    device (`accelerator.device`); the processes split the batches and all return the finished cache. All processes
    must run on one machine (they share the memory-mapped files).

    `weights_fingerprint`: `model_fingerprint(model)` when the caller computed it for these weights already (a fit
    extracts two splits; on SmolLM2 it takes 2 s).
    """
    if model.config.selection is not None:
        raise ValueError(
            "This model already has a neuron selection (it was fitted or sparsified); feature extraction needs the "
            "dense model. Start from `STCForSequenceClassification.from_backbone_pretrained(...)`."
        )
    texts = check_texts(texts)
    groups = feature_groups(model.config, model.source_dims)
    num_layers = model.config.text_config.num_hidden_layers
    blocks = [
        {"source": s, "pooling": p, "num_layers": num_layers, "dim": model.source_dims[s]}
        for s in model.config.sources
        for p in model.config.poolings
    ]
    batches = LengthSortedBatches(tokenizer, texts, max_length=max_length, batch_size=batch_size)
    autocast = autocast_dtype(model.device.type)
    key = {
        "version": CACHE_VERSION,
        "model": weights_fingerprint or model_fingerprint(model),
        "texts": texts_fingerprint(texts),
        "tokens": tokens_fingerprint(batches),  # any change of vocabulary, truncation side or max_length
        "tokenizer": [type(tokenizer).__name__, tokenizer.padding_side, tokenizer.pad_token_id],
        "blocks": blocks,
        "batch_size": batch_size,
        "chunks": [model.config.long_input_chunks, model.config.chunk_overlap],
        "autocast": None if autocast is None else str(autocast),  # the pass runs in the caller's autocast, if any
    }
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    meta = {
        "version": CACHE_VERSION,
        "fingerprint": fingerprint,
        "num_texts": len(texts),
        "blocks": blocks,
        "num_batches": len(batches),
        "batches_done": 0,
        "batches_durable": 0,
        "boot_id": boot_id(),
        "seconds": 0.0,
        "tokens": int(batches.lengths.sum()),
    }
    path = Path(cache_dir) / fingerprint[:20]
    sharded = accelerator is not None and accelerator.num_processes > 1
    if sharded:
        cache = _open_cache_on_main(accelerator, path, meta)
    else:
        cache = _open_cache(path, meta)
    if cache.complete:
        return cache

    arrays = {(b["source"], b["pooling"]): cache.array(b["source"], b["pooling"], mode="r+") for b in blocks}
    offsets, start = {}, 0
    for group in groups:
        key = (group["source"], group["pooling"])
        offsets.setdefault(key, start)
        start += group_size(group)
    device = model.device

    def write_batch(number: int):
        """Run batch `number` through the backbone and write its rows into the arrays (not yet flushed)."""
        index = batches.index[number]
        batch = batches.batch(number, device)
        with torch.inference_mode():
            pooled = model.pooled_features(**batch).float().cpu().numpy()
        if not np.isfinite(pooled).all():
            raise ValueError(
                "The backbone produced NaN/inf activations (typically float16 overflow). Load the backbone in "
                "float32 or bfloat16 (`dtype=torch.bfloat16`)."
            )
        for (source, pooling), array in arrays.items():
            dim = model.source_dims[source]
            block = pooled[:, offsets[(source, pooling)] : offsets[(source, pooling)] + num_layers * dim]
            array[:, index] = block.reshape(len(index), num_layers, dim).transpose(1, 0, 2)

    if sharded:
        with eval_mode(model):
            return _extract_shard(accelerator, cache, arrays, write_batch, commit_every=commit_every,
                                  progress=progress, description=description)
    started = last_durable = time.perf_counter()
    with eval_mode(model), tqdm(total=len(batches), initial=cache.meta["batches_done"], desc=description,
                                disable=not progress, unit="batch") as bar:
        for number in range(cache.meta["batches_done"], len(batches)):
            write_batch(number)
            bar.update(1)
            if number + 1 == len(batches) or _commit_due(number + 1, started, commit_every):
                now = time.perf_counter()
                durable = _durable_due(number + 1 == len(batches), last_durable, now)
                _commit(cache, arrays, number + 1, now - started, durable)
                started = now
                if durable:
                    last_durable = now
    return cache


def _commit_due(batches_done: int, last_commit: float, commit_every: int | None) -> bool:
    """Every `commit_every` batches, or by default every COMMIT_SECONDS (a flush costs a disk write)."""
    if commit_every:
        return batches_done % commit_every == 0
    return time.perf_counter() - last_commit >= COMMIT_SECONDS


def _durable_due(last: bool, last_durable: float, now: float) -> bool:
    """Whether a commit forces its rows to disk: the last one of a pass (or of a process's share), one
    `DURABLE_SECONDS` after the previous durable one, and every one where the boot cannot be told (not Linux)."""
    return last or now - last_durable >= DURABLE_SECONDS or boot_id() is None


def _commit(cache: FeatureCache, arrays: dict, batches_done: int, seconds: float, durable: bool):
    """Record progress: the rows of the first `batches_done` batches are in the arrays. A crash before this point
    redoes the batches.

    The rows are in the kernel's page cache, which a crash of the process does not lose; a reboot may, so a commit
    records the boot it happened in, and a pass resumed after another boot starts after the last durable commit,
    whose rows were written to disk first (`durable`, see `_durable_due`)."""
    if durable:
        for array in arrays.values():
            _write_to_disk(array)
        cache.meta["batches_durable"] = batches_done
    cache.meta["batches_done"] = batches_done
    cache.meta["boot_id"] = boot_id()
    cache.meta["seconds"] += seconds
    cache.save_meta()
    if cache.complete:
        (cache.path / PROGRESS_FILE).unlink(missing_ok=True)  # left by an interrupted multi-process pass


@functools.cache
def boot_id() -> str | None:
    """This boot of the machine (Linux), or None where it cannot be told; read once per process."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _write_to_disk(array: np.memmap):
    """Write a memory-mapped array's changed pages to disk. On Linux a file's mapped pages are its page cache and
    `os.fsync` writes them; `mmap.flush` (msync) holds the interpreter lock throughout."""
    if not sys.platform.startswith("linux"):
        array.flush()
        return
    with open(array.filename, "rb") as file:
        os.fsync(file.fileno())


# ------------------------------------------------------------------------------------------------------------------
# Several processes
# ------------------------------------------------------------------------------------------------------------------


def distributed_state(device=None):
    """The `accelerate.PartialState` when this process is one of several (`accelerate launch`, `torchrun`, mpirun),
    else None.

    `PartialState()` alone reports one process for a CPU-only multi-process launch: on CPU (no CUDA, `device="cpu"`
    or `ACCELERATE_USE_CPU=1`) it is created with `cpu=True`, which selects the gloo backend. An already created
    state (by an `Accelerator` or a `TrainingArguments`) is reused.
    """
    from accelerate import PartialState
    from accelerate.utils import get_int_from_env, parse_flag_from_env

    launched = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1) > 1
    if not launched and not PartialState._shared_state:
        return None
    cpu = (
        not torch.cuda.is_available()
        or parse_flag_from_env("ACCELERATE_USE_CPU")
        or (device is not None and torch.device(device).type == "cpu")
    )
    state = PartialState(cpu=cpu)
    if launched and state.num_processes == 1:
        warnings.warn(
            "This process was launched as one of several, but the accelerate state in use has one process (was it "
            "created without `cpu=True` on a machine without GPUs?): each process will extract all features itself."
        )
    return state if state.num_processes > 1 else None


def _open_cache_on_main(state, path: Path, meta: dict) -> FeatureCache:
    """The main process opens or creates the cache (and its progress file); the others open it after."""
    here = (socket.gethostname(), meta["fingerprint"], str(path.resolve()))
    seen = [here]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        seen = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(seen, here)
    if len({host for host, _, _ in seen}) > 1:
        raise ValueError(
            "Multi-process feature extraction needs all processes on one machine (they write one memory-mapped "
            f"cache); got hosts {sorted({h for h, _, _ in seen})}. Extract on one node, or one process per node."
        )
    if len({(f, p) for _, f, p in seen}) > 1:
        raise ValueError(
            "The processes disagree on the feature cache: every process must pass the same texts (same order), the "
            "same model weights (load or seed them identically) and the same `cache_dir`. Got "
            f"{[(f[:12], p) for _, f, p in seen]}."
        )
    if state.is_main_process:
        cache = _open_cache(path, meta)
        progress_file = path / PROGRESS_FILE
        if not cache.complete and not progress_file.exists():
            flags = np.lib.format.open_memmap(progress_file.with_suffix(".tmp.npy"), "w+", np.uint8,
                                              (meta["num_batches"],))
            flags.flush()
            del flags
            os.replace(progress_file.with_suffix(".tmp.npy"), progress_file)
    state.wait_for_everyone()
    return FeatureCache(path, json.loads((path / "meta.json").read_text()))


def _extract_shard(state, cache: FeatureCache, arrays: dict, write_batch, *, commit_every: int | None, progress: bool,
                   description: str) -> FeatureCache:
    """This process's share of the pending batches, then (main process) mark the cache complete.

    Progress is kept per batch in the progress file, by the rule of `_commit`: a commit marks its batches as in the
    page cache (`IN_PAGE_CACHE`), and every `DURABLE_SECONDS` and at the end of the share the rows are forced to
    disk and their batches marked `ON_DISK`. A pass opened after a reboot redoes the batches only in the page cache
    (`_open_cache`)."""
    flags = np.load(cache.path / PROGRESS_FILE, mmap_mode="r+")
    done = np.array(flags, dtype=bool)
    done[: cache.meta["batches_done"]] = True  # the committed prefix of an interrupted single-process pass
    pending = np.flatnonzero(~done)
    state.wait_for_everyone()  # all processes split the same snapshot before any records progress
    mine = pending[state.process_index :: state.num_processes]
    started = last_commit = last_durable = time.perf_counter()
    bar = tqdm(total=len(mine), desc=f"{description} [{state.num_processes} processes]",
               disable=not (progress and state.is_main_process), unit="batch")
    try:
        finished, cached = [], []  # batches since the last commit, and in the page cache since the last durable one
        for step, number in enumerate(mine):
            write_batch(int(number))
            finished.append(number)
            bar.update(1)
            last = step + 1 == len(mine)
            if last or _commit_due(step + 1, last_commit, commit_every):
                now = time.perf_counter()
                if _durable_due(last, last_durable, now):
                    for array in arrays.values():
                        _write_to_disk(array)
                    flags[cached + finished] = ON_DISK  # only after the rows are on disk
                    flags.flush()
                    cached, last_durable = [], now
                else:
                    flags[finished] = IN_PAGE_CACHE
                    cached += finished
                finished, last_commit = [], now
    finally:
        bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        missing = np.flatnonzero(~(np.array(flags, dtype=bool) | done))
        if len(missing):
            raise RuntimeError(f"Batches {missing[:10].tolist()} were not extracted by any process.")
        del flags
        _commit(cache, arrays, cache.meta["num_batches"], time.perf_counter() - started, durable=True)
    else:
        del flags
    state.wait_for_everyone()
    return FeatureCache(cache.path, json.loads((cache.path / "meta.json").read_text()))
