"""Training from an offline teacher cache against training with the live teacher, same run.

    python benchmarks/bench_teacher_cache.py --steps 30

Builds an offline setup (examples/tiny_setup.py tokenizer and data; a larger teacher, 6 layers x
512 hidden, so that the teacher's cost shows; the tiny 2 x 32 student), builds the cache once (its
time is reported separately), then runs `token_level.py` twice, each in its own process: with
`--teacher` (live) and with `--teacher-cache` and no teacher. Reports the median training
throughput over the logged steps (metrics.jsonl, first row dropped) and each process's peak RSS,
as one JSON line.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Runs token_level.py as __main__ and prints the process's peak RSS when it exits.
CHILD = """
import atexit, resource, runpy, sys
atexit.register(lambda: print("PEAK_RSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
sys.argv = ["token_level.py"] + sys.argv[1:]
runpy.run_path("token_level.py", run_name="__main__")
"""


def run(args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], cwd=REPO, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    peak = float(result.stdout.rsplit("PEAK_RSS_MB", 1)[1].split()[0])
    return result, peak


def median_throughput(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(row["tokens_per_second"] for row in rows[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from examples.tiny_setup import build, build_model

    work = Path(tempfile.mkdtemp())
    setup = build(work / "setup", num_train=256, with_sentencepiece=False)
    tokenizer = AutoTokenizer.from_pretrained(setup / "teacher")
    teacher = build_model(tokenizer, hidden_size=512, num_layers=6, vocab_padding=37, seed=1)
    teacher.save_pretrained(setup / "teacher")
    teacher_parameters = sum(p.numel() for p in teacher.parameters())
    del teacher
    common = ["--student", setup / "student", "--dataset", setup / "train.jsonl",
              "--max-steps", args.steps, "--batch-size", args.batch_size, "--log-steps", 1,
              "--learning-rate", "1e-4"]

    start = time.perf_counter()
    run([*common, "--teacher", setup / "teacher", "--teacher-cache", work / "cache",
         "--max-steps", 1, "--output-dir", work / "build"])
    build_seconds = time.perf_counter() - start
    meta = json.loads((work / "cache" / "meta.json").read_text())

    _, live_peak = run([*common, "--teacher", setup / "teacher", "--output-dir", work / "live"])
    _, cached_peak = run([*common, "--teacher-cache", work / "cache", "--output-dir",
                          work / "cached"])
    live, cached = median_throughput(work / "live"), median_throughput(work / "cached")
    print(json.dumps({
        "machine": f"{os.cpu_count()}-core CPU", "steps": args.steps,
        "batch_size": args.batch_size, "teacher_parameters": teacher_parameters,
        "cache": {"build_and_one_step_seconds": round(build_seconds, 1),
                  "bytes_per_supervised_token": meta["bytes_per_supervised_token"],
                  "top_k": meta["identity"]["top_k"]},
        "live_teacher": {"tokens_per_second": live, "peak_rss_mb": round(live_peak, 1)},
        "from_cache": {"tokens_per_second": cached, "peak_rss_mb": round(cached_peak, 1)},
        "speedup": round(cached / live, 2)}))


if __name__ == "__main__":
    main()
