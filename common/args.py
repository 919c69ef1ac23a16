"""Option groups shared by the scripts, as dataclasses parsed by `transformers.HfArgumentParser`.

Every field's help string shows in `--help`; `__post_init__` rejects bad values with a sentence the
user can act on. Each script adds one dataclass of its own method's options.

Every script also takes `--config FILE.yaml`: a mapping of flag names (learning_rate or
learning-rate) to values, which flags on the command line override. A finished run's settings
become such a file with

    python -m common.args runs/kd/run_config.json > recipe.yaml
"""

import argparse
import difflib
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

from transformers import HfArgumentParser

from common.api_client import TeacherApiArguments
from common.chat import read_chat_template
from common.errors import UserError

# The help text of every flag that more than one script defines, one per name: a flag name means
# one thing in every script (tests/test_flags.py checks each script's --help). Types and defaults
# stay with each script's dataclass field (shared_field); a text names a script only where the
# flag does something there that it does not do elsewhere.
SHARED_HELP = {
    # models
    "teacher": "Teacher: a local model directory or a Hugging Face Hub id. eval.py scores it in "
               "its own row and gives every model with the same tokenizer kl_to_teacher and "
               "top1_agreement.",
    "dtype": "Weight dtype for loading the models ('auto' = as stored in the checkpoint, but a "
             "training script's student loads in float32: see --student-dtype). For bf16 compute "
             "keep the student's weights float32 and pass --mixed-precision bf16; eval.py "
             "computes its metrics in float32 either way.",
    "trust_remote_code": "Allow models/tokenizers that ship their own Python code. Off by "
                         "default: only enable it for repositories you trust.",
    "chat_template": "Jinja chat template file for every model (teacher, student, eval.py's "
                     "--models) whose tokenizer has none (a base model, a GGUF conversion). "
                     "Default: the generic <|user|>/<|assistant|> template of "
                     "docs/data_and_masking.md, with a warning.",
    # data
    "dataset": "Conversations (training data; eval.py's held-out data): a local "
               ".jsonl/.json/.parquet/.csv file or a Hugging Face Hub dataset id. Rows need a "
               "messages column or prompt/response columns.",
    "dataset_split": "Split to use for a Hub dataset (ignored for a local file, which is one "
                     "split).",
    "batch_size": "Conversations per micro-batch on each process (eval.py: per forward pass and "
                  "per generation batch).",
    # generation
    "max_new_tokens": "Most tokens generated per reply: eval.py's model replies, on_policy.py's "
                      "student samples, sequence_level.py's teacher completions (generation also "
                      "stops at end of turn or EOS).",
    "sampling_temperature": "Temperature of the generated replies: on_policy.py's student "
                            "samples (> 0), sequence_level.py's teacher completions (0 = greedy). "
                            "The loss's temperature is --loss-temperature.",
    "top_p": "Nucleus sampling threshold of the generated replies, in (0, 1] (1 = off).",
    "completions": "Teacher completions, JSON Lines read as --dataset rows are (`messages`, or "
                   "`prompt`/`response` columns), the last turn the teacher's reply. "
                   "sequence_level.py fills this file (default: "
                   "OUTPUT_DIR/teacher_completions.jsonl) and trains on it; on_policy.py trains "
                   "its off-policy steps on it instead of the dataset's replies (GKD's "
                   "sequence-level mode).",
    # the distillation loss
    "kl": "Divergence: forward = KL(teacher‖student), mode-covering; reverse = "
          "KL(student‖teacher), mode-seeking (MiniLLM, GKD); jsd = generalized JSD weighted by "
          "--beta; skew_forward / skew_reverse = DistiLLM's skew KL with --skew: the second "
          "distribution is mixed with --skew of the first, which bounds the loss where the "
          "teacher gives a token ~0. A teacher given as its top K per position (--teacher-cache, "
          "--teacher-api-base) defines forward KL only: over those K tokens plus a tail bucket, "
          "biased low (the rest is one lump). on_policy.py only, with --teacher-api-base: "
          "sampled_reverse = on on-policy steps, per sampled token x, advantage = log "
          "p_teacher(x) - log p_student(x) (detached) and loss = -advantage * log p_student(x): "
          "its expected gradient is the reverse KL's (unbiased) but from one sample per position "
          "(noisy), and its logged loss is not the KL (kd is the sampled KL estimate); "
          "off-policy steps (dataset replies, not student samples) then use the top-K forward "
          "KL.",
    "beta": "JSD mixture weight in (0, 1), with --kl jsd only: m = beta*p_teacher + "
            "(1-beta)*p_student; 0.5 is the symmetric JSD.",
    "skew": "Skew in (0, 1), with --kl skew_forward / skew_reverse only: skew_forward = "
            "KL(p_t ‖ skew*p_t + (1-skew)*p_s), skew_reverse = KL(p_s ‖ skew*p_s + "
            "(1-skew)*p_t); each token's log-ratio is at most log(1/skew). 0.1 is DistiLLM's.",
    "loss_temperature": "Softmax temperature T of both models inside the loss (in "
                        "cross_tokenizer.py before sorting); the divergence is scaled by T², so "
                        "that its gradient keeps its size as T changes. With --teacher-api-base "
                        "only 1 (the server's log-probs are at temperature 1).",
    "alpha": "Weight of cross-entropy on the data's reply tokens, in [0, 1]: loss = "
             "(1-alpha)*T²*divergence + alpha*CE (0 = pure distillation). In cross_tokenizer.py "
             "the divergence is ULD (plus the --hybrid KL) and both terms count the student's "
             "aligned reply tokens only.",
    "loss_chunk_size": "Supervised positions per chunk of the memory-bounded loss: the output "
                       "layers run on this many positions at a time (cross_tokenizer.py: aligned "
                       "positions; sequence_level.py: the student's, for its cross-entropy), so "
                       "about one chunk of logits (4 bytes x vocabulary per position in float32) "
                       "is alive at once. 0 = automatic, ~128 MiB of float32 logits of the "
                       "larger vocabulary per chunk (256 positions at a 128K vocabulary); -1 = no "
                       "chunking: full logits at every position.",
    # teachers given as their top K per position
    "teacher_cache": "Directory of an offline teacher cache (the teacher's top --cache-top-k "
                     "log-probs per position plus a tail bucket), built on the first run and "
                     "then read instead of running the teacher. token_level.py builds it with "
                     "--teacher or fills it from --teacher-api-base, then asks no teacher; "
                     "on_policy.py builds it with --teacher and reads it on off-policy steps "
                     "only (its on-policy samples are scored by the live teacher). Forward KL "
                     "only.",
    "cache_top_k": "Teacher tokens kept per position in --teacher-cache (plus one tail bucket); "
                   "about 6 bytes each. Unset: the existing cache's K, else 32; token_level.py "
                   "filling a cache from --teacher-api-base keeps --teacher-top-k (another "
                   "--cache-top-k is refused).",
    "teacher_top_k": "With --teacher-api-base: teacher log-probs per position asked of the "
                     "server (at most its own maximum, vLLM's --max-logprobs, default 20). The "
                     "top-K forward KL compares these K tokens plus one bucket for the rest: "
                     "biased low against the full forward KL (the rest is compared as one "
                     "lump), exact when K covers the vocabulary.",
}


