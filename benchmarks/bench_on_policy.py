"""Time per on-policy (GKD) step, split into sampling, teacher scoring and student update: this
suite's on_policy.py step against TRL's GKDTrainer with lmbda=1, same models, data and settings.

    pip install -r benchmarks/requirements.txt     # TRL: a benchmark requirement only
    python benchmarks/bench_on_policy.py --steps 20 --batch-size 4 --max-new-tokens 24

Both run on the tiny offline models of examples/tiny_setup.py (teacher 2 x 64 without vocabulary
padding, student 2 x 32, 400-token vocabulary), every step on-policy, reverse KL at T=1 (TRL:
beta=1), sampling at temperature 1, AdamW. Every setting that changes step time is the same on both
sides (TRL's GKDConfig defaults differ: bf16, gradient checkpointing and the fused AdamW are on
there, so they are set explicitly here, and checked after the run):
    precision             float32 weights, no mixed precision (TRL: bf16=False, fp16=False)
    checkpointing         off (TRL: gradient_checkpointing=False; generation then uses the KV cache)
    optimizer             torch.optim.AdamW, lr 1e-4, weight decay 0, torch's default (for-loop on
                          CPU) implementation (TRL: optim="adamw_torch", not adamw_torch_fused)
    gradient clipping     max norm 1.0 (on_policy.py's --max-grad-norm default; TRL's max_grad_norm)
    learning rate         constant (TRL: lr_scheduler_type="constant", no warm-up)
    batch / sampling      --batch-size, --max-new-tokens, temperature 1, top_k 0, top_p 1, stop at
                          the end-of-turn token, lmbda 1 (every step samples), one process
    threads               both sides in this one process, torch.get_num_threads() (--threads)
Both sides are timed the same way: sampling = the call that generates, teacher = every teacher
forward, update = the rest of the step (student forward, loss, backward, clipping, optimizer);
a step starts once its batch is collated (TRL's Trainer collates before on_step_begin). Each phase
is reported in wall time and, as cpu_*, in process CPU time (all threads; less sensitive than wall
time to other processes on a shared machine). The first --warmup steps of each are not counted.
With --rounds R both sides run R times in this process, alternating which goes first, and each
figure is the median over rounds (fastest_round: each side's round with the lowest total, the
least disturbed by other processes). Prints each round's medians, each side's settings as read
back from the objects that ran (the generation config passed to generate(), the optimizer's
defaults, ...), then one JSON line (medians over the counted steps, in milliseconds)."""

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

LEARNING_RATE, MAX_GRAD_NORM = 1e-4, 1.0


class GenerateRecorder:
    """Wraps a model's generate(): keeps the settings of the first call, and the prompt width and
    the number of decoding steps (generated columns) of every call, so the work can be compared."""

    def __init__(self, model):
        self.seen, self.prompt_widths, self.new_columns = None, [], []
        original = model.generate

        def generate(*args, **kwargs):
            if self.seen is None:
                config = kwargs.get("generation_config") or model.generation_config
                self.seen = {"do_sample": config.do_sample, "temperature": config.temperature,
                             "top_k": config.top_k, "top_p": config.top_p,
                             "max_new_tokens": config.max_new_tokens,
                             "use_cache": config.use_cache, "eos_token_id": config.eos_token_id,
                             "batch_rows": int(kwargs["input_ids"].shape[0])}
            output = original(*args, **kwargs)
            sequences = output if isinstance(output, torch.Tensor) else output.sequences
            self.prompt_widths.append(int(kwargs["input_ids"].shape[1]))
            self.new_columns.append(int(sequences.shape[1]) - self.prompt_widths[-1])
            return output

        model.generate = generate

    def settings(self):
        return {**self.seen,
                "mean_prompt_width": round(statistics.mean(self.prompt_widths), 1),
                "mean_decoding_steps": round(statistics.mean(self.new_columns), 1)}


def optimizer_settings(optimizer):
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    defaults = optimizer.defaults
    return {"class": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
            "lr": defaults["lr"], "betas": list(defaults["betas"]), "eps": defaults["eps"],
            "weight_decay": sorted({group["weight_decay"] for group in optimizer.param_groups}),
            "foreach": defaults.get("foreach"), "fused": defaults.get("fused")}


