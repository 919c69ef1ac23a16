"""Peak memory and time of the KD loss at a real vocabulary: full logits against common/chunked.py.

    python benchmarks/bench_loss.py --vocab 128256 --seq 2048 --hidden 2048 --kl forward

Both sides compute, on the same seeded random inputs, what make_kd_loss_fn computes for `--seq`
supervised positions, forward and backward: teacher logits from teacher hidden states through the
teacher's output layer (no grad), student logits likewise, float32 log-softmax, the divergence
times T², the cross-entropy statistic (with gradient only if --alpha > 0), and the backward pass
of the per-token mean loss (what the training loop backpropagates) to the student's hidden states
and output layer weight.

    naive     the full (seq, vocab) logits of both models, as --loss-chunk-size -1 does
    chunked   common.chunked.chunked_kd_loss, --chunk-size positions at a time (0 = automatic),
              with its closed-form gradients
    autograd  the same chunks, each chunk's gradient by autograd through common.losses (the path
              chunked_kd_loss takes for divergences without a closed form, e.g. skew KL)

`--sides` picks two or more (default: naive chunked); ratios and gradient differences are
against the first.

Each side runs in its own process, so its peak RSS (ru_maxrss) is its own. That peak includes the
Python + torch runtime and the inputs, which both sides share: both output layers and the weight's
gradient (3 x vocab x hidden x 4 bytes); `inputs_mb` is the RSS just before the first loss. Each
process runs --iters losses; `ms` is their median wall time and `cpu_ms` their median CPU time
(all threads: less sensitive than wall time to other processes on a shared machine), each then
the median over --rounds (the two sides alternate which goes first). `max_grad_diff` is the largest absolute difference between the two
sides' gradients (hidden states and weight); `max_grad` is the largest gradient, for scale.
The last line printed is one JSON object.
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

from common.chunked import auto_chunk_size, chunked_kd_loss  # noqa: E402
from common.losses import cross_entropy, distillation_loss  # noqa: E402


def make_inputs(args):
    """Seeded inputs, filled in place (a `randn(...) * scale` would double the peak at setup)."""
    generator = torch.Generator().manual_seed(0)
    teacher_hidden_size = args.teacher_hidden or args.hidden

    def normal(*shape, std=1.0):
        return torch.empty(*shape).normal_(0.0, std, generator=generator)

    # std so student logits have std ~2 and teacher logits ~3: peaked, realistic distributions
    return {"student_hidden": normal(args.seq, args.hidden),
            "student_weight": normal(args.vocab, args.hidden, std=2 / args.hidden ** 0.5),
            "teacher_hidden": normal(args.seq, teacher_hidden_size),
            "teacher_weight": normal(args.vocab, teacher_hidden_size,
                                     std=3 / teacher_hidden_size ** 0.5),
            "target_ids": torch.randint(0, args.vocab, (args.seq,), generator=generator)}


def naive_loss(inputs, hidden, weight, args):
    with torch.no_grad():
        teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_weight"].T
    student_logits = hidden @ weight.T
    kd = distillation_loss(student_logits, teacher_logits, args.kl, args.loss_temperature,
                           args.beta)
    with torch.set_grad_enabled(args.alpha > 0):
        ce = cross_entropy(student_logits, inputs["target_ids"])
    return (1.0 - args.alpha) * kd.sum() + args.alpha * ce.sum()


def chunked_loss(inputs, hidden, weight, args):
    loss, _ = chunked_kd_loss(hidden, weight, inputs["target_ids"], args.vocab,
                              teacher_hidden=inputs["teacher_hidden"],
                              teacher_weight=inputs["teacher_weight"], kind=args.kl,
                              temperature=args.loss_temperature, beta=args.beta, alpha=args.alpha,
                              chunk_size=args.chunk_size)
    return loss


def worker(args):
    """One side, in this process: --iters forward + backward passes; prints one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "autograd":
        import common.chunked

        common.chunked._CLOSED_FORM_KINDS = ()  # every divergence through per-chunk autograd
    loss_fn = {"naive": naive_loss, "chunked": chunked_loss, "autograd": chunked_loss}[args.worker]
    inputs = make_inputs(args)
    weight = inputs["student_weight"].requires_grad_()
    inputs_mb = rss_mb()
    times, cpu_times = [], []
    for _ in range(args.iters):
        hidden = inputs["student_hidden"].detach().requires_grad_()
        weight.grad = None  # a fresh step, as after zero_grad(set_to_none=True)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = loss_fn(inputs, hidden, weight, args)
        (loss / args.seq).backward()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if args.grads_out:
        torch.save({"hidden": hidden.grad, "weight": weight.grad, "loss": loss.detach()},
                   args.grads_out)
    print(json.dumps({"peak_mb": round(peak_rss_mb(), 1),
                      "ms": round(statistics.median(times) * 1000, 1),
                      "cpu_ms": round(statistics.median(cpu_times) * 1000, 1),
                      "inputs_mb": round(inputs_mb, 1), "loss": loss.item(),
                      "all_ms": [round(t * 1000, 1) for t in times]}))


