"""The same-vocabulary distillation step shared by token_level.py and on_policy.py.

Both scripts compare teacher and student next-token distributions at supervised positions; they
differ only in where the sequences come from (the dataset, or the student's own samples).
"""

import torch

from common.losses import cross_entropy, distillation_loss, shift_for_next_token


def make_kd_loss_fn(accelerator, teacher, vocab_size, kl="forward", temperature=1.0, beta=0.5,
                    alpha=0.0):
    """loss_fn(student, batch) -> (Σ per-token loss, {"kd": Σ, "ce": Σ}) over supervised positions.

    Per token: (1 - alpha) * T² * divergence(T) + alpha * cross-entropy on the batch's labels.
    Only the tokenizer's `vocab_size` real ids are compared: padded embedding rows (Qwen2.5's
    151,936 or 152,064 rows for 151,665 tokens) are not part of either distribution.
    """

    def loss_fn(student, batch):
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
        kd = distillation_loss(student_selected, teacher_selected, kl, temperature, beta)
        ce = cross_entropy(student_selected, targets)
        loss = (1.0 - alpha) * kd.sum() + alpha * ce.sum()
        return loss, {"kd": kd.sum().detach(), "ce": ce.sum().detach()}

    return loss_fn
