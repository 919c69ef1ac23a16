"""Token-level (logit) knowledge distillation: the student matches the teacher's next-token
distribution at every assistant position, over the full vocabulary (Hinton et al. 2015).

    --kl forward   KL(p_teacher ‖ p_student), mode-covering: the student spreads mass over
                   everything the teacher finds plausible (default)
    --kl reverse   KL(p_student ‖ p_teacher), mode-seeking (MiniLLM): the student concentrates on
                   the teacher's main modes
    --kl jsd       generalized Jensen-Shannon with --beta (GKD)
    --kl skew_forward, skew_reverse
                   DistiLLM's skew KL with --skew: bounded where the teacher gives a token ~0

Loss per supervised token = (1 - alpha) * T² * divergence(T) + alpha * cross-entropy on the data.
Teacher and student must share a tokenizer (use cross_tokenizer.py otherwise); a teacher whose
embedding matrix is padded beyond the tokenizer is fine: only real token ids are compared.

The teacher may run on an inference server instead (--teacher-api-base, vLLM's OpenAI-compatible
API; see docs/token_level.md): it returns its top --teacher-top-k log-probs per position and
the loss is forward KL over those K tokens plus one tail bucket, the offline teacher cache's loss.

Examples:
    python token_level.py --teacher Qwen/Qwen2.5-1.5B-Instruct --student Qwen/Qwen2.5-0.5B \
        --dataset train.jsonl --output-dir runs/kd --kl forward --loss-temperature 2.0 \
        --batch-size 4 --grad-accum 8 --max-length 1024 --num-epochs 1

    accelerate launch --num_processes 4 token_level.py --teacher ... --student ... \
        --dataset train.jsonl --output-dir runs/kd --mixed-precision bf16

    # the teacher on a vLLM server (vllm serve Qwen/Qwen2.5-7B-Instruct --max-logprobs 20), the key
    # (if the server wants one) in $OPENAI_API_KEY
    python token_level.py --teacher-api-base http://localhost:8000/v1 \
        --teacher-api-model Qwen/Qwen2.5-7B-Instruct --teacher-top-k 20 \
        --student Qwen/Qwen2.5-0.5B --dataset train.jsonl --output-dir runs/kd-served

    # ... or fill an offline cache from the server once (resumable); later runs need no teacher
    python token_level.py --teacher-api-base http://localhost:8000/v1 \
        --teacher-api-model Qwen/Qwen2.5-7B-Instruct --teacher-top-k 20 --teacher-cache cache/ \
        --student Qwen/Qwen2.5-0.5B --dataset train.jsonl --output-dir runs/kd-cached
    python token_level.py --teacher-cache cache/ --student Qwen/Qwen2.5-0.5B \
        --dataset train.jsonl --output-dir runs/kd-cached-2

    # offline, on tiny local models (see examples/tiny_setup.py):
    python token_level.py --teacher runs/tiny/teacher --student runs/tiny/student \
        --dataset runs/tiny/train.jsonl --output-dir runs/tiny/kd --max-steps 12 --kl reverse
"""

import sys
from dataclasses import dataclass
from typing import Literal

from common.api_client import redacted_args, redacted_command
from common.args import (DataArguments, KDArguments, ModelArguments, TrainingArguments,
                         parse_args, require_flags, shared_field, teacher_is_served)
from common import teacher_cache
from common.chat import ChatEncoder, collate, encode_datasets, num_supervised_tokens
from common.checkpoint import (check_output_dir, finish_run, make_run_config,
                               prepare_output_dir)
from common.distill import make_ce_loss_fn, make_kd_loss_fn
from common.errors import UserError, run_cli
from common.lora import LoraArguments, load_trainable_student
from common.models import check_vocab_fits, freeze, load_model, load_tokenizer, real_vocab_size
from common.sharding import prepare_teacher


@dataclass
class TokenLevelArguments(KDArguments):
    RENAMED_FLAGS = {"temperature": "loss_temperature"}  # old spelling, hidden, for one release
    # The server options (--teacher-api-base, ...) and the divergence's (--beta, --teacher-cache,
    # ...) come first, from common/args.py's KDArguments.
    kl: Literal["forward", "reverse", "jsd", "skew_forward", "skew_reverse"] = shared_field(
        "kl", default="forward")
    alpha: float = shared_field("alpha", default=0.0)

    def __post_init__(self):
        super().__post_init__()  # KDArguments: the divergence's checks and the shared ones
        if self.teacher_api_base:
            if self.kl != "forward":
                raise UserError("--teacher-api-base supports --kl forward only: the server returns "
                                "the teacher's top K per position, which defines forward KL only")
            if (self.teacher_cache and self.cache_top_k is not None
                    and self.cache_top_k != self.teacher_top_k):
                raise UserError(f"--cache-top-k {self.cache_top_k} and --teacher-top-k "
                                f"{self.teacher_top_k} differ: a cache filled from "
                                f"--teacher-api-base keeps the server's top K; drop --cache-top-k "
                                f"and set --teacher-top-k to the K wanted")


