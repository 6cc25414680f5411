"""Feature extraction and the STC fit spread over several processes / GPUs with accelerate.

The slow part of a fit is the one forward pass of the backbone over the data. Launched with several processes,
every process takes every N-th length-sorted batch, runs it on its own device and writes its rows straight into the
shared memory-mapped feature cache (the rows are disjoint: no locking); the main process marks the cache complete.
The merged cache is the one a single process writes (bit for bit on the same hardware; on CPU with the same number
of threads per process), and has the same fingerprint, so a single-process run reuses it.
`STCTrainer` does this by itself when it finds several processes; the selection search then runs on the main
process, the other processes receive its result, and only the main process saves.

    # several GPUs (one process per GPU)
    accelerate launch --num_processes 4 examples/accelerate_extract.py

    # several CPU processes (gloo). `accelerate launch --cpu` starts a single process (multi-CPU needs mpirun), so
    # use the torchrun launcher and tell the processes to stay on the CPU:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/accelerate_extract.py
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 examples/accelerate_extract.py        # the same

    # one process: the same result (and it reuses the cache written by a multi-process run)
    python examples/accelerate_extract.py

    # only fill the feature cache (e.g. on a GPU node), fit later anywhere from the same cache
    accelerate launch --num_processes 4 examples/accelerate_extract.py --extract-only

Options: `--model` (default "minilm", the offline all-MiniLM-L6-v2; any Hub id or local folder works),
`--limit N` (fit on the first N training reviews, for a quick try), `--output-dir`. All processes must run on one
machine (they share the memory-mapped cache files); every process loads the same model and data.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from transformers import AutoTokenizer

from stc_transformers import STCForSequenceClassification
from stc_transformers.backbones import resolve_backbone
from stc_transformers.data import load_rotten_tomatoes
from stc_transformers.extraction import distributed_state, extract_features
from stc_transformers.tokenization import prepare_tokenizer
from stc_transformers.trainer import STCTrainer, STCTrainingArguments


ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training reviews")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output-dir", default=str(ROOT / "outputs" / "accelerate-minilm-rotten-tomatoes"))
    parser.add_argument("--extract-only", action="store_true", help="only fill the feature cache")
    args = parser.parse_args()

    state = distributed_state()  # accelerate's PartialState with several processes, None in a single one
    main_process = state is None or state.is_main_process
    say = print if main_process else (lambda *a, **k: None)
    say(f"{state.num_processes if state else 1} process(es), backend {state.backend if state else None}")

    if state is not None:
        with state.main_process_first():  # the main process downloads / prepares the data once, the others read it
            data = load_rotten_tomatoes()
    else:
        data = load_rotten_tomatoes()
    train = data["train"] if args.limit is None else data["train"].select(range(min(args.limit, len(data["train"]))))
    backbone = resolve_backbone(args.model)
    model = STCForSequenceClassification.from_backbone_pretrained(backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    cache_dir = Path(args.output_dir) / "feature_cache"
    started = time.perf_counter()

    if args.extract_only:
        # the low-level call: each process passes the same model weights, texts and cache_dir, its model on its device
        if state is not None:
            model.to(state.device)
        cache = extract_features(model, prepare_tokenizer(tokenizer, model), train["text"], cache_dir,
                                 max_length=args.max_length, batch_size=args.batch_size, progress=main_process,
                                 accelerator=state)
        say(f"cache {cache.path}: {cache.num_texts} texts, blocks {cache.blocks}, "
            f"{time.perf_counter() - started:.1f} s")
        return

    trainer = STCTrainer(
        model,
        STCTrainingArguments(output_dir=args.output_dir, cache_dir=str(cache_dir), max_length=args.max_length,
                             batch_size=args.batch_size, progress=main_process),
        train_dataset=train, eval_dataset=data["validation"], processing_class=tokenizer,
        dataset_name="rotten_tomatoes",
    )
    result = trainer.train()  # every process gets the fit; the search ran on the main process
    trainer.save_model()  # written by the main process only
    if main_process:
        test = trainer.evaluate(data["test"], metric_key_prefix="test")
        print(f"validation accuracy {result.validation_score:.4f}, test accuracy {test['test_accuracy']:.4f}; "
              f"seconds {result.seconds}; saved to {args.output_dir}")


if __name__ == "__main__":
    main()
