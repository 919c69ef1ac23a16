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

import math
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

from common.api_client import TeacherApiArguments, redacted_args, redacted_command
from common.args import (DataArguments, ModelArguments, TrainingArguments, parse_args,
                         require_flags, teacher_is_served)
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
class TokenLevelArguments(TeacherApiArguments):
    RENAMED_FLAGS = {"temperature": "loss_temperature"}  # old spelling, hidden, for one release
    # The server options (--teacher-api-base, --api-key-env, ...) come first, from common/api_client.
    kl: Literal["forward", "reverse", "jsd", "skew_forward", "skew_reverse"] = field(
        default="forward", metadata={
            "help": "Divergence: forward = KL(teacher‖student), mode-covering; reverse = "
                "KL(student‖teacher), mode-seeking; jsd = generalized JSD weighted by --beta; "
                "skew_forward / skew_reverse = DistiLLM's skew KL with --skew: the second "
                "distribution is mixed with --skew of the first, which bounds the loss where the "
                "teacher gives a token ~0."})
    beta: float = field(default=0.5, metadata={
        "help": "JSD mixture weight in (0, 1), with --kl jsd only: m = beta*p_teacher + "
                "(1-beta)*p_student; 0.5 is the symmetric JSD."})
    skew: float = field(default=0.1, metadata={
        "help": "Skew in (0, 1), with --kl skew_forward / skew_reverse only: skew_forward = "
                "KL(p_t ‖ skew*p_t + (1-skew)*p_s), skew_reverse = KL(p_s ‖ skew*p_s + "
                "(1-skew)*p_t); each token's log-ratio is at most log(1/skew). 0.1 is DistiLLM's."})
    loss_temperature: float = field(default=1.0, metadata={
        "help": "Softmax temperature T of both models inside the loss; the divergence is scaled "
                "by T²."})
    alpha: float = field(default=0.0, metadata={
        "help": "Weight of ordinary cross-entropy on the dataset's assistant tokens, in [0, 1]: "
                "loss = (1-alpha)*KD + alpha*CE (0 = pure distillation)."})
    teacher_cache: Optional[str] = field(default=None, metadata={
        "help": "Directory of an offline teacher cache: built on the first run (needs "
                "--teacher, or --teacher-api-base to fill it from the server), then read instead "
                "of asking any teacher. Forward KL only."})
    cache_top_k: Optional[int] = field(default=None, metadata={
        "help": "Teacher tokens kept per position in --teacher-cache (plus one tail bucket); "
                "about 6 bytes each. Unset: the existing cache's K, else 32 for a build with "
                "--teacher; a cache filled from --teacher-api-base keeps --teacher-top-k (another "
                "--cache-top-k is refused)."})
    teacher_top_k: int = field(default=20, metadata={
        "help": "With --teacher-api-base: teacher log-probs per position asked of the server (at "
                "most its own maximum, vLLM's --max-logprobs, default 20). The loss is forward KL "
                "over these K tokens plus one bucket for the rest: biased low against the full "
                "forward KL (the rest is compared as one lump), exact when K covers the "
                "vocabulary."})
    loss_chunk_size: int = field(default=0, metadata={
        "help": "Supervised positions per chunk of the memory-bounded loss: both output layers "
                "and the divergence run on this many positions at a time, so about one chunk of "
                "logits (4 bytes x vocabulary per position in float32) is alive at once. "
                "0 = automatic, ~128 MiB of float32 logits per chunk (256 positions at a 128K "
                "vocabulary); -1 = no chunking: full logits at every position."})

    def __post_init__(self):
        super().__post_init__()
        if not (math.isfinite(self.loss_temperature) and self.loss_temperature > 0):
            raise UserError(f"--loss-temperature must be > 0 and finite, got "
                            f"{self.loss_temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.teacher_cache and self.kl != "forward":
            raise UserError("--teacher-cache supports --kl forward only: reverse KL and JSD need "
                            "the teacher's probability of every token, the cache keeps its top K")
        if self.teacher_api_base:
            if self.kl != "forward":
                raise UserError("--teacher-api-base supports --kl forward only: the server returns "
                                "the teacher's top K per position, which defines forward KL only")
            if self.loss_temperature != 1.0:
                raise UserError("--teacher-api-base needs --loss-temperature 1: the server's "
                                "log-probs are at temperature 1, and a top K cannot be re-tempered "
                                "without the rest of the distribution")
            if (self.teacher_cache and self.cache_top_k is not None
                    and self.cache_top_k != self.teacher_top_k):
                raise UserError(f"--cache-top-k {self.cache_top_k} and --teacher-top-k "
                                f"{self.teacher_top_k} differ: a cache filled from "
                                f"--teacher-api-base keeps the server's top K; drop --cache-top-k "
                                f"and set --teacher-top-k to the K wanted")
        if self.teacher_top_k < 1:
            raise UserError(f"--teacher-top-k must be >= 1, got {self.teacher_top_k}")
        if self.cache_top_k is not None and self.cache_top_k < 1:
            raise UserError(f"--cache-top-k must be >= 1, got {self.cache_top_k}")
        if self.loss_chunk_size < -1:
            raise UserError(f"--loss-chunk-size must be a number of positions >= 1, 0 "
                            f"(automatic) or -1 (no chunking), got {self.loss_chunk_size}")
        if self.kl == "jsd" and not 0.0 < self.beta < 1.0:
            raise UserError(f"--beta must be strictly between 0 and 1 for --kl jsd, got "
                            f"{self.beta}; use --kl forward or --kl reverse for the end points")
        if self.kl.startswith("skew") and not 0.0 < self.skew < 1.0:
            raise UserError(f"--skew must be strictly between 0 and 1 for --kl {self.kl}, got "
                            f"{self.skew}; use --kl forward or --kl reverse for skew 0")


def main(argv=None):
    from accelerate.utils import set_seed

    from common.train import make_accelerator, train

    model_args, data_args, train_args, kd_args, lora_args = parse_args(
        (ModelArguments, DataArguments, TrainingArguments, TokenLevelArguments, LoraArguments),
        argv,
        description=__doc__.split("\n\n")[0])
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
        elif kd_args.cache_top_k is not None:
            cache_top_k = kd_args.cache_top_k
        else:
            cache_top_k = (cached_meta or {}).get("identity", {}).get("top_k", 32)
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
    student, state = train(accelerator, student, examples, train_args, loss_fn,
                           tokenizer.pad_token_id, run_config, collate_fn=collate_fn,
                           eval_examples=eval_examples, eval_loss_fn=eval_loss_fn,
                           eval_collate_fn=eval_collate_fn)
    finish_run(accelerator, student, tokenizer, output_dir, run_config, state,
               end_of_turn_id=encoder.end_of_turn_token_id)


if __name__ == "__main__":
    run_cli(main)