def shared_field(name, **field_kwargs):
    """A dataclass field with SHARED_HELP[name] as its help text: `name` is the field's own name
    (the flag --name); default / default_factory stay the script's own."""
    return field(metadata={"help": SHARED_HELP[name]}, **field_kwargs)


def shared_checks(args):
    """(ok, one-line error) for the shared loss settings `args` has (--loss-temperature,
    --loss-chunk-size, --alpha): checked alike by every script that takes them."""
    checks = []
    if hasattr(args, "loss_temperature"):
        checks.append((math.isfinite(args.loss_temperature) and args.loss_temperature > 0,
                       f"--loss-temperature must be > 0 and finite, got {args.loss_temperature}"))
    if hasattr(args, "loss_chunk_size"):
        checks.append((args.loss_chunk_size >= -1,
                       f"--loss-chunk-size must be a number of positions >= 1, 0 (automatic) or "
                       f"-1 (no chunking), got {args.loss_chunk_size}"))
    if hasattr(args, "alpha"):
        checks.append((0.0 <= args.alpha <= 1.0,
                       f"--alpha must be in [0, 1] (the weight of cross-entropy; 0 = pure "
                       f"distillation), got {args.alpha}"))
    return checks


@dataclass
class ModelArguments:
    teacher: Optional[str] = shared_field("teacher", default=None)
    student: Optional[str] = field(default=None, metadata={
        "help": "Student to train: a local model directory or a Hugging Face Hub id."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = shared_field("dtype",
                                                                            default="auto")
    student_dtype: Optional[Literal["auto", "float32", "bfloat16", "float16"]] = field(
        default=None, metadata={"help": "Override --dtype for the student only (the trained "
                                        "weights and optimizer state use it; 'auto' = float32, "
                                        "bfloat16/float16 = pure low-precision training)."})
    trust_remote_code: bool = shared_field("trust_remote_code", default=False)
    chat_template: Optional[str] = shared_field("chat_template", default=None)

    def __post_init__(self):
        if self.chat_template is not None:
            read_chat_template(self.chat_template)  # a bad path fails now, not after loading
        if self.student_dtype is None:
            self.student_dtype = self.dtype
        if self.student_dtype == "float16" and not has_accelerator():
            # AdamW's eps (1e-8) is 0 in float16, so a weight with no gradient yet divides 0 by 0:
            # the student turns NaN within a few steps, and CPUs have no fast float16 either.
            raise UserError("--dtype float16 / --student-dtype float16 trains the student in "
                            "float16, which turns NaN on a machine without a GPU; use --dtype "
                            "float32 (or bfloat16) here")


def has_accelerator():
    """Whether training can run on something other than the CPU (and is not told not to)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return False
    import torch

    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return (torch.cuda.is_available() or bool(mps and mps.is_available())
            or bool(xpu and xpu.is_available()))


@dataclass
class DataArguments:
    dataset: Optional[str] = shared_field("dataset", default=None)
    dataset_split: str = shared_field("dataset_split", default="train")
    dataset_config: Optional[str] = field(default=None, metadata={
        "help": "Configuration (subset) name of a Hub dataset, if it has several."})
    messages_field: str = field(default="messages", metadata={
        "help": "Column holding the conversation as a list of {role, content} messages."})
    prompt_field: str = field(default="prompt", metadata={
        "help": "Column holding the user prompt (used when there is no messages column). A list "
                "of messages is accepted too."})
    response_field: str = field(default="response", metadata={
        "help": "Column holding the assistant reply (used with --prompt-field)."})
    max_samples: int = field(default=-1, metadata={
        "help": "Use only the first N rows of the dataset (-1 = all)."})
    max_length: int = field(default=1024, metadata={
        "help": "Maximum tokens per conversation; longer ones are cut at the end and rows left "
                "with no assistant token are skipped (counted in a warning)."})

    def __post_init__(self):
        if self.max_samples == 0 or self.max_samples < -1:
            raise UserError(f"--max-samples must be a positive number of rows or -1 for all, "
                            f"got {self.max_samples}")
        if self.max_length < 2:
            raise UserError(f"--max-length must be at least 2 tokens, got {self.max_length}")


@dataclass
class TrainingArguments:
    output_dir: Optional[str] = field(default=None, metadata={
        "help": "Where the final student, run_config.json, metrics.jsonl and checkpoints/ go."})
    max_steps: int = field(default=-1, metadata={
        "help": "Optimizer steps to run (-1 = --num-epochs full passes over the data)."})
    num_epochs: float = field(default=1.0, metadata={
        "help": "Passes over the data when --max-steps is -1 (fractions allowed)."})
    batch_size: int = shared_field("batch_size", default=8)
    grad_accum: int = field(default=1, metadata={
        "help": "Micro-batches per optimizer step. Effective batch = batch_size x grad_accum x "
                "processes; the loss is averaged over all supervised tokens of that batch."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.03, metadata={
        "help": "Fraction of the optimizer steps spent warming the learning rate up from 0."})
    lr_scheduler: Literal["cosine", "linear", "constant"] = field(default="cosine", metadata={
        "help": "Learning-rate decay after warmup."})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "Clip the global gradient norm to this value (0 = no clipping)."})
    seed: int = field(default=42, metadata={"help": "Seed for data order and initialisation."})
    save_steps: int = field(default=500, metadata={
        "help": "Write a resumable checkpoint every N optimizer steps (0 = none; the final "
                "student is always saved)."})
    save_total_limit: int = field(default=2, metadata={
        "help": "Keep only the newest N checkpoints (0 = keep all)."})
    eval_dataset: Optional[str] = field(default=None, metadata={
        "help": "Held-out conversations (same formats as --dataset) scored during training: the "
                "method's loss per supervised token on their replies, every --eval-steps and at "
                "the end, as eval_* rows of metrics.jsonl."})
    eval_dataset_split: str = field(default="test", metadata={
        "help": "Split of a Hub --eval-dataset (ignored for a local file)."})
    eval_steps: int = field(default=0, metadata={
        "help": "Score --eval-dataset every N optimizer steps (0 = only at the end)."})
    log_steps: int = field(default=10, metadata={
        "help": "Print a log line and append a metrics.jsonl row every N optimizer steps."})
    resume: bool = field(default=False, metadata={
        "help": "Continue from the newest checkpoint in --output-dir."})
    overwrite: bool = field(default=False, metadata={
        "help": "Start afresh even if --output-dir holds a run: what that run wrote (its "
                "checkpoints, metrics and exported model) is deleted once all inputs are checked; "
                "other files there (a dataset, notes, a completions file) are kept."})
    allow_changed_settings: Optional[str] = field(default=None, metadata={
        "help": "With --resume: settings (comma-separated flag names, e.g. max-steps,"
                "learning-rate) this run may change from the checkpoint's. Any other change that "
                "alters the result (learning rate, data, --max-steps, method options, seed, batch "
                "sizes, models) is refused; logging, saving and output options never count."})
    max_bad_steps: int = field(default=10, metadata={
        "help": "Stop after this many optimizer steps in a row with a NaN/inf loss or gradient "
                "(each such step is skipped, not applied)."})
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = field(default=None, metadata={
        "help": "Autocast precision (default: whatever `accelerate config` / launch says, else "
                "'no'). bf16 is the usual choice on recent GPUs."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute student activations in backward to save memory."})
    group_by_length: bool = field(default=False, metadata={
        "help": "Batch conversations of similar length together (within shuffled groups of 64 "
                "global batches) to cut padding; the batches' order stays shuffled."})
    report_to: Literal["none", "tensorboard", "wandb", "trackio", "mlflow", "all"] = field(
        default="none", metadata={
            "help": "Also log the metrics.jsonl numbers, the run's settings and its name to an "
                    "experiment tracker: tensorboard (event files in OUTPUT_DIR/tensorboard), "
                    "wandb, trackio, mlflow, or all of those installed. Projects: $WANDB_PROJECT, "
                    "$TRACKIO_PROJECT, $MLFLOW_EXPERIMENT_NAME (default 'distillation')."})
    run_name: Optional[str] = field(default=None, metadata={
        "help": "The run's name in the tracker (default: --output-dir's last folder)."})

    def __post_init__(self):
        checks = [
            (self.output_dir is not None, "--output-dir is required"),
            (self.max_steps > 0 or self.max_steps == -1,
             f"--max-steps must be positive or -1 (epochs), got {self.max_steps}"),
            (0 < self.num_epochs < math.inf,
             f"--num-epochs must be > 0 and finite, got {self.num_epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (0 < self.learning_rate < math.inf,
             f"--learning-rate must be > 0 and finite, got {self.learning_rate}"),
            (0 <= self.weight_decay < math.inf,
             f"--weight-decay must be >= 0 and finite, got {self.weight_decay}"),
            (0 <= self.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {self.max_grad_norm}"),
            (self.save_steps >= 0, f"--save-steps must be >= 0, got {self.save_steps}"),
            (self.save_total_limit >= 0, f"--save-total-limit must be >= 0, got {self.save_total_limit}"),
            (self.max_bad_steps >= 1, f"--max-bad-steps must be >= 1, got {self.max_bad_steps}"),
            (self.log_steps >= 1, f"--log-steps must be >= 1, got {self.log_steps}"),
            (self.eval_steps >= 0, f"--eval-steps must be >= 0 (0 = only at the end), got "
                                   f"{self.eval_steps}"),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other: "
                                                   "pick one"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        installed_trackers(self.report_to)  # a missing package fails now, not after loading


@dataclass
class KDArguments(TeacherApiArguments):
    """The same-vocabulary distillation options of token_level.py and on_policy.py: the
    divergence and its knobs, and a teacher given as its top K per position (--teacher-cache, a
    server). Each script's own group derives from this one (adding its options and its --kl
    choices and default), so they stay in its run_config group."""
    kl: str = shared_field("kl", default="forward")  # each script narrows the choices
    beta: float = shared_field("beta", default=0.5)
    skew: float = shared_field("skew", default=0.1)
    loss_temperature: float = shared_field("loss_temperature", default=1.0)
    teacher_cache: Optional[str] = shared_field("teacher_cache", default=None)
    cache_top_k: Optional[int] = shared_field("cache_top_k", default=None)
    teacher_top_k: int = shared_field("teacher_top_k", default=20)
    loss_chunk_size: int = shared_field("loss_chunk_size", default=0)

    def __post_init__(self):
        super().__post_init__()
        checks = [
            *shared_checks(self),
            (self.kl != "jsd" or 0.0 < self.beta < 1.0,
             f"--beta must be strictly between 0 and 1 for --kl jsd, got {self.beta}; use --kl "
             f"forward or --kl reverse for the end points"),
            (not self.kl.startswith("skew") or 0.0 < self.skew < 1.0,
             f"--skew must be strictly between 0 and 1 for --kl {self.kl}, got {self.skew}; use "
             f"--kl forward or --kl reverse for skew 0"),
            (not self.teacher_cache or self.kl == "forward",
             "--teacher-cache supports --kl forward only: the cache keeps the teacher's top K per "
             "position, which defines forward KL only (reverse KL and JSD need every token)"),
            (not self.teacher_api_base or self.loss_temperature == 1.0,
             "--teacher-api-base needs --loss-temperature 1: the server's log-probs are at "
             "temperature 1, and a top K cannot be re-tempered without the rest of the "
             "distribution"),
            (self.teacher_top_k >= 1, f"--teacher-top-k must be >= 1, got {self.teacher_top_k}"),
            (self.cache_top_k is None or self.cache_top_k >= 1,
             f"--cache-top-k must be >= 1, got {self.cache_top_k}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")  # each one's package has its name


def installed_trackers(report_to):
    """The tracker names --report-to asks for; one line naming the pip package when one is not
    installed (accelerate would leave it out without a word)."""
    import importlib.util

    if report_to == "none":
        return []
    installed = [name for name in TRACKERS if importlib.util.find_spec(name) is not None]
    if report_to == "all":
        if not installed:
            raise UserError("--report-to all found no tracker installed (tensorboard, wandb, "
                            "trackio, mlflow): pip install tensorboard")
        return installed
    if report_to not in installed:
        raise UserError(f"--report-to {report_to} needs the {report_to} "
                        f"package, which is not installed: pip install "
                        f"{report_to} (or --report-to none)")
    return [report_to]


def eval_data_args(data_args, train_args):
    """The DataArguments that load --eval-dataset (every row; the same columns and max length)."""
    import dataclasses

    return dataclasses.replace(data_args, dataset=train_args.eval_dataset,
                               dataset_split=train_args.eval_dataset_split, max_samples=-1)


def require_flags(*flags):
    """A UserError for the first (flag, value) pair whose value is missing: flags a script needs
    that its dataclass leaves optional, because another flag may stand in for them (a complete
    --teacher-cache or --teacher-api-base for --teacher)."""
    for flag, value in flags:
        if not value:
            raise UserError(f"{flag} is required (see --help)")


def teacher_is_served(model_args, api_args):
    """Whether the teacher runs on a server (--teacher-api-base); a local --teacher as well is
    refused, since only one of them can be the teacher."""
    served = bool(api_args.teacher_api_base)
    if served and model_args.teacher:
        raise UserError("pass either --teacher (a local model) or --teacher-api-base, not both")
    return served


def renamed_flags(dataclass_type):
    """{old field name: (new field name, note)} of the flags a dataclass renamed, from its
    `RENAMED_FLAGS` class attribute ({old: new} or {old: (new, what changed)}). The old spelling
    is taken for one release, hidden from --help, with a one-line warning naming the new one."""
    renamed = {}
    for old, new in getattr(dataclass_type, "RENAMED_FLAGS", {}).items():
        new, note = (new, "") if isinstance(new, str) else new
        renamed[old] = (new, note)
    return renamed


class _RenamedFlag(argparse.Action):
    """A hidden old spelling of a flag: stores into the new flag's field and notes the use (the
    warning is printed once, after parsing)."""

    def __init__(self, option_strings, dest, new_flag=None, note="", **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new_flag, self.note = new_flag, note

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        used = parser.__dict__.setdefault("renamed_flags_used", {})
        used[self.option_strings[0]] = (self.new_flag, self.note)


class _RemovedFlag(argparse.Action):
    """A hidden flag that no longer exists: its use stops parsing with the note saying what to
    pass instead (a REMOVED_FLAGS entry)."""

    def __init__(self, option_strings, dest, note="", **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.note = note

    def __call__(self, parser, namespace, values, option_string=None):
        raise UserError(f"{self.option_strings[0]} was removed: {self.note}")


def add_renamed_flags(parser, dataclass_types):
    """Register each dataclass's RENAMED_FLAGS as hidden aliases of the new flags (same type,
    choices and field), and its REMOVED_FLAGS ({old field name: what to pass instead}) as hidden
    flags that refuse to run with that note, rather than as unknown flags."""
    actions = flag_actions(parser)
    for dataclass_type in dataclass_types:
        for old, note in getattr(dataclass_type, "REMOVED_FLAGS", {}).items():
            options = dict.fromkeys([f"--{old.replace('_', '-')}", f"--{old}"])  # dashed first
            # nargs "?": the flag alone, without its old value, gets the note too
            parser.add_argument(*options, action=_RemovedFlag, default=argparse.SUPPRESS,
                                nargs="?", help=argparse.SUPPRESS, note=note)
        for old, (new, note) in renamed_flags(dataclass_type).items():
            target = actions[new]
            options = dict.fromkeys([f"--{old.replace('_', '-')}", f"--{old}"])  # dashed first
            parser.add_argument(*options, action=_RenamedFlag, dest=target.dest,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                                type=target.type, nargs=target.nargs, const=target.const,
                                choices=target.choices, metavar=target.metavar,
                                new_flag=f"--{new.replace('_', '-')}", note=note)


def warn_renamed_flags(parser):
    for old, (new, note) in getattr(parser, "renamed_flags_used", {}).items():
        print(f"warning: {old} is deprecated and will be removed in the next release; use "
              f"{new}{f' ({note})' if note else ' (the same setting)'}", file=sys.stderr)


def visible_flag_names(parser):
    """The --flag names --help shows (hidden old spellings left out), dashed."""
    return sorted({option.replace("_", "-") for action in parser._actions
                   if action.help is not argparse.SUPPRESS
                   for option in action.option_strings if option.startswith("--")})


def unknown_argument_message(argument, parser):
    """'unknown flag --learnig-rate; did you mean --learning-rate?' for a word argparse left."""
    if not argument.startswith("-") or argument.lstrip("-") == "":
        return f"unexpected argument {argument!r}: every value follows its flag (see --help)"
    flag = argument.split("=", 1)[0]
    # HfArgumentParser registers --flag-name and --flag_name; suggest the dashed spelling.
    options = visible_flag_names(parser)
    close = difflib.get_close_matches(flag.replace("_", "-"), options, n=1, cutoff=0.6)
    suggestion = f"; did you mean {close[0]}?" if close else ""
    return f"unknown flag {flag}{suggestion} (see --help)"


def flag_actions(parser):
    """{field_name: argparse action} of every --flag the parser takes."""
    return {option[2:].replace("-", "_"): action for action in parser._actions
            for option in action.option_strings if option.startswith("--")}


def read_config_file(path):
    """The mapping a --config YAML file holds (one-line UserError for a missing or bad file)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as file:
            values = yaml.safe_load(file)
    except FileNotFoundError:
        raise UserError(f"--config {path} does not exist; pass a YAML file of flag names and "
                        f"values") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {path} could not be read ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"--config {path} is not valid YAML ({where}{problem})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"--config {path} must be a mapping of flag names to values (e.g. "
                        f"'learning_rate: 1e-4'), not a {type(values).__name__}")
    return values


