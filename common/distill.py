"""The same-vocabulary distillation step shared by token_level.py and on_policy.py.

Both scripts compare teacher and student next-token distributions at supervised positions; they
differ only in where the sequences come from (the dataset, or the student's own samples).

Memory: at real vocabularies the logits, not the models, are the largest tensors of a step (Llama-3:
128,256 floats per position). So both models run their bodies as usual, but their output layers
(lm_heads) are applied only at supervised positions, a chunk of positions at a time, inside the loss
(common/chunked.py): prompt positions never reach an output layer, and about one chunk of logits is
alive at once. The student still runs through its own, possibly DDP-wrapped, forward call, so DDP's
hooks and gradient synchronisation work as usual; during that call its output layer passes the
final hidden states through instead of projecting them.
"""

import contextlib

import torch
import torch.nn.functional as F

from common.chat import supervised_positions
from common.chunked import auto_chunk_size, chunked_kd_loss
from common.losses import KDObjective, cross_entropy, shift_for_next_token

# The dtype autocast gives an output layer's matmul under accelerate's mixed precision.
_MIXED_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_kd_loss_fn(accelerator, teacher, vocab_size, kl="forward", temperature=1.0, beta=0.5,
                    alpha=0.0, loss_chunk_size=0, skew=0.1):
    """loss_fn(student, batch) -> (Σ per-token loss, {"kd": Σ, "ce": Σ}) over supervised positions.

    Per token: (1 - alpha) * T² * divergence(T) + alpha * cross-entropy on the batch's labels.
    Only the tokenizer's `vocab_size` real ids are compared: padded embedding rows (Qwen2.5's
    151,936 or 152,064 rows for 151,665 tokens) are not part of either distribution.

    loss_chunk_size: supervised positions per chunk of the memory-bounded loss (0 = automatic,
    about 128 MiB of float32 logits per chunk; -1 = no chunking: full logits at every position).
    Under FSDP or DeepSpeed ZeRO-3 a process holds only a slice of each output layer outside the
    forward pass, so the full-logits path is used there.
    A model whose logits are not its output layer applied to what reaches that layer (soft-capped
    logits, ...) gets its full logits instead, with a one-time warning.
    """
    objective = KDObjective(kl, temperature, beta, skew, alpha)
    matmul_dtype = _MIXED_PRECISION_DTYPES.get(str(accelerator.mixed_precision))
    chunked = loss_chunk_size >= 0 and not weights_are_sharded(accelerator)
    if loss_chunk_size >= 0 and not chunked:
        accelerator.print("note: FSDP / ZeRO-3 shard the output layers, so the KD loss computes "
                          "full logits at every position (--loss-chunk-size has no effect)")
    has_plain_output_layer = OutputLayerCheck(accelerator)

    def full_logits_loss_fn(student, batch):
        student_logits = student(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).logits
        with torch.no_grad(), accelerator.autocast():
            teacher_logits = teacher(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).logits
        student_selected, targets = shift_for_next_token(student_logits, batch["labels"])
        teacher_selected, _ = shift_for_next_token(teacher_logits, batch["labels"])
        del teacher_logits  # the full (B, T, V) tensor is the largest thing alive here
        student_selected = student_selected[:, :vocab_size]
        teacher_selected = teacher_selected[:, :vocab_size]
        kd = objective.divergence(student_selected, teacher_selected)
        ce = cross_entropy(student_selected, targets)
        loss = objective.combine(kd.sum(), ce.sum())
        return loss, {"kd": kd.sum().detach(), "ce": ce.sum().detach()}

    def loss_fn(student, batch):
        # Under DDP `student` is the wrapper: its forward is what synchronises gradients, so the
        # body runs through it; the output layer's weight is reached through the inner model.
        model = accelerator.unwrap_model(student)
        if not chunked or not has_plain_output_layer(model, batch, "student"):
            return full_logits_loss_fn(student, batch)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        target_labels = batch["labels"][:, 1:]
        supervised = supervised_positions(batch["labels"])
        with output_layer_passes_hidden_states(model):
            student_hidden = student(**inputs).logits[:, :-1][supervised]
        with torch.no_grad(), accelerator.autocast():
            if has_plain_output_layer(teacher, batch, "teacher"):
                with output_layer_passes_hidden_states(teacher):
                    teacher_hidden = teacher(**inputs).logits[:, :-1][supervised]
                teacher_layer = teacher.get_output_embeddings()
                teacher_inputs = {"teacher_hidden": teacher_hidden,
                                  "teacher_weight": teacher_layer.weight,
                                  "teacher_bias": teacher_layer.bias}
            else:
                teacher_inputs = {
                    "teacher_logits": teacher(**inputs).logits[:, :-1][supervised]}
        student_layer = model.get_output_embeddings()
        return chunked_kd_loss(
            student_hidden, student_layer.weight, target_labels[supervised], vocab_size,
            student_bias=student_layer.bias, **teacher_inputs, objective=objective,
            chunk_size=loss_chunk_size, compute_dtype=matmul_dtype,
            teacher_compute_dtype=matmul_dtype)

    return loss_fn


