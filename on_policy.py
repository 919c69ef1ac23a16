"""On-policy distillation (GKD, Agarwal et al. 2024): the student samples continuations of the
prompts, the teacher scores every position of those samples, and the student matches the teacher
on its own prefixes, so it learns to recover from the kind of text it actually produces. On-policy
steps are mixed with ordinary off-policy steps (token-level KD on the dataset's replies, or on a
sequence-level teacher cache with --completions) for stability: early samples are gibberish.

Each optimizer step is on-policy with probability --lmbda, drawn from (seed, step) alone, so every
micro-batch and every process takes the same draw and a resumed run draws the same. Loss: forward
KL at T=1 by default (GKD's supervised divergence on the student's samples; --kl reverse is
MiniLLM's), normalized by the number of sampled tokens counted after sampling, over the whole
accumulation window. Forward is the default because it won every measurement here
(docs/on_policy.md#which-divergence).

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
    python on_policy.py --teacher ... --student ... --dataset train.jsonl \
        --teacher-cache runs/cache --output-dir runs/gkd-cached
"""

import dataclasses
import math
import random
import sys

import torch
from dataclasses import dataclass, field
from typing import Literal, Optional

from common.api_client import redacted_args, redacted_command
from common.args import (DataArguments, KDArguments, ModelArguments, TrainingArguments,
                         parse_args, require_flags, shared_field, teacher_is_served)
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
class OnPolicyArguments(KDArguments):
    RENAMED_FLAGS = {"temperature": "sampling_temperature"}  # old spelling, hidden, one release
    # The server options (--teacher-api-base, ...) and the divergence's (--beta, --teacher-cache,
    # ...) come first, from common/args.py's KDArguments.
    kl: Literal["forward", "reverse", "jsd", "skew_forward", "skew_reverse",
                "sampled_reverse"] = shared_field("kl", default="forward")
    lmbda: float = field(default=0.5, metadata={
        "help": "Probability that an optimizer step is on-policy (student samples); the rest are "
                "off-policy steps on the dataset replies. 1 = always on-policy."})
    sampling_temperature: float = shared_field("sampling_temperature", default=1.0)
    top_p: float = shared_field("top_p", default=1.0)
    max_new_tokens: int = shared_field("max_new_tokens", default=128)
    completions: Optional[str] = shared_field("completions", default=None)

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
            (not (served and self.teacher_cache),
             "--teacher-cache cannot be filled from --teacher-api-base yet; build it with a local "
             "--teacher"),
            (0.0 <= self.lmbda <= 1.0, f"--lmbda must be in [0, 1], got {self.lmbda}"),
            (math.isfinite(self.sampling_temperature) and self.sampling_temperature > 0,
             f"--sampling-temperature must be > 0 and finite, got {self.sampling_temperature}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}"),
            (self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"),
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


# What the command line parses into, in main's order (tests/test_flags.py builds every
# script's parser from these).
ARGUMENT_GROUPS = (ModelArguments, DataArguments, TrainingArguments, OnPolicyArguments,
                   LoraArguments)


def main(argv=None):
    from accelerate.utils import set_seed

    from common.train import Method, make_accelerator, train

    model_args, data_args, train_args, gkd_args, lora_args = parse_args(
        ARGUMENT_GROUPS, argv, description=__doc__.split("\n\n")[0])
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
    # The K a cache holds or would be built with, not "unset": run_config records what ran, and
    # a resume compares it (runs without a cache have always recorded the default, 32).
    gkd_args.cache_top_k = (
        teacher_cache.top_k_to_keep(gkd_args.cache_top_k, gkd_args.teacher_cache)
        if gkd_args.teacher_cache else gkd_args.cache_top_k or teacher_cache.DEFAULT_TOP_K)
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
    method = Method(loss_fn, collate=collate_fn or collate, prepare=sampler,
                    step_metrics=sampler.step_metrics, eval_loss=live_loss_fn,
                    eval_collate=collate)
    student, state = train(accelerator, student, examples, train_args, method,
                           tokenizer.pad_token_id, run_config, eval_examples=eval_examples)
    finish_run(accelerator, student, tokenizer, output_dir, run_config, state,
               end_of_turn_id=encoder.end_of_turn_token_id)


if __name__ == "__main__":
    run_cli(main)