def config_arguments(path, parser):
    """The command-line words that a --config file stands for, to go before the real ones (where
    a flag given twice, the later one wins): argparse then converts and checks every value as
    if typed, choices included."""
    actions = flag_actions(parser)
    words = []
    for key, value in read_config_file(path).items():
        name = str(key).replace("-", "_")
        if name not in actions or name in ("help", "config"):
            valid = sorted({option[2:].replace("-", "_") for option in visible_flag_names(parser)}
                           - {"help", "config"})
            if "-" in str(key):
                valid = [v.replace("_", "-") for v in valid]
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            raise UserError(f"unknown key {key!r} in --config {path}"
                            + (f"; did you mean {close[0]}?" if close else "")
                            + " (keys are the flag names, see --help)")
        if value is None:  # null: the flag's default
            continue
        flag = f"--{name}"
        many = actions[name].nargs in ("+", "*")
        if isinstance(value, dict) or (isinstance(value, list) and not many):
            raise UserError(f"key {key!r} in --config {path} takes "
                            f"{'a list or ' if many else ''}one value, not "
                            f"{'a mapping' if isinstance(value, dict) else 'a list'}")
        if many:
            items = value if isinstance(value, list) else [value]
            words += [flag, *map(yaml_word, items)] if items else []
        else:
            words.append(f"{flag}={yaml_word(value)}")  # "=": a value may start with "-"
    return words