class OutputLayerCheck:
    """check(model, batch, what) -> whether the chunked loss may apply `model`'s output layer
    itself (see why_output_layer_is_not_plain): probed once per model, on its first batch, with a
    one-time warning when it may not. Later calls may pass batch=None: the answer is remembered."""

    def __init__(self, accelerator):
        self.accelerator, self.plain = accelerator, {}

    def __call__(self, model, batch, what):
        if id(model) not in self.plain:
            reason = why_output_layer_is_not_plain(model, batch["input_ids"],
                                                   batch["attention_mask"],
                                                   self.accelerator.autocast)
            self.plain[id(model)] = reason is None
            if reason is not None:
                self.accelerator.print(f"warning: the {what}'s output layer {reason}; computing "
                                       f"its full logits at every position instead (no chunked "
                                       f"loss)")
        return self.plain[id(model)]


def make_head_loss_fn(accelerator, vocab_size, terms, loss_chunk_size=0, row_keys=()):
    """loss_fn(student, batch) -> terms(...) for a loss that needs only the student's logits at
    supervised positions (cross-entropy; KD against a cached teacher).

    terms(logits (n, vocab_size), targets (n,), *rows) -> (summed loss, {name: summed stat}),
    where rows are batch[key] for key in row_keys, one row per supervised position, cut like the
    logits. With loss_chunk_size >= 0 (0 = automatic) the output layer runs on loss_chunk_size
    supervised positions at a time and each chunk is recomputed in backward (activation
    checkpointing): about one chunk of logits is alive at once. Full logits under FSDP / ZeRO-3,
    for output layers that are not plain, and with loss_chunk_size = -1.
    """
    from torch.utils.checkpoint import checkpoint

    chunked = loss_chunk_size >= 0 and not weights_are_sharded(accelerator)
    if loss_chunk_size >= 0 and not chunked:
        accelerator.print("note: FSDP / ZeRO-3 shard the output layer, so the loss computes full "
                          "logits at every position (--loss-chunk-size has no effect)")
    chunk_size = loss_chunk_size if loss_chunk_size > 0 else auto_chunk_size(vocab_size)
    has_plain_output_layer = OutputLayerCheck(accelerator)

    def on_chunk(hidden, weight, bias, targets, *rows):
        with accelerator.autocast():  # the output layer's precision, as in the model's forward
            logits = F.linear(hidden, weight, bias)
        return terms(logits, targets, *rows)

    def loss_fn(student, batch):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        rows = [batch[key] for key in row_keys]
        model = accelerator.unwrap_model(student)
        if not chunked or not has_plain_output_layer(model, batch, "student"):
            selected, targets = shift_for_next_token(student(**inputs).logits, batch["labels"])
            return terms(selected[:, :vocab_size], targets, *rows)
        supervised = supervised_positions(batch["labels"])
        with output_layer_passes_hidden_states(model):
            hidden = student(**inputs).logits[:, :-1][supervised]
        targets = batch["labels"][:, 1:][supervised]
        layer = model.get_output_embeddings()
        weight = layer.weight[:vocab_size]
        bias = None if layer.bias is None else layer.bias[:vocab_size]
        loss, stats = hidden.sum() * 0.0, {}  # in the graph even when nothing is supervised
        # At least one (possibly empty) chunk: every process must log the same stat names.
        for start in range(0, max(hidden.shape[0], 1), chunk_size):
            chunk = (hidden[start:start + chunk_size], weight, bias,
                     targets[start:start + chunk_size], *(r[start:start + chunk_size] for r in rows))
            chunk_loss, chunk_stats = checkpoint(on_chunk, *chunk, use_reentrant=False) \
                if torch.is_grad_enabled() else on_chunk(*chunk)
            loss = loss + chunk_loss
            for name, value in chunk_stats.items():
                stats[name] = stats.get(name, 0.0) + value
        return loss, stats

    return loss_fn


