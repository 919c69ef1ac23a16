"""On-policy distillation (GKD, Agarwal et al. 2024): the student samples continuations of the
prompts, the teacher scores every position of those samples, and the student matches the teacher
on its own prefixes, so it learns to recover from the kind of text it actually produces. On-policy
steps are mixed with ordinary off-policy steps (token-level KD on the dataset's replies, or on a
sequence-level teacher cache with --completions) for stability: early samples are gibberish.

Each optimizer step is on-policy with probability --lmbda, drawn from (seed, step) alone, so every
micro-batch and every process takes the same draw and a resumed run draws the same. Loss: reverse
KL at T=1 by default (MiniLLM / GKD), normalized by the number of sampled tokens counted after
sampling, over the whole accumulation window.

The teacher may run on an inference server (--teacher-api-base, vLLM; docs/token_level.md).
It then returns log-probs, not logits: --kl sampled_reverse scores on-policy samples with the
teacher's log-prob of each sampled token only (an unbiased, noisy reverse-KL estimator, as in
Thinking Machines' on-policy distillation), and off-policy steps use forward KL over the
teacher's top --teacher-top-k plus a tail bucket; --kl forward uses the top-K forward KL on both.

Examples:
    python on_policy.py --teacher Qwen/Qwen2.5-1.5B-Instruct --student Qwen/Qwen2.5-0.5B-Instruct \
        --dataset train.jsonl --output-dir runs/gkd --lmbda 0.5 --max-new-tokens 256 \
        --batch-size 8 --grad-accum 4 --max-steps 1000

    accelerate launch --num_processes 4 on_policy.py --teacher ... --student ... \
        --dataset train.jsonl --output-dir runs/gkd --mixed-precision bf16

    # offline, tiny local models (examples/tiny_setup.py)
    python on_policy.py --teacher runs/tiny/teacher --student runs/tiny/student \
        --dataset runs/tiny/train.jsonl --lmbda 1.0 --max-new-tokens 12 --max-steps 8 \
        --output-dir runs/tiny/gkd

    # the teacher on a vLLM server: sampled reverse KL on-policy, top-K forward KL off-policy
    python on_policy.py --teacher-api-base http://localhost:8000/v1 \
        --teacher-api-model Qwen/Qwen2.5-7B-Instruct --kl sampled_reverse \
        --student Qwen/Qwen2.5-0.5B-Instruct --dataset train.jsonl --output-dir runs/gkd-served

    # off-policy steps read an offline teacher cache (built on the first run, shareable with
    # token_level.py runs over the same data); on-policy steps still run the teacher
    python on_policy.py --teacher ... --student ... --dataset train.jsonl --kl forward \
        --teacher-cache runs/cache --output-dir runs/gkd-cached
"""

import dataclasses
import math
import random
import sys

import torch
from dataclasses import dataclass, field
from typing import Literal, Optional

from common.api_client import TeacherApiArguments, redacted_args, redacted_command
from common.args import (DataArguments, ModelArguments, TrainingArguments, parse_args,
                         require_flags, teacher_is_served)
from common.chat import IGNORE_INDEX, ChatEncoder, collate, encode_datasets
from common import teacher_cache
from common.checkpoint import (check_output_dir, finish_run, make_run_config,
                               prepare_output_dir)
from common.distill import make_kd_loss_fn
from common.errors import UserError, run_cli
from common.lora import LoraArguments, load_trainable_student
from common.models import check_vocab_fits, freeze, load_model, real_vocab_size
from common.sharding import full_params_for_generation, prepare_teacher


