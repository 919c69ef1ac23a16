"""Distillation losses as pure functions over logits of supervised positions.

Shapes: `student_logits` and `teacher_logits` are (N, V) for N supervised positions over the same
V-token vocabulary; every function returns a per-token loss of shape (N,). Reduction is separate
(`masked_mean`, or a sum divided by the token count of the whole accumulation window in the loop).

Directions, with p_t the teacher's and p_s the student's next-token distribution:
- forward KL = KL(p_t ‖ p_s) = Σ_v p_t(v) (log p_t(v) − log p_s(v))   mode-covering (Hinton)
- reverse KL = KL(p_s ‖ p_t) = Σ_v p_s(v) (log p_s(v) − log p_t(v))   mode-seeking (MiniLLM)
- generalized JSD(β) = β KL(p_t ‖ m) + (1−β) KL(p_s ‖ m), m = β p_t + (1−β) p_s   (GKD)

All work in float32 whatever the logits' dtype, and tokens a model gives probability 0 (a -inf
logit, e.g. a masked vocabulary entry) contribute 0 instead of NaN.
"""

import math

import torch
import torch.nn.functional as F

KL_KINDS = ("forward", "reverse", "jsd")


def log_probs(logits, temperature=1.0):
    """float32 log-softmax of logits / temperature over the last dimension."""
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _kl_from_log_probs(log_p, log_q):
    """Σ_v p(v) (log p(v) − log q(v)), with 0·log 0 = 0 (where p = 0 the term is dropped)."""
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1)


def forward_kl(student_logits, teacher_logits, temperature=1.0):
    """KL(p_teacher ‖ p_student) per token, shape (N,)."""
    return _kl_from_log_probs(log_probs(teacher_logits, temperature),
                              log_probs(student_logits, temperature))


def reverse_kl(student_logits, teacher_logits, temperature=1.0):
    """KL(p_student ‖ p_teacher) per token, shape (N,)."""
    return _kl_from_log_probs(log_probs(student_logits, temperature),
                              log_probs(teacher_logits, temperature))


def generalized_jsd(student_logits, teacher_logits, beta=0.5, temperature=1.0):
    """β KL(p_t ‖ m) + (1−β) KL(p_s ‖ m) with m = β p_t + (1−β) p_s, per token; 0 < β < 1.

    β = 0.5 is the symmetric Jensen-Shannon divergence; small β behaves like a scaled forward KL,
    β near 1 like a scaled reverse KL. The mixture is built in log space with logsumexp.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"generalized JSD needs 0 < beta < 1, got {beta}")
    teacher_log_probs = log_probs(teacher_logits, temperature)
    student_log_probs = log_probs(student_logits, temperature)
    mixture_log_probs = torch.logsumexp(torch.stack([
        teacher_log_probs + math.log(beta), student_log_probs + math.log(1.0 - beta)]), dim=0)
    return (beta * _kl_from_log_probs(teacher_log_probs, mixture_log_probs)
            + (1.0 - beta) * _kl_from_log_probs(student_log_probs, mixture_log_probs))


def distillation_loss(student_logits, teacher_logits, kind="forward", temperature=1.0, beta=0.5):
    """The chosen divergence per token, times T² so gradients keep their size as T changes."""
    if kind == "forward":
        loss = forward_kl(student_logits, teacher_logits, temperature)
    elif kind == "reverse":
        loss = reverse_kl(student_logits, teacher_logits, temperature)
    elif kind == "jsd":
        loss = generalized_jsd(student_logits, teacher_logits, beta, temperature)
    else:
        raise ValueError(f"unknown divergence {kind!r}; expected one of {KL_KINDS}")
    return loss * temperature ** 2


def cross_entropy(student_logits, target_ids):
    """Next-token cross-entropy per token, shape (N,), in float32."""
    return F.cross_entropy(student_logits.float(), target_ids, reduction="none")


def masked_mean(values, mask):
    """Mean of `values` where `mask` is true; 0 (not NaN) when nothing is selected."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def shift_for_next_token(logits, labels):
    """Logits that predict supervised tokens and the tokens they predict.

    logits (B, T, V) and labels (B, T, -100 = not supervised) → (N, V) logits at positions t whose
    label at t+1 is supervised, and the (N,) target ids. Selecting before any float32 upcast keeps
    the large (B, T, V) tensor in the model's own dtype.
    """
    target_labels = labels[:, 1:]
    mask = target_labels != -100
    return logits[:, :-1][mask], target_labels[mask]
