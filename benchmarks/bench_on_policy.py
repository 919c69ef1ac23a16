"""Time per on-policy (GKD) step, split into sampling, teacher scoring and student update: this
suite's on_policy.py step against TRL's GKDTrainer with lmbda=1, same models, data and settings.

    pip install -r benchmarks/requirements.txt     # TRL: a benchmark requirement only
    python benchmarks/bench_on_policy.py --steps 20 --batch-size 4 --max-new-tokens 24

Both run on the tiny offline models of examples/tiny_setup.py (teacher 2 x 64 without vocabulary
padding, student 2 x 32, 400-token vocabulary), every step on-policy, reverse KL at T=1 (TRL: beta=1), sampling at
temperature 1, AdamW. Both sides are timed the same way: sampling = the call that generates,
teacher = every teacher forward, update = the rest of the step (student forward, loss, backward,
optimizer). The first --warmup steps of each are not counted. Prints one JSON line (medians over
the counted steps, in milliseconds).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402


class Timer:
    """Accumulates seconds spent inside wrapped calls."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed

    def take(self):
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def summarize(rows, warmup):
    rows = rows[warmup:]
    out = {key: round(statistics.median(r[key] for r in rows) * 1000, 2) for key in rows[0]}
    out["steps_counted"] = len(rows)
    return out


def bench_ours(setup, args):
    from common.chat import ChatEncoder, encode_dataset
    from common.args import DataArguments
    from common.distill import make_kd_loss_fn
    from common.models import freeze, load_model, load_tokenizer
    from common.chat import collate
    from common.train import BatchOrder, backward_window, make_accelerator
    from on_policy import OnPolicyArguments, OnPolicySampler

    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(setup / "student"))
    teacher = freeze(load_model(str(setup / "teacher"), "float32"))
    student = load_model(str(setup / "student"), "float32")
    accelerator = make_accelerator(argparse.Namespace(grad_accum=1, mixed_precision="no"))
    encoder = ChatEncoder(tokenizer, 512)
    examples = encode_dataset(DataArguments(dataset=str(setup / "train.jsonl")), encoder,
                              log=lambda *_: None)
    gkd_args = OnPolicyArguments(lmbda=1.0, kl="reverse", max_new_tokens=args.max_new_tokens)
    sampler = OnPolicySampler(accelerator, tokenizer, {encoder.end_of_turn_token_id,
                                                       tokenizer.eos_token_id},
                              encoder.end_of_turn_token_id, gkd_args, seed=0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    student, optimizer = accelerator.prepare(student, optimizer)
    sample_timer, teacher_timer = Timer(), Timer()
    timed_sampler = sample_timer.wrap(sampler)
    teacher.forward = teacher_timer.wrap(teacher.forward)
    loss_fn = make_kd_loss_fn(accelerator, teacher, len(tokenizer), "reverse")
    order = BatchOrder(len(examples), args.batch_size, seed=0)
    rows = []
    for step in range(args.steps + args.warmup):
        start = time.perf_counter()
        batch = collate([examples[i] for i in order.indices(step)], tokenizer.pad_token_id)
        batch = timed_sampler(student, batch, step)
        backward_window(accelerator, student, [batch], loss_fn)
        optimizer.step()
        optimizer.zero_grad()
        total = time.perf_counter() - start
        sampling, teacher_s = sample_timer.take(), teacher_timer.take()
        rows.append({"total": total, "sampling": sampling, "teacher": teacher_s,
                     "update": total - sampling - teacher_s})
    return summarize(rows, args.warmup)


def bench_trl(setup, args):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(setup / "student")
    student = AutoModelForCausalLM.from_pretrained(setup / "student")
    teacher = AutoModelForCausalLM.from_pretrained(setup / "teacher")
    rows = [json.loads(line) for line in (setup / "train.jsonl").read_text().splitlines()]
    dataset = datasets.Dataset.from_list(rows)
    config = GKDConfig(
        output_dir=tempfile.mkdtemp(), lmbda=1.0, beta=1.0, temperature=1.0,
        max_new_tokens=args.max_new_tokens, per_device_train_batch_size=args.batch_size,
        max_steps=args.steps + args.warmup, learning_rate=1e-4, logging_steps=10_000,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, max_length=512)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config,
                         train_dataset=dataset, processing_class=tokenizer)
    sample_timer, teacher_timer = Timer(), Timer()
    trainer.generate_on_policy_outputs = sample_timer.wrap(trainer.generate_on_policy_outputs)
    trainer.teacher_model.forward = teacher_timer.wrap(trainer.teacher_model.forward)
    step_rows = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            total = time.perf_counter() - self.start
            sampling, teacher_s = sample_timer.take(), teacher_timer.take()
            step_rows.append({"total": total, "sampling": sampling, "teacher": teacher_s,
                              "update": total - sampling - teacher_s})

    trainer.add_callback(StepTimes())
    trainer.train()
    return summarize(step_rows, args.warmup)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    from examples.tiny_setup import build

    from examples.tiny_setup import build_model
    from transformers import AutoTokenizer

    setup = build(tempfile.mkdtemp(), num_train=64, with_sentencepiece=False)
    # TRL's GKDTrainer refuses a teacher whose embedding is padded beyond the student's (this
    # suite accepts it), so both sides use an unpadded teacher of the same size here.
    tokenizer = AutoTokenizer.from_pretrained(setup / "teacher")
    build_model(tokenizer, hidden_size=64, num_layers=2, seed=1).save_pretrained(setup / "teacher")
    ours = bench_ours(setup, args)
    trl = bench_trl(setup, args)
    import trl as trl_module

    print(json.dumps({"machine": f"{os.cpu_count()}-core CPU", "torch": torch.__version__,
                      "trl": trl_module.__version__, "batch_size": args.batch_size,
                      "max_new_tokens": args.max_new_tokens, "ms_per_step_median": {
                          "on_policy.py": ours, "trl_gkd": trl},
                      "speedup_total": round(trl["total"] / ours["total"], 2)}))


if __name__ == "__main__":
    main()
