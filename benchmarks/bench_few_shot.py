"""Small training sets: STC with and without cross-validation of its choices, over several seeded draws.

Each draw takes N training texts from the training split (seed s), fits STC with an internal validation split
(`cv_folds=0`, then the default cross-validation), and scores both on the same test texts. Prints one line per
fit and the mean test accuracy per size and variant. `--validation-size V` gives every fit V texts of the
validation split (drawn with the same seed) instead of the internal split: with a training set larger than the
search sample, this is the case where cross-validation replaces the search's refits on all training rows.

    python benchmarks/bench_few_shot.py --model minilm --data rotten_tomatoes_offline --sizes 64 256 --seeds 5
    python benchmarks/bench_few_shot.py --sizes 1000 --seeds 3
    python benchmarks/bench_few_shot.py --sizes 10200 --validation-size 150 --seeds 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from stc_transformers import STCForSequenceClassification, STCTrainer, STCTrainingArguments
from stc_transformers.backbones import resolve_backbone
from stc_transformers.data import load_text_dataset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--data", default="rotten_tomatoes_offline")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--seeds", type=int, default=5, help="draws per size (seeds 0..N-1)")
    parser.add_argument("--validation-size", type=int, default=None,
                        help="validation texts drawn from the validation split (default: the fit's internal split)")
    parser.add_argument("--test-limit", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--output-dir", default="outputs/bench_few_shot")
    args = parser.parse_args(argv)

    path = resolve_backbone(args.model)
    data = load_text_dataset(args.data)
    tokenizer = AutoTokenizer.from_pretrained(path)
    test = data["test"].shuffle(seed=0).select(range(min(args.test_limit, len(data["test"]))))
    out_dir = Path(args.output_dir)
    rows = []
    for size in args.sizes:
        for seed in range(args.seeds):
            train = data["train"].shuffle(seed=seed).select(range(size))
            validation = None if args.validation_size is None else \
                data["validation"].shuffle(seed=seed).select(range(args.validation_size))
            for variant, folds in (("without", 0), ("cross-validated", STCTrainingArguments.cv_folds)):
                model = STCForSequenceClassification.from_backbone_pretrained(path)
                fit_args = STCTrainingArguments(str(out_dir / variant), cache_dir=str(out_dir / "feature_cache"),
                                                max_length=args.max_length, seed=seed, cv_folds=folds, progress=False)
                trainer = STCTrainer(model, fit_args, train_dataset=train, eval_dataset=validation,
                                     processing_class=tokenizer)
                result = trainer.train()
                search_seconds = result.seconds["total"] - result.seconds["extraction"]  # the cache is shared
                accuracy = trainer.evaluate(test, metric_key_prefix="test")["test_accuracy"]
                rows.append({"size": size, "seed": seed, "variant": variant, "test_accuracy": round(accuracy, 4),
                             "validation": result.chosen["validation_score"], "neurons": result.chosen["num_features"],
                             "exit_layer": result.chosen["exit_layer"], "search_seconds": round(search_seconds, 1)})
                print(json.dumps(rows[-1]), flush=True)
    validated_on = "internal split" if args.validation_size is None else f"{args.validation_size} validation texts"
    print(f"\n{args.model} on {args.data}, {validated_on}, {len(test)} test texts")
    print(f"{'training texts':>14}  {'without':>8}  {'cross-validated':>15}  better  search s (without / with)")
    for size in args.sizes:
        pick = {v: [r for r in rows if r["size"] == size and r["variant"] == v] for v in ("without", "cross-validated")}
        acc = {v: np.array([r["test_accuracy"] for r in rs]) for v, rs in pick.items()}
        fit = {v: np.mean([r["search_seconds"] for r in rs]) for v, rs in pick.items()}
        better = int((acc["cross-validated"] > acc["without"]).sum())
        print(f"{size:>14}  {acc['without'].mean():8.4f}  {acc['cross-validated'].mean():15.4f}  {better}/{len(acc['without'])}"
              f"     {fit['without']:.1f} / {fit['cross-validated']:.1f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