@dataclass
class OnPolicyArguments(TeacherApiArguments):
    RENAMED_FLAGS = {"temperature": "sampling_temperature"}  # old spelling, hidden, one release
    # The server options (--teacher-api-base, --api-key-env, ...) come first, from common/api_client.
    lmbda: float = field(default=0.5, metadata={
        "help": "Probability that an optimizer step is on-policy (student samples); the rest are "
                "off-policy steps on the dataset replies. 1 = always on-policy."})
    kl: Literal["forward", "reverse", "jsd", "skew_forward", "skew_reverse",
                "sampled_reverse"] = field(
        default="reverse", metadata={
        "help": "Divergence: reverse = KL(student‖teacher) (default, GKD/MiniLLM), forward = "
                "KL(teacher‖student), jsd = generalized JSD with --beta, skew_forward / "
                "skew_reverse = DistiLLM's skew KL with --skew (bounded where the teacher gives "
                "a token ~0). With --teacher-api-base: forward = forward KL over the teacher's "
                "top --teacher-top-k plus a tail bucket (biased low: the rest is one lump), or "
                "sampled_reverse = on on-policy steps, per sampled token x, advantage = log "
                "p_teacher(x) - log p_student(x) (detached) and loss = -advantage * log "
                "p_student(x): its expected gradient is the reverse KL's (unbiased) but from one "
                "sample per position (noisy), and its logged loss is not the KL (kd is the "
                "sampled KL estimate); off-policy steps (dataset replies, not student samples) "
                "then use the top-K forward KL."})
    beta: float = field(default=0.5, metadata={
        "help": "JSD mixture weight in (0, 1), with --kl jsd only."})
    skew: float = field(default=0.1, metadata={
        "help": "Skew in (0, 1), with --kl skew_forward / skew_reverse only: skew_reverse = "
                "KL(p_s ‖ skew*p_s + (1-skew)*p_t). 0.1 is DistiLLM's."})
    sampling_temperature: float = field(default=1.0, metadata={
        "help": "Sampling temperature of the student's on-policy samples."})
    loss_temperature: float = field(default=1.0, metadata={
        "help": "Softmax temperature inside the loss (the divergence is scaled by T²)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    max_new_tokens: int = field(default=128, metadata={
        "help": "Longest on-policy sample per prompt."})
    completions: Optional[str] = field(default=None, metadata={
        "help": "Teacher-written completions (a sequence_level.py cache) for the off-policy "
                "steps instead of the dataset's replies (GKD's sequence-level mode)."})
    teacher_cache: Optional[str] = field(default=None, metadata={
        "help": "Directory of an offline teacher cache (token_level.py's format, built here on "
                "the first run) read by the off-policy steps instead of running the teacher; "
                "on-policy steps still score their samples with the live teacher. Needs --kl "
                "forward."})
    cache_top_k: int = field(default=32, metadata={
        "help": "Teacher tokens kept per position in --teacher-cache (plus one tail bucket)."})
    teacher_top_k: int = field(default=20, metadata={
        "help": "With --teacher-api-base: teacher log-probs per position asked of the server for "
                "the top-K forward KL (at most its own maximum, vLLM's --max-logprobs, default "
                "20)."})
    loss_chunk_size: int = field(default=0, metadata={
        "help": "Supervised positions per chunk of the memory-bounded loss: both output layers "
                "and the divergence run on this many positions at a time, so about one chunk of "
                "logits (4 bytes x vocabulary per position in float32) is alive at once. "
                "0 = automatic, ~128 MiB of float32 logits per chunk (256 positions at a 128K "
                "vocabulary); -1 = no chunking: full logits at every position."})

    def __post_init__(self):
        super().__post_init__()
        served = bool(self.teacher_api_base)
        checks = [
            (self.kl != "sampled_reverse" or served,
             "--kl sampled_reverse is for a teacher on a server (--teacher-api-base), which "
             "returns log-probs of sampled tokens; with a local teacher use --kl reverse, the exact "
             "reverse KL"),
            (not served or self.kl in ("forward", "sampled_reverse"),
             f"--teacher-api-base supports --kl forward (top-K) or sampled_reverse, not "
             f"{self.kl}: the server returns log-probs of its top K and of the sampled tokens, "
             f"not every token's"),
            (not served or self.loss_temperature == 1.0,
             "--teacher-api-base needs --loss-temperature 1: the server's log-probs are at "
             "temperature 1, and a top K cannot be re-tempered without the rest"),
            (not (served and self.teacher_cache),
             "--teacher-cache cannot be filled from --teacher-api-base yet; build it with a local "
             "--teacher"),
            (self.teacher_top_k >= 1, f"--teacher-top-k must be >= 1, got {self.teacher_top_k}"),
            (0.0 <= self.lmbda <= 1.0, f"--lmbda must be in [0, 1], got {self.lmbda}"),
            (math.isfinite(self.sampling_temperature) and self.sampling_temperature > 0,
             f"--sampling-temperature must be > 0 and finite, got {self.sampling_temperature}"),
            (math.isfinite(self.loss_temperature) and self.loss_temperature > 0,
             f"--loss-temperature must be > 0 and finite, got {self.loss_temperature}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}"),
            (self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"),
            (self.kl != "jsd" or 0 < self.beta < 1,
             f"--beta must be strictly between 0 and 1 for --kl jsd, got {self.beta}"),
            (not self.kl.startswith("skew") or 0 < self.skew < 1,
             f"--skew must be strictly between 0 and 1 for --kl {self.kl}, got {self.skew}"),
            (not self.teacher_cache or self.kl == "forward",
             "--teacher-cache needs --kl forward: the cache keeps the teacher's top K per "
             "position, which defines forward KL only (reverse KL and JSD need every token)"),
            (self.cache_top_k >= 1, f"--cache-top-k must be >= 1, got {self.cache_top_k}"),
            (self.loss_chunk_size >= -1,
             f"--loss-chunk-size must be a number of positions >= 1, 0 (automatic) or -1 (no "
             f"chunking), got {self.loss_chunk_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def is_on_policy_step(seed, step, lmbda):
    """The step's draw, from (seed, step) alone: same on every process, micro-batch and resume."""
    return random.Random(seed * 1_000_003 + step).random() < lmbda


def last_reply_start(labels):
    """Index of the first token of the last supervised run (the last assistant reply)."""
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    start = supervised[-1]
    while start - 1 >= 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


class OnPolicySampler:
    """prepare_fn for the shared loop: on on-policy steps, replace the batch by student samples.

    The new batch is prompt + sample, with labels on exactly the sampled tokens (and the end-of-turn
    token where the sample reached it); nothing after the first end of turn is kept.
    """

    def __init__(self, accelerator, tokenizer, stop_ids, end_of_turn_id, args, seed):
        self.accelerator, self.tokenizer, self.args, self.seed = accelerator, tokenizer, args, seed
        self.stop_ids, self.end_of_turn_id = stop_ids, end_of_turn_id
        self.stats = {}

    def __call__(self, model, batch, step):
        from common.generation import generate

        on_policy = is_on_policy_step(self.seed, step, self.args.lmbda)
        stats = self.stats.setdefault(step, {"on_policy": on_policy, "lengths": [], "stopped": 0})
        if not on_policy:
            return batch
        prompts = []
        for input_ids, attention_mask, labels in zip(batch["input_ids"].tolist(),
                                                     batch["attention_mask"].tolist(),
                                                     batch["labels"].tolist()):
            length = sum(attention_mask)
            prompts.append(input_ids[:last_reply_start(labels[:length])])
        # Under FSDP / ZeRO-3 the sharded weights are gathered and all processes step together.
        with full_params_for_generation(self.accelerator, model) as (student, synced_gpus):
            completions = generate(student, self.tokenizer, prompts, self.args.max_new_tokens,
                                   self.stop_ids, self.args.sampling_temperature, self.args.top_p,
                                   batch_size=len(prompts), progress=False,
                                   synced_gpus=synced_gpus)
        examples = []
        for prompt, completion in zip(prompts, completions):
            sampled = completion.token_ids + (
                [self.end_of_turn_id] if completion.finish_reason == "stop" else [])
            examples.append({"input_ids": prompt + sampled,
                             "labels": [IGNORE_INDEX] * len(prompt) + sampled})
            stats["lengths"].append(len(sampled))
            stats["stopped"] += completion.finish_reason == "stop"
        device = batch["input_ids"].device
        sampled = collate(examples, self.tokenizer.pad_token_id)
        sampled["on_policy"] = torch.ones(len(examples))  # the student's own samples
        return {name: tensor.to(device) for name, tensor in sampled.items()}

    def step_metrics(self, step):
        stats = self.stats.pop(step, None)
        for old in [s for s in self.stats if s < step]:
            del self.stats[old]
        if stats is None:
            return {}
        row = {"on_policy": stats["on_policy"]}
        if stats["on_policy"] and stats["lengths"]:
            row["sampled_length"] = round(sum(stats["lengths"]) / len(stats["lengths"]), 3)
            row["reached_end_of_turn"] = round(stats["stopped"] / len(stats["lengths"]), 3)
        return row


def main(argv=None):
    from accelerate.utils import set_seed

    from common.train import make_accelerator, train

    model_args, data_args, train_args, gkd_args, lora_args = parse_args(
        (ModelArguments, DataArguments, TrainingArguments, OnPolicyArguments, LoraArguments),
        argv, description=__doc__.split("\n\n")[0])
    held_out_data_args = data_args  # --eval-dataset keeps the user's column names
    if gkd_args.completions:
        data_args = dataclasses.replace(data_args, dataset=gkd_args.completions,
                                        messages_field="messages")
    served = teacher_is_served(model_args, gkd_args)
    require_flags(("--teacher", model_args.teacher or served), ("--student", model_args.student),
                  ("--dataset", data_args.dataset))
    check_output_dir(train_args.output_dir, train_args.resume, train_args.overwrite)

    from common.server_teacher import same_vocabulary_tokenizer

    tokenizer, server = same_vocabulary_tokenizer(model_args, gkd_args)

    accelerator = make_accelerator(train_args)
    set_seed(train_args.seed)
    encoder = ChatEncoder(tokenizer, data_args.max_length)
    examples, eval_examples = encode_datasets(accelerator, encoder, data_args, train_args,
                                              held_out_data_args)

    student = load_trainable_student(accelerator, model_args, train_args, lora_args, tokenizer)
    vocab_size = real_vocab_size(tokenizer)
    if served:  # held-out data is scored with the top-K forward KL
        from common.server_teacher import make_server_on_policy_loss_fn

        loss_fn = make_server_on_policy_loss_fn(accelerator, server, vocab_size, gkd_args.kl,
                                                gkd_args.loss_chunk_size)
    else:
        teacher = freeze(load_model(model_args.teacher, model_args.dtype,
                                    model_args.trust_remote_code, "teacher"))
        check_vocab_fits(teacher, tokenizer, "teacher")
        teacher = prepare_teacher(accelerator, teacher)  # sharded under FSDP / ZeRO-3
        loss_fn = make_kd_loss_fn(accelerator, teacher, vocab_size, gkd_args.kl,
                                  gkd_args.loss_temperature, gkd_args.beta,
                                  loss_chunk_size=gkd_args.loss_chunk_size, skew=gkd_args.skew)
    collate_fn, live_loss_fn = None, loss_fn
    if gkd_args.teacher_cache and gkd_args.lmbda == 1.0:
        accelerator.print("note: --lmbda 1 has no off-policy steps: --teacher-cache is not used "
                          "(nor built)")
    elif gkd_args.teacher_cache:
        cache = teacher_cache.prepare(
            gkd_args.teacher_cache, examples, tokenizer, model_args.teacher, data_args,
            gkd_args.cache_top_k, gkd_args.loss_temperature, accelerator, lambda: teacher,
            train_args.batch_size, reuse_note="off-policy steps read it, on-policy steps run the "
                                              "teacher")
        collate_fn = cache.collate_fn(collate)
        cached_loss_fn = teacher_cache.make_cached_loss_fn(
            accelerator, vocab_size, gkd_args.loss_temperature,
            loss_chunk_size=gkd_args.loss_chunk_size)

        def loss_fn(student, batch):
            # Off-policy batches come from the dataset with their teacher rows; the sampler's
            # on-policy batches are new text the cache cannot know, scored by the live teacher.
            return (cached_loss_fn if "teacher_ids" in batch else live_loss_fn)(student, batch)

    output_dir = prepare_output_dir(accelerator, train_args.output_dir, train_args.overwrite)
    run_config = make_run_config("on_policy", redacted_command(sys.argv, gkd_args),
                                 model=model_args, data=data_args, training=train_args,
                                 on_policy=redacted_args(gkd_args), lora=lora_args)
    stop_ids = {encoder.end_of_turn_token_id, tokenizer.eos_token_id}
    sampler = OnPolicySampler(accelerator, tokenizer, stop_ids, encoder.end_of_turn_token_id,
                              gkd_args, train_args.seed)
    # Held-out data is scored off-policy (the teacher on its replies), with the live teacher.
    student, state = train(accelerator, student, examples, train_args, loss_fn,
                           tokenizer.pad_token_id, run_config, prepare_fn=sampler,
                           collate_fn=collate_fn, step_metrics=sampler.step_metrics,
                           eval_examples=eval_examples, eval_loss_fn=live_loss_fn,
                           eval_collate_fn=collate)
    finish_run(accelerator, student, tokenizer, output_dir, run_config, state,
               end_of_turn_id=encoder.end_of_turn_token_id)


if __name__ == "__main__":
    run_cli(main)
