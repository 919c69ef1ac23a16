"""Whole token-level training steps: this suite's step against TRL's GKDTrainer and a model-only floor.

    pip install -r benchmarks/requirements.txt     # TRL: a benchmark requirement only
    python benchmarks/bench_step.py --steps 20 --warmup 3 --rounds 3

Fixed tiny setup, built from configs with fixed seeds (every side gets the same weights and data):
Llama-style teacher 4 layers x 256 hidden, student 2 x 128, vocabulary 32,000 (untied output
layers, no padding: TRL refuses a padded teacher), batch 4 of 256-token sequences whose first 128
tokens are prompt (label -100), float32, AdamW (torch's for-loop implementation on every side),
gradient clipping at 1.0 where the trainer does it, no gradient checkpointing, no dropout.

Sides, each in its own process (so its peak RSS is its own):
    token_level          common.train.train + make_kd_loss_fn, as token_level.py runs them
                         (forward KL, T=1, alpha=0; default --loss-chunk-size: automatic)
    token_level_chunk128 the same with --loss-chunk-size 128 (4 chunks per batch)
    token_level_full     the same with --loss-chunk-size -1: full logits at every position, the
                         path before chunking
    trl_gkd              TRL's GKDTrainer, lmbda=0 (off-policy), beta=0 (forward KL), bf16 off,
                         gradient checkpointing off, optim adamw_torch
    floor                teacher forward under no_grad + student forward/backward with plain
                         cross-entropy (labels=) + AdamW step: no distillation loss at all

Every side is timed the same way: a global hook on torch's Optimizer.step records the wall clock
and the process CPU time after each optimizer step, and a step is the span from one to the next
(data, forward, loss, backward, clipping, optimizer, logging: the whole loop). The first --warmup
steps are not counted; `step_ms` is the median wall time of the counted steps, `cpu_ms` the
median CPU time (all threads; less sensitive than wall time to other processes on a shared
machine), tokens/s = batch x 256 / step_ms. `peak_mb` is the process's
ru_maxrss; `base_mb` its RSS after imports and model building, before the first step (TRL's
imports alone are larger). With --rounds R every side runs R times, in rotated order, and the
medians over rounds are reported. The last line printed is one JSON object.
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
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from benchmarks.memory import peak_rss_mb, rss_mb  # noqa: E402

VOCAB, SEQ, PROMPT, BATCH = 32_000, 256, 128, 4
LEARNING_RATE = 1e-4
SIDES = ["token_level", "token_level_chunk128", "token_level_full", "trl_gkd", "floor"]


def build_model(hidden, layers, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, max_position_embeddings=SEQ,
                         tie_word_embeddings=False, attention_dropout=0.0)
    return LlamaForCausalLM(config).float()


def build_models():
    teacher = build_model(256, 4, seed=1).eval().requires_grad_(False)
    student = build_model(128, 2, seed=2)
    return teacher, student


def build_examples(count):
    """`count` sequences of SEQ random tokens, the first PROMPT of them prompt."""
    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * PROMPT + ids[PROMPT:]})
    return examples


class StepClock:
    """Wall and CPU time after every optimizer step of any torch optimizer in this process."""

    def __init__(self):
        self.marks = [(time.perf_counter(), time.process_time())]
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(self.mark)

    def mark(self, *_):
        self.marks.append((time.perf_counter(), time.process_time()))

    def steps(self):
        """[(wall seconds, cpu seconds)] per step; the first spans setup, and is warm-up anyway."""
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self.marks, self.marks[1:])]


def run_token_level(args, loss_chunk_size):
    from common.args import TrainingArguments
    from common.distill import make_kd_loss_fn
    from common.train import Method, make_accelerator, train

    teacher, student = build_models()
    examples = build_examples(BATCH * 16)
    output_dir = tempfile.mkdtemp()
    train_args = TrainingArguments(
        output_dir=output_dir, max_steps=args.warmup + args.steps, batch_size=BATCH,
        learning_rate=LEARNING_RATE, warmup_ratio=0.0, lr_scheduler="constant", save_steps=0,
        log_steps=1, seed=0, mixed_precision="no")
    accelerator = make_accelerator(train_args)
    loss_fn = make_kd_loss_fn(accelerator, teacher, VOCAB, "forward", 1.0, 0.5, 0.0,
                              loss_chunk_size=loss_chunk_size)
    base, clock = rss_mb(), StepClock()
    train(accelerator, student, examples, train_args, Method(loss_fn), pad_token_id=0,
          run_config={"benchmark": "bench_step"})
    return clock.steps(), base


def run_trl(args):
    import datasets
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    teacher, student = build_models()
    # TRL wants a tokenizer (for its pad id); the data is already token ids.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0")),
        pad_token="t0", eos_token="t1")
    dataset = datasets.Dataset.from_list(build_examples(BATCH * 16))

    def collate(rows):
        input_ids = torch.tensor([row["input_ids"] for row in rows])
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "labels": torch.tensor([row["labels"] for row in rows]),
                "prompts": input_ids[:, :PROMPT],
                "prompt_attention_mask": torch.ones_like(input_ids[:, :PROMPT])}

    config = GKDConfig(
        output_dir=tempfile.mkdtemp(), lmbda=0.0, beta=0.0, temperature=1.0,
        per_device_train_batch_size=BATCH, max_steps=args.warmup + args.steps,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, optim="adamw_torch", bf16=False, fp16=False,
        gradient_checkpointing=False, logging_steps=10_000, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0, max_length=SEQ)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                         processing_class=tokenizer, data_collator=collate)
    # what the comparison assumes (SFTConfig defaults bf16 and gradient checkpointing to on)
    assert not (trainer.args.bf16 or trainer.args.fp16 or trainer.args.gradient_checkpointing)
    assert trainer.args.optim == "adamw_torch" and trainer.lmbda == 0 and trainer.beta == 0
    base, clock = rss_mb(), StepClock()
    trainer.train()
    return clock.steps(), base


def run_floor(args):
    from common.chat import collate

    teacher, student = build_models()
    examples = build_examples(BATCH * 16)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=LEARNING_RATE)
    base, clock = rss_mb(), StepClock()
    for step in range(args.warmup + args.steps):
        start = step * BATCH % len(examples)
        batch = collate(examples[start:start + BATCH], 0)
        with torch.no_grad():
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = student(**batch).loss  # HF's own shifted cross-entropy over labels != -100
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return clock.steps(), base


def worker(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.worker.startswith("token_level"):
        chunk = {"token_level": 0, "token_level_chunk128": 128, "token_level_full": -1}
        times, base = run_token_level(args, chunk[args.worker])
    elif args.worker == "trl_gkd":
        times, base = run_trl(args)
    else:
        times, base = run_floor(args)
    counted = times[args.warmup:]
    if len(counted) != args.steps:
        raise RuntimeError(f"{len(times)} optimizer steps seen, expected {args.warmup + args.steps}")
    step_s = statistics.median(wall for wall, _ in counted)
    print(json.dumps({"step_ms": round(step_s * 1000, 1),
                      "cpu_ms": round(statistics.median(cpu for _, cpu in counted) * 1000, 1),
                      "tokens_per_s": round(BATCH * SEQ / step_s, 1),
                      "peak_mb": round(peak_rss_mb(), 1), "base_mb": round(base, 1),
                      "steps_counted": len(counted)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1, help="processes per side")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=SIDES)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per process (0 = torch's default, one per core); 1 "
                             "keeps timings stable when other processes share the cores")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    results = {side: [] for side in args.sides}
    for round_index in range(args.rounds):
        shift = round_index % len(args.sides)
        for side in args.sides[shift:] + args.sides[:shift]:
            command = [sys.executable, __file__, "--worker", side, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--threads", str(args.threads)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"{side} failed ({result.returncode}):\n{result.stderr[-3000:]}")
            row = json.loads(result.stdout.strip().splitlines()[-1])
            results[side].append(row)
            print(f"round {round_index + 1}/{args.rounds} {side}: {json.dumps(row)}", flush=True)

    summary = {side: {key: statistics.median(row[key] for row in rows)
                      for key in ("step_ms", "cpu_ms", "tokens_per_s", "peak_mb", "base_mb")}
               for side, rows in results.items()}
    ratios = {}
    if {"token_level", "trl_gkd"} <= summary.keys():
        ratios["tokens_per_s_vs_trl"] = round(summary["token_level"]["tokens_per_s"]
                                              / summary["trl_gkd"]["tokens_per_s"], 2)
        ratios["peak_mb_vs_trl"] = round(summary["token_level"]["peak_mb"]
                                         / summary["trl_gkd"]["peak_mb"], 2)
    if {"token_level", "floor"} <= summary.keys():
        ratios["step_ms_vs_floor"] = round(summary["token_level"]["step_ms"]
                                           / summary["floor"]["step_ms"], 2)
        ratios["cpu_ms_vs_floor"] = round(summary["token_level"]["cpu_ms"]
                                          / summary["floor"]["cpu_ms"], 2)
    import transformers

    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    print(json.dumps({**summary, "ratios": ratios, "setup": {
        "vocab": VOCAB, "seq": SEQ, "prompt": PROMPT, "batch": BATCH, "teacher": "4 x 256",
        "student": "2 x 128", "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version,
        "threads": args.threads or torch.get_num_threads(), "cpus": os.cpu_count()}}))


if __name__ == "__main__":
    main()