def model_settings(model):
    return {"dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
            "layers_x_hidden": f"{model.config.num_hidden_layers} x {model.config.hidden_size}"}


class Timer:
    """Accumulates wall and process CPU seconds spent inside wrapped calls."""

    def __init__(self):
        self.seconds, self.cpu_seconds = 0.0, 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.cpu_seconds += time.process_time() - cpu_start
        return timed

    def take(self):
        taken = self.seconds, self.cpu_seconds
        self.seconds, self.cpu_seconds = 0.0, 0.0
        return taken


def step_row(wall, cpu, sample_timer, teacher_timer):
    """One step's phases in wall seconds, and in the process's CPU seconds as cpu_*."""
    (sampling, cpu_sampling), (teacher, cpu_teacher) = sample_timer.take(), teacher_timer.take()
    return {"total": wall, "sampling": sampling, "teacher": teacher,
            "update": wall - sampling - teacher, "cpu_total": cpu, "cpu_sampling": cpu_sampling,
            "cpu_teacher": cpu_teacher, "cpu_update": cpu - cpu_sampling - cpu_teacher}


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
    # on_policy.py's defaults: --weight-decay 0, --max-grad-norm 1.0, no gradient checkpointing
    optimizer = torch.optim.AdamW(student.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    student, optimizer = accelerator.prepare(student, optimizer)
    recorder = GenerateRecorder(accelerator.unwrap_model(student))
    sample_timer, teacher_timer = Timer(), Timer()
    timed_sampler = sample_timer.wrap(sampler)
    teacher.forward = teacher_timer.wrap(teacher.forward)
    loss_fn = make_kd_loss_fn(accelerator, teacher, len(tokenizer), "reverse")
    order = BatchOrder(len(examples), args.batch_size, seed=0)
    rows = []
    for step in range(args.steps + args.warmup):
        batch = collate([examples[i] for i in order.indices(step)], tokenizer.pad_token_id)
        start, cpu_start = time.perf_counter(), time.process_time()
        batch = timed_sampler(student, batch, step)
        backward_window(accelerator, student, [batch], loss_fn)
        accelerator.clip_grad_norm_(student.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad()
        rows.append(step_row(time.perf_counter() - start, time.process_time() - cpu_start,
                             sample_timer, teacher_timer))
    settings = {"student": model_settings(accelerator.unwrap_model(student)),
                "teacher": model_settings(teacher),
                "mixed_precision": accelerator.mixed_precision,
                "optimizer": optimizer_settings(optimizer), "max_grad_norm": MAX_GRAD_NORM,
                "lr_schedule": "constant", "batch_size": args.batch_size,
                "lmbda": gkd_args.lmbda, "divergence": f"{gkd_args.kl} KL",
                "loss_temperature": gkd_args.loss_temperature, "generation": recorder.settings(),
                "torch_threads": torch.get_num_threads()}
    return summarize(rows, args.warmup), settings


def bench_trl(setup, args):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(setup / "student")
    student = AutoModelForCausalLM.from_pretrained(setup / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(setup / "teacher", dtype=torch.float32)
    rows = [json.loads(line) for line in (setup / "train.jsonl").read_text().splitlines()]
    dataset = datasets.Dataset.from_list(rows)
    config = GKDConfig(
        output_dir=tempfile.mkdtemp(), lmbda=1.0, beta=1.0, temperature=1.0,
        max_new_tokens=args.max_new_tokens, per_device_train_batch_size=args.batch_size,
        max_steps=args.steps + args.warmup, learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM, optim="adamw_torch", bf16=False, fp16=False,
        gradient_checkpointing=False, torch_compile=False, logging_steps=10_000,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, max_length=512)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config,
                         train_dataset=dataset, processing_class=tokenizer)
    # what the comparison assumes (GKDConfig's defaults are bf16, gradient checkpointing and
    # adamw_torch_fused)
    assert not (trainer.args.bf16 or trainer.args.fp16 or trainer.args.gradient_checkpointing)
    assert trainer.args.optim == "adamw_torch" and trainer.lmbda == 1 and trainer.beta == 1
    recorder = GenerateRecorder(student)
    sample_timer, teacher_timer = Timer(), Timer()
    trainer.generate_on_policy_outputs = sample_timer.wrap(trainer.generate_on_policy_outputs)
    trainer.teacher_model.forward = teacher_timer.wrap(trainer.teacher_model.forward)
    step_rows = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            step_rows.append(step_row(time.perf_counter() - self.start,
                                      time.process_time() - self.cpu_start,
                                      sample_timer, teacher_timer))

    trainer.add_callback(StepTimes())
    trainer.train()
    settings = {"student": model_settings(trainer.accelerator.unwrap_model(trainer.model)),
                "teacher": model_settings(trainer.teacher_model),
                "mixed_precision": trainer.accelerator.mixed_precision,
                "optimizer": optimizer_settings(trainer.optimizer),
                "max_grad_norm": trainer.args.max_grad_norm,
                "lr_schedule": str(trainer.args.lr_scheduler_type.value),
                "batch_size": trainer.args.per_device_train_batch_size, "lmbda": trainer.lmbda,
                "divergence": f"generalized JSD, beta={trainer.beta} (reverse KL)",
                "loss_temperature": trainer.temperature, "generation": recorder.settings(),
                "torch_threads": torch.get_num_threads()}
    assert settings["mixed_precision"] == "no" and settings["student"]["dtype"] == "float32"
    assert not settings["student"]["gradient_checkpointing"]
    assert not settings["optimizer"]["fused"] and recorder.seen["use_cache"]
    return summarize(step_rows, args.warmup), settings


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0 = torch's default, one per core); both sides run "
                             "in this one process, so they always get the same number")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run both sides this many times, alternating which goes first; "
                             "each figure is then the median over rounds of the per-round "
                             "medians (evens out load that drifts on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from examples.tiny_setup import build

    from examples.tiny_setup import build_model
    from transformers import AutoTokenizer

    setup = build(tempfile.mkdtemp(), num_train=64, with_sentencepiece=False)
    # TRL's GKDTrainer refuses a teacher whose embedding is padded beyond the student's (this
    # suite accepts it), so both sides use an unpadded teacher of the same size here.
    tokenizer = AutoTokenizer.from_pretrained(setup / "teacher")
    build_model(tokenizer, hidden_size=64, num_layers=2, seed=1).save_pretrained(setup / "teacher")
    per_round = {"on_policy.py": [], "trl_gkd": []}
    for round_index in range(args.rounds):
        sides = [("on_policy.py", bench_ours), ("trl_gkd", bench_trl)]
        for side, bench in sides if round_index % 2 == 0 else sides[::-1]:
            result, settings = bench(setup, args)
            per_round[side].append(result)
            if side == "on_policy.py":
                ours_settings = settings
            else:
                trl_settings = settings
            print(f"round {round_index + 1}/{args.rounds} {side}: {json.dumps(result)}",
                  flush=True)
    ours, trl = ({key: round(statistics.median(r[key] for r in rows), 2) for key in rows[0]}
                 for rows in per_round.values())
    import transformers
    import trl as trl_module

    for side, settings in [("on_policy.py", ours_settings), ("trl_gkd", trl_settings)]:
        print(f"settings {side}: {json.dumps(settings)}")
    print(json.dumps({"machine": f"{os.cpu_count()}-core CPU", "torch": torch.__version__,
                      "transformers": transformers.__version__,
                      "trl": trl_module.__version__, "torch_threads": torch.get_num_threads(),
                      "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                      "batch_size": args.batch_size,
                      "max_new_tokens": args.max_new_tokens, "ms_per_step_median": {
                          "on_policy.py": ours, "trl_gkd": trl},
                      "speedup_total": round(trl["total"] / ours["total"], 2),
                      "speedup_total_per_round": [
                          round(t["total"] / o["total"], 2)
                          for o, t in zip(per_round["on_policy.py"], per_round["trl_gkd"])],
                      # each side's least disturbed round (lowest total): on a shared machine,
                      # the closest thing to an unloaded figure
                      "fastest_round": {side: min(rows, key=lambda r: r["total"])
                                        for side, rows in per_round.items()},
                      "settings": {"on_policy.py": ours_settings, "trl_gkd": trl_settings}}))


if __name__ == "__main__":
    main()
