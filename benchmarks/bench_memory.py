"""Peak memory of an STC fit against dataset size: flat apart from the on-disk feature cache.

Each size runs in a fresh process; a sampler thread reads the process's anonymous resident memory (heap and
tensors, what a fit really holds) every 50 ms, and the kernel reports peak RSS, which also counts pages of the
memory-mapped cache that the OS may drop at any time.

    python benchmarks/bench_memory.py --model minilm --sizes 1000 4000 10000
    python benchmarks/bench_memory.py --model smollm2 --sizes 10000     # pooled-cache size for SmolLM2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


CHILD = r"""
import json, resource, sys, threading, time, shutil, tempfile
from pathlib import Path
peak = {"anon": 0}
def sample():
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak["anon"] = max(peak["anon"], int(line.split()[1]))
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
from transformers import AutoTokenizer
from stc_transformers import STCForSequenceClassification, STCTrainer, STCTrainingArguments
from stc_transformers.backbones import resolve_backbone
from stc_transformers.data import load_rotten_tomatoes
model_name, size, max_length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = load_rotten_tomatoes()
train = data["train"].shuffle(seed=0).select(range(min(size, len(data["train"]))))
path = resolve_backbone(model_name)
model = STCForSequenceClassification.from_backbone_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
out = Path(tempfile.mkdtemp())
before = peak["anon"]
trainer = STCTrainer(model, STCTrainingArguments(str(out), max_length=max_length, progress=False),
                     train_dataset=train, eval_dataset=data["validation"].select(range(500)),
                     processing_class=tokenizer)
started = time.perf_counter()
trainer.train()
seconds = time.perf_counter() - started
cache = sum(f.stat().st_size for f in (out / "feature_cache").rglob("*.npy"))
print(json.dumps({"texts": len(train), "fit_seconds": round(seconds, 1),
                  "peak_anon_mb": round(peak["anon"] / 1024), "anon_before_fit_mb": round(before / 1024),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "cache_mb": round(cache / 2**20)}))
shutil.rmtree(out)
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 10000])
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args(argv)
    rows = []
    for size in args.sizes:
        result = subprocess.run([sys.executable, "-c", CHILD, args.model, str(size), str(args.max_length)],
                                capture_output=True, text=True)
        if result.returncode:  # the child's own error, not only its exit code
            sys.exit(f"The fit of {size} texts failed (exit code {result.returncode}):\n{result.stderr[-3000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print(f"\n{'texts':>6s} {'fit s':>7s} {'peak anon MB':>13s} {'(before fit)':>13s} {'peak RSS MB':>12s} "
          f"{'cache MB':>9s}")
    for r in rows:
        print(f"{r['texts']:6d} {r['fit_seconds']:7.1f} {r['peak_anon_mb']:13d} {r['anon_before_fit_mb']:13d} "
              f"{r['peak_rss_mb']:12d} {r['cache_mb']:9d}")


if __name__ == "__main__":
    main()
