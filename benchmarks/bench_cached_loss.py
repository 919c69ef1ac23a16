"""Peak memory and time of the teacher-cache loss (or, with --loss ce, sequence_level.py's
cross-entropy) at a real vocabulary: full logits against the chunked path
(common/distill.make_head_loss_fn, --loss-chunk-size).

    python benchmarks/bench_cached_loss.py --vocab 128256 --seq 2048 --hidden 256
    python benchmarks/bench_cached_loss.py --loss ce

Both sides run the same loss function the scripts run (`token_level.py --teacher-cache`, and
`on_policy.py --teacher-cache` on its off-policy steps), forward and backward, on a real
transformers Llama built from a seeded config (1 layer, --hidden, --vocab, untied embeddings) and
one sequence of --seq tokens, all supervised, with seeded random teacher top-K rows (ids distinct
per row, log-probs and tail mass from a softmax over K + 1 random logits):

    full     loss_chunk_size = -1: the student's (seq, vocab) logits at every position
    chunked  loss_chunk_size = --chunk-size (0 = automatic, ~128 MiB of float32 logits per chunk)

Each side runs in its own process, so its peak RSS (ru_maxrss) is its own; `inputs_mb` is the RSS
before the first loss (model, inputs, runtime). `ms` / `cpu_ms` are the medians over --iters of
wall and CPU time. `max_grad_diff` compares the two sides' output-layer gradients. The last line
printed is one JSON object.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.memory import peak_rss_mb, rss_mb  # noqa: E402


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=2 * args.hidden, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=args.seq, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, args.vocab, (1, args.seq), generator=generator)
    labels = input_ids.clone()
    labels[0, 0] = -100
    rows = args.seq - 1
    # K distinct ids per row: the first K of a random permutation, drawn per block of rows.
    teacher_ids = torch.empty(rows, args.top_k, dtype=torch.long)
    for row in range(rows):
        teacher_ids[row] = torch.randperm(args.vocab, generator=generator)[:args.top_k]
    logits = torch.randn(rows, args.top_k + 1, generator=generator) * 3
    log_probs = logits.log_softmax(-1)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "labels": labels, "teacher_ids": teacher_ids,
             "teacher_logprobs": log_probs[:, :-1].half().float(),
             "teacher_tail": log_probs[:, -1]}
    return model, batch


def worker(args):
    from accelerate import Accelerator

    from common.distill import make_ce_loss_fn
    from common.teacher_cache import make_cached_loss_fn

    if args.threads:
        torch.set_num_threads(args.threads)
    model, batch = build(args)
    chunk = -1 if args.worker == "full" else args.chunk_size
    loss_fn = make_cached_loss_fn(Accelerator(cpu=True), args.vocab, 1.0, 0.0, chunk) \
        if args.loss == "cached" else make_ce_loss_fn(Accelerator(cpu=True), args.vocab, chunk)
    inputs_mb = rss_mb()
    times, cpu_times = [], []
    for _ in range(args.iters):
        model.zero_grad(set_to_none=True)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss, _ = loss_fn(model, batch)
        (loss / (args.seq - 1)).backward()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if args.grads_out:
        torch.save({"weight": model.lm_head.weight.grad, "loss": loss.detach()}, args.grads_out)
    print(json.dumps({"peak_mb": round(peak_rss_mb(), 1),
                      "inputs_mb": round(inputs_mb, 1),
                      "ms": round(statistics.median(times) * 1000, 1),
                      "cpu_ms": round(statistics.median(cpu_times) * 1000, 1),
                      "loss": loss.item()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary size V")
    parser.add_argument("--seq", type=int, default=2048, help="tokens (all supervised)")
    parser.add_argument("--hidden", type=int, default=256, help="student hidden size")
    parser.add_argument("--top-k", type=int, default=32, help="cached teacher tokens per row")
    parser.add_argument("--loss", choices=["cached", "ce"], default="cached",
                        help="the teacher-cache KD loss, or plain cross-entropy")
    parser.add_argument("--chunk-size", type=int, default=0, help="positions (0 = automatic)")
    parser.add_argument("--iters", type=int, default=2, help="losses timed per process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = default)")
    parser.add_argument("--worker", choices=["full", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--grads-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    passthrough = [a for a in sys.argv[1:]]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in ("full", "chunked"):
            grads = os.path.join(tmp, f"{side}.pt")
            done = subprocess.run([sys.executable, __file__, "--worker", side, *passthrough,
                                   "--grads-out", grads], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{side} worker failed:\n{done.stderr[-3000:]}")
            results[side] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{side:8s} {results[side]}", flush=True)
        full, chunked = (torch.load(os.path.join(tmp, f"{s}.pt")) for s in ("full", "chunked"))
        grad_diff = (full["weight"] - chunked["weight"]).abs().max().item()
        grad_scale = full["weight"].abs().max().item()
    summary = {"command": "python benchmarks/bench_cached_loss.py " + " ".join(passthrough),
               "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "grads_out")},
               "torch": torch.__version__, "cpu_count": os.cpu_count(), **results,
               "peak_ratio": round(results["chunked"]["peak_mb"] / results["full"]["peak_mb"], 3),
               "max_grad_diff": grad_diff, "max_grad": grad_scale}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