def make_ce_loss_fn(accelerator, vocab_size, loss_chunk_size=0):
    """loss_fn(student, batch) -> (Σ cross-entropy over supervised tokens, {"ce": Σ}): fine-tuning
    (sequence-level KD) and held-out scoring, memory-bounded like the KD losses."""

    def terms(logits, targets):
        ce = cross_entropy(logits, targets).sum()
        return ce, {"ce": ce.detach()}

    return make_head_loss_fn(accelerator, vocab_size, terms, loss_chunk_size)


def weights_are_sharded(accelerator):
    """True under FSDP (1 or 2) and DeepSpeed ZeRO-3, where no process holds a whole weight."""
    from accelerate.utils import DistributedType

    distributed_type = getattr(accelerator, "distributed_type", None)
    if distributed_type == DistributedType.FSDP:
        return True
    if distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def _pass_through(hidden_states):
    return hidden_states


@contextlib.contextmanager
def output_layer_passes_hidden_states(model):
    """Inside, `model(...).logits` holds the final hidden states (B, T, H), not the logits.

    The output layer's forward is shadowed by an identity for the duration, so the model's own
    forward (and any wrapper's around it) runs unchanged up to the last projection, which is
    skipped. Only valid for models where `why_output_layer_is_not_plain` returns None.
    """
    layer = model.get_output_embeddings()
    own_forward = layer.__dict__.get("forward")  # an instance-level forward (e.g. a hook's) stays
    layer.forward = _pass_through
    try:
        yield
    finally:
        if own_forward is None:
            del layer.forward
        else:
            layer.forward = own_forward


def why_output_layer_is_not_plain(model, input_ids, attention_mask, autocast=None):
    """None if logits == output_layer(final hidden states) for this model, else the reason.

    Checked on the model itself, not by architecture name: one short probe (first row, first 16
    tokens) runs the model normally and with `output_layer_passes_hidden_states`, and the output
    layer applied to the second must give the first. A constant logit scale (Granite, Cohere)
    passes, rightly: with the pass-through it lands on the hidden states, and scaling commutes
    with a bias-free linear layer. Soft-capping, a head that is not the output embedding module,
    or any other non-linear post-processing of the logits fails. `autocast`: the context the
    model's forward runs under (accelerate's mixed precision), so the rebuilt logits are made in
    the same precision as the model's own.
    """
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    layer = get_output_embeddings() if get_output_embeddings is not None else None
    if not isinstance(layer, torch.nn.Linear):
        return "is not a torch.nn.Linear"
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    if getattr(config, "final_logit_softcapping", None):  # may pass the probe on small logits
        return "soft-caps its logits (final_logit_softcapping)"
    probe = {"input_ids": input_ids[:1, :16], "attention_mask": attention_mask[:1, :16]}
    training = model.training
    model.eval()  # dropout would make the two calls differ
    try:
        with torch.no_grad():
            logits = model(**probe).logits
            with output_layer_passes_hidden_states(model):
                hidden = model(**probe).logits
    finally:
        model.train(training)
    if hidden.shape != (*logits.shape[:-1], layer.in_features):
        return "is not what turns the final hidden states into the returned logits"
    with torch.no_grad(), (autocast() if autocast else contextlib.nullcontext()):
        rebuilt = F.linear(hidden.to(layer.weight.dtype), layer.weight, layer.bias).float()
    logits = logits.float()
    scale = max(1.0, logits.abs().max().item())
    if not torch.allclose(rebuilt, logits, rtol=1e-3, atol=1e-4 * scale):
        return "is followed by a non-linear transformation of the logits (e.g. soft-capping)"
    return None