def run_worker(side, args, grads_out):
    command = [sys.executable, __file__, "--worker", side, *args.passthrough]
    if grads_out:
        command += ["--grads-out", grads_out]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{side} worker failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def max_grad_diff(path_a, path_b):
    a, b = torch.load(path_a, mmap=True), torch.load(path_b, mmap=True)
    diff, largest = 0.0, 0.0
    for name in ("hidden", "weight"):
        for start in range(0, a[name].shape[0], 4096):  # row blocks: never two full copies
            block_a, block_b = a[name][start:start + 4096], b[name][start:start + 4096]
            diff = max(diff, (block_a - block_b).abs().max().item())
            largest = max(largest, block_a.abs().max().item())
    return diff, largest, abs(a["loss"].item() - b["loss"].item())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary size V")
    parser.add_argument("--seq", type=int, default=2048, help="supervised positions N")
    parser.add_argument("--hidden", type=int, default=2048,
                        help="student hidden size H (2048 = Llama-3.2-1B, whose V is 128256)")
    parser.add_argument("--teacher-hidden", type=int, default=0, help="teacher's (0 = --hidden)")
    parser.add_argument("--kl", choices=["forward", "reverse", "jsd"], default="forward")
    parser.add_argument("--loss-temperature", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--alpha", type=float, default=0.0)
    parser.add_argument("--chunk-size", type=int, default=0, help="positions (0 = automatic)")
    parser.add_argument("--iters", type=int, default=2, help="losses timed per process")
    parser.add_argument("--rounds", type=int, default=1, help="processes per side")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per process (0 = torch's default, one per core); 1 "
                             "keeps timings stable when other processes share the cores")
    parser.add_argument("--sides", nargs="+", choices=["naive", "chunked", "autograd"],
                        default=["naive", "chunked"], help="what to compare, the first the "
                                                           "reference (default: naive chunked)")
    parser.add_argument("--worker", choices=["naive", "chunked", "autograd"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--grads-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    args.passthrough = [f"--{name}={getattr(args, name.replace('-', '_'))}" for name in (
        "vocab", "seq", "hidden", "teacher-hidden", "kl", "loss-temperature", "beta", "alpha",
        "chunk-size", "iters", "threads")]
    results = {side: [] for side in args.sides}
    with tempfile.TemporaryDirectory() as scratch:
        grads = {side: os.path.join(scratch, f"{side}.pt") for side in results}
        for round_index in range(args.rounds):
            order = args.sides if round_index % 2 == 0 else args.sides[::-1]
            for side in order:
                row = run_worker(side, args, grads[side] if round_index == 0 else None)
                results[side].append(row)
                print(f"round {round_index + 1}/{args.rounds} {side}: {json.dumps(row)}",
                      flush=True)
        reference = args.sides[0]
        differences = {side: max_grad_diff(grads[reference], grads[side])
                       for side in args.sides[1:]}
    summary = {side: {key: statistics.median(r[key] for r in rows)
                      for key in ("peak_mb", "ms", "cpu_ms", "inputs_mb")}
               for side, rows in results.items()}
    print(json.dumps({
        **summary,
        **{f"{side}_vs_{reference}": {
            "max_grad_diff": diff, "max_grad": largest, "loss_diff": loss_diff,
            "peak_ratio": round(summary[side]["peak_mb"] / summary[reference]["peak_mb"], 3),
            "time_ratio": round(summary[side]["ms"] / summary[reference]["ms"], 3),
            "cpu_time_ratio": round(summary[side]["cpu_ms"] / summary[reference]["cpu_ms"], 3)}
           for side, (diff, largest, loss_diff) in differences.items()},
        "setup": {"vocab": args.vocab, "seq": args.seq, "hidden": args.hidden,
                  "teacher_hidden": args.teacher_hidden or args.hidden, "kl": args.kl,
                  "temperature": args.loss_temperature, "alpha": args.alpha,
                  "chunk_size": args.chunk_size or auto_chunk_size(args.vocab),
                  "iters": args.iters, "rounds": args.rounds, "torch": torch.__version__,
                  "threads": args.threads or torch.get_num_threads(),
                  "cpus": os.cpu_count()}}))


if __name__ == "__main__":
    main()