def yaml_word(value):
    """A YAML scalar as the command-line word that means it (true -> 'true', 1e-4 -> '1e-4')."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def make_parser(dataclass_types, description=None):
    """The parser of a script taking these dataclasses: their flags, --config and the hidden old
    spellings (RENAMED_FLAGS, REMOVED_FLAGS); an argparse error is a one-line UserError."""
    # No prefix matching: --max-step silently meaning --max-steps would hide typos (and a later
    # flag that shares the prefix would change what an old command line means).
    parser = HfArgumentParser(dataclass_types, description=description, allow_abbrev=False)
    parser.add_argument("--config", metavar="FILE.yaml", default=None, help=(
        "YAML file of settings: keys are the flag names (learning_rate or learning-rate), "
        "values as on the command line; flags given on the command line override it."))
    add_renamed_flags(parser, dataclass_types)

    def one_line_error(message):  # argparse would print the whole usage block first
        raise UserError(f"{message} (see --help)")

    parser.error = one_line_error
    return parser


def parse_args(dataclass_types, argv=None, description=None):
    """Parse the command line (and its --config file) into one instance per dataclass (bad
    values raise UserError). A flag a dataclass renamed (its RENAMED_FLAGS) is still taken under
    the old name, on the command line or as a --config key, with a warning; one it removed (its
    REMOVED_FLAGS) is refused with a note saying what to pass instead."""
    parser = make_parser(dataclass_types, description)
    args = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    # Unknown words first: a typo explains a value check that would otherwise fail first.
    namespace, unknown = parser.parse_known_args(args)
    if unknown:
        raise UserError(unknown_argument_message(unknown[0], parser))
    config = namespace.config
    if config:
        args = config_arguments(config, parser) + args
    # The last output is the namespace of --config, which is no dataclass's field.
    parsed = parser.parse_args_into_dataclasses(args=args, look_for_args_file=False)[
        :len(dataclass_types)]
    warn_renamed_flags(parser)
    return parsed


# What a run did to an existing output (not how it trains): left out of a recipe, so that the
# recipe starts a fresh run wherever it is used.
_NOT_RECIPE = ("resume", "overwrite", "allow_changed_settings", "rescore")
# Records in eval.py's --output settings that are measured, not set.
_EVAL_RECORDS = ("num_conversations", "data_sha256", "teacher_fingerprint", "device", "decoding",
                 "command", "partial")


def recipe_yaml(record, source):
    """A --config YAML that reproduces the run recorded in `record`: a run_config.json (from a
    training script's --output-dir) or an eval.py --output JSON. Values that were redacted
    before they were saved (credentials in an API URL) are written commented out."""
    import yaml

    if isinstance(record.get("settings"), dict) and "results" in record:
        script = "eval.py"
        groups = {"eval": {k: v for k, v in record["settings"].items() if k not in _EVAL_RECORDS}}
    elif isinstance(record.get("method"), str):
        script = f"{record['method']}.py"
        groups = {name: values for name, values in record.items()
                  if isinstance(values, dict) and name not in ("versions", "renamed_settings",
                                                                   "removed_settings")}
    else:
        raise UserError(f"{source} is neither a run_config.json of a training run nor an eval.py "
                        f"--output file")
    lines = [f"# {script} settings from {source}",
             f"# python {script} --config THIS.yaml   (flags given after it override it)"]
    for group, values in groups.items():
        lines.append(f"\n# {group}")
        for name, value in values.items():
            if name in _NOT_RECIPE or value is None:
                continue
            line = yaml.safe_dump({name: value}, default_flow_style=True, width=10**6,
                                  allow_unicode=True).strip()[1:-1]  # "{k: v}" -> "k: v"
            if "***" in str(value):
                line = f"# {line}   # credentials were removed before saving: put them back"
            lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv=None):
    """python -m common.args RUN_CONFIG.json > recipe.yaml"""
    import json

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        raise UserError("usage: python -m common.args RUN_DIR/run_config.json > recipe.yaml "
                        "(or an eval.py --output JSON)")
    path = args[0]
    if os.path.isdir(path):
        path = os.path.join(path, "run_config.json")
    try:
        with open(path, encoding="utf-8") as file:
            record = json.load(file)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not read {path} as JSON ({exc})") from None
    if not isinstance(record, dict):
        raise UserError(f"{path} is not a run_config.json")
    sys.stdout.write(recipe_yaml(record, path))


if __name__ == "__main__":
    from common.errors import run_cli

    run_cli(main)
