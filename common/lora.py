"""LoRA students (peft): the student's weights stay frozen and low-rank adapters are trained.

When the student is 3-8B, full fine-tuning (weights, gradients and AdamW's two moments: 16 bytes
per parameter in float32) plus the teacher does not fit one GPU; with adapters only the adapter
parameters carry gradients and optimizer state. The export writes the merged student (a plain
`from_pretrained` directory, W + (alpha/r)·B·A folded into each adapted weight) and the adapter
itself in OUTPUT_DIR/adapter.
"""

import warnings
from dataclasses import dataclass, field

from common.errors import UserError

ADAPTER_DIR = "adapter"


@dataclass
class LoraArguments:
    lora_r: int = field(default=0, metadata={
        "help": "Rank of the LoRA adapters (0 = no adapters: every weight of the student is "
                "trained). With r > 0 only the adapters train; needs `pip install peft`."})
    lora_alpha: float = field(default=16.0, metadata={
        "help": "LoRA scaling: the adapter's update is multiplied by lora_alpha / lora_r."})
    lora_dropout: float = field(default=0.0, metadata={
        "help": "Dropout on the adapters' inputs, in [0, 1)."})
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={
        "help": "Modules that get adapters, by name (e.g. q_proj v_proj), separated by spaces; "
                "'all-linear' = every linear layer but the output layer (the attention and MLP "
                "projections)."})

    def __post_init__(self):
        if self.lora_r < 0:
            raise UserError(f"--lora-r must be >= 0 (0 = no adapters), got {self.lora_r}")
        if self.lora_r == 0:
            return
        if not self.lora_alpha > 0:
            raise UserError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise UserError("--lora-target-modules needs at least one module name (or "
                            "all-linear)")
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            raise UserError("--lora-r needs the peft package, which is not installed: pip "
                            "install peft (or --lora-r 0 to train every weight)")


def add_adapters(accelerator, student, lora_args, gradient_checkpointing=False):
    """The student with LoRA adapters (a peft model), or the student itself when --lora-r is 0."""
    if lora_args.lora_r == 0:
        return student
    from peft import LoraConfig, get_peft_model

    from common.distill import weights_are_sharded

    if weights_are_sharded(accelerator):
        # The export merges the adapters into the weights, which FSDP / ZeRO-3 hold in shards.
        raise UserError("--lora-r with FSDP or DeepSpeed ZeRO-3 is not supported; use DDP or "
                        "ZeRO-1/2 (a LoRA student's optimizer state is small anyway)")
    targets = lora_args.lora_target_modules
    config = LoraConfig(r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha,
                        lora_dropout=lora_args.lora_dropout, task_type="CAUSAL_LM",
                        target_modules="all-linear" if targets == ["all-linear"] else targets)
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(student, config)
    except ValueError as exc:  # e.g. "Target modules {'qproj'} not found in the base model"
        first_line = (str(exc).splitlines() or [""])[0]
        raise UserError(f"--lora-target-modules {' '.join(targets)}: {first_line}") from None
    if gradient_checkpointing:
        # The frozen embeddings give checkpointed blocks inputs without grad, so their recomputed
        # activations would not reach the adapters; peft's hook makes the inputs require grad.
        model.enable_input_require_grads()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    accelerator.print(f"LoRA r={lora_args.lora_r}: {trainable:,} trainable parameters of "
                      f"{total:,} ({100 * trainable / total:.2f}%)")
    return model


def load_trainable_student(accelerator, model_args, train_args, lora_args, tokenizer):
    """The student to train: loaded (common.models.load_student), checked against `tokenizer`,
    with gradient checkpointing when asked and LoRA adapters when --lora-r > 0."""
    from common.models import check_vocab_fits, load_student

    student = load_student(model_args.student, model_args.student_dtype,
                           model_args.trust_remote_code, adapters=lora_args.lora_r > 0)
    check_vocab_fits(student, tokenizer, "student")
    if train_args.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    return add_adapters(accelerator, student, lora_args, train_args.gradient_checkpointing)


def is_adapter_model(model):
    """Whether `model` (unwrapped) is a peft model, without importing peft for plain students."""
    return type(model).__module__.startswith("peft.")