# What the command line parses into, in main's order (tests/test_flags.py builds every
# script's parser from these).
ARGUMENT_GROUPS = (ModelArguments, DataArguments, TrainingArguments, TokenLevelArguments,
                   LoraArguments)


def main(argv=None):
    from accelerate.utils import set_seed

    from common.train import Method, make_accelerator, train

    model_args, data_args, train_args, kd_args, lora_args = parse_args(
        ARGUMENT_GROUPS, argv, description=__doc__.split("\n\n")[0])
    cached_meta = teacher_cache.read_meta(kd_args.teacher_cache) if kd_args.teacher_cache else None
    served = teacher_is_served(model_args, kd_args)
    use_cache_only = (bool(cached_meta and cached_meta.get("complete")) and not model_args.teacher
                      and not served)
    require_flags(("--teacher", model_args.teacher or use_cache_only or served),
                  ("--student", model_args.student), ("--dataset", data_args.dataset))
    check_output_dir(train_args.output_dir, train_args.resume, train_args.overwrite)

    server = None
    if use_cache_only:  # no teacher at all: the cache brings the template it was made with
        tokenizer = load_tokenizer(model_args.student, model_args.trust_remote_code, "student")
        tokenizer.chat_template = cached_meta.get("chat_template_text") or tokenizer.chat_template
    else:
        from common.server_teacher import same_vocabulary_tokenizer

        tokenizer, server = same_vocabulary_tokenizer(model_args, kd_args)

    accelerator = make_accelerator(train_args)
    set_seed(train_args.seed)
    encoder = ChatEncoder(tokenizer, data_args.max_length)
    examples, eval_examples = encode_datasets(accelerator, encoder, data_args, train_args)
    accelerator.print(f"{len(examples)} training conversations, "
                      f"{num_supervised_tokens(examples)} "
                      f"supervised tokens")

    vocab_size = real_vocab_size(tokenizer)

    def load_teacher():
        teacher = freeze(load_model(model_args.teacher, model_args.dtype,
                                    model_args.trust_remote_code, "teacher"))
        check_vocab_fits(teacher, tokenizer, "teacher")
        return prepare_teacher(accelerator, teacher)  # sharded under FSDP / ZeRO-3

    collate_fn, eval_loss_fn, eval_collate_fn = None, None, None
    if kd_args.teacher_cache:  # filled from the local teacher or from the server
        if served:
            cache_top_k = kd_args.teacher_top_k  # the server's K (within its max: server.check)
        else:
            cache_top_k = teacher_cache.top_k_to_keep(kd_args.cache_top_k, kd_args.teacher_cache)
        cache = teacher_cache.prepare(
            kd_args.teacher_cache, examples, tokenizer, model_args.teacher, data_args,
            cache_top_k, kd_args.loss_temperature, accelerator, load_teacher,
            train_args.batch_size, server=server)
        collate_fn = cache.collate_fn(collate)
        loss_fn = teacher_cache.make_cached_loss_fn(accelerator, vocab_size,
                                                     kd_args.loss_temperature, kd_args.alpha,
                                                     kd_args.loss_chunk_size)
        # The cache has no rows for held-out data: those are scored by cross-entropy alone.
        eval_loss_fn = make_ce_loss_fn(accelerator, vocab_size, kd_args.loss_chunk_size)
        eval_collate_fn = collate
    elif served:  # held-out data is scored against the served teacher too
        from common.server_teacher import make_server_loss_fn

        loss_fn = make_server_loss_fn(accelerator, server, vocab_size, kd_args.alpha,
                                      kd_args.loss_chunk_size)
    else:
        loss_fn = make_kd_loss_fn(accelerator, load_teacher(), vocab_size, kd_args.kl,
                                  kd_args.loss_temperature, kd_args.beta, kd_args.alpha,
                                  loss_chunk_size=kd_args.loss_chunk_size, skew=kd_args.skew)
    student = load_trainable_student(accelerator, model_args, train_args, lora_args, tokenizer)

    output_dir = prepare_output_dir(accelerator, train_args.output_dir, train_args.overwrite)
    run_config = make_run_config("token_level", redacted_command(sys.argv, kd_args),
                                 model=model_args, data=data_args, training=train_args,
                                 token_level=redacted_args(kd_args), lora=lora_args)
    method = Method(loss_fn, collate=collate_fn or collate, eval_loss=eval_loss_fn,
                    eval_collate=eval_collate_fn)
    student, state = train(accelerator, student, examples, train_args, method,
                           tokenizer.pad_token_id, run_config, eval_examples=eval_examples)
    finish_run(accelerator, student, tokenizer, output_dir, run_config, state,
               end_of_turn_id=encoder.end_of_turn_token_id)


if __name__ == "__main__":
    run_cli(main)
