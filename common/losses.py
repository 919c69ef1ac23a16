"""Distillation losses as pure functions over logits of supervised positions.

Shapes: `student_logits` and `teacher_logits` are (N, V) for N supervised positions over the same
V-token vocabulary; every function returns a per-token loss of shape (N,). Reduction is separate:
the loop divides the sum by the supervised-token count of the whole accumulation window.

Directions, with p_t the teacher's and p_s the student's next-token distribution:
- forward KL = KL(p_t ‖ p_s) = Σ_v p_t(v) (log p_t(v) − log p_s(v))   mode-covering (Hinton)
- reverse KL = KL(p_s ‖ p_t) = Σ_v p_s(v) (log p_s(v) − log p_t(v))   mode-seeking (MiniLLM)
- generalized JSD(β) = β KL(p_t ‖ m) + (1−β) KL(p_s ‖ m), m = β p_t + (1−β) p_s   (GKD)
- skew forward KL(α) = KL(p_t ‖ α p_t + (1−α) p_s)                        (DistiLLM)
- skew reverse KL(α) = KL(p_s ‖ α p_s + (1−α) p_t)                        (DistiLLM)
  Mixing a share α of the first distribution into the second bounds every log-ratio by
  log(1/α): a token the teacher gives ~0 no longer costs (and pulls) without limit, the cause of
  plain reverse KL's large, clipped gradients against a confident teacher.

All work in float32 whatever the logits' dtype (float64 logits stay float64: references in tests),
and tokens a model gives probability 0 (a -inf logit, e.g. a masked vocabulary entry) contribute 0
to the loss and to its gradient instead of NaN.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.chat import supervised_positions

KL_KINDS = ("forward", "reverse", "jsd", "skew_forward", "skew_reverse")


def _at_least_float32(tensor):
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def log_probs(logits, temperature=1.0):
    """float32 (or float64) log-softmax of logits / temperature over the last dimension.

    Each row's largest logit is subtracted before the division by T, so that the division rounds
    values of the size of log-probabilities rather than of the logits: 1e4 / 0.05 = 2e5 is only
    known to float32's spacing there (2**-6), an error in every log-probability that grows with
    the logits' size. A constant added to a row then changes nothing, as in exact arithmetic.
    """
    logits = _at_least_float32(logits)
    if temperature == 1.0:  # log_softmax subtracts the row's maximum itself
        return F.log_softmax(logits, dim=-1)
    # No gradient through the shift: a row's constant does not change its log-softmax.
    shifted = logits - logits.amax(dim=-1, keepdim=True).detach()
    return F.log_softmax(shifted.div_(temperature), dim=-1)


def _kl_from_log_probs(log_p, log_q):
    """Σ_v p(v) (log p(v) − log q(v)), with 0·log 0 = 0 (where p = 0 the term is dropped)."""
    p = log_p.exp()
    # Dropped terms get a finite log-ratio before the product, not a zero after it: the product's
    # gradient with respect to p is the log-ratio, -inf or NaN where p = 0, and a torch.where after
    # the product would multiply that by the zero gradient it routes back, giving NaN.
    log_ratio = torch.where(p > 0, log_p - log_q, 0.0)
    return (p * log_ratio).sum(dim=-1)


def forward_kl(student_logits, teacher_logits, temperature=1.0):
    """KL(p_teacher ‖ p_student) per token, shape (N,)."""
    return _kl_from_log_probs(log_probs(teacher_logits, temperature),
                              log_probs(student_logits, temperature))


def reverse_kl(student_logits, teacher_logits, temperature=1.0):
    """KL(p_student ‖ p_teacher) per token, shape (N,)."""
    return _kl_from_log_probs(log_probs(student_logits, temperature),
                              log_probs(teacher_logits, temperature))


def _log_mixture(log_p, log_q, weight):
    """log(weight·p + (1−weight)·q), 0 < weight < 1, without NaN where both are 0."""
    # logaddexp(-inf, -inf) differentiates to NaN: computed from zeros, then set to -inf.
    both_zero = torch.isneginf(log_p) & torch.isneginf(log_q)
    return torch.logaddexp((log_p + math.log(weight)).masked_fill(both_zero, 0.0),
                           (log_q + math.log(1.0 - weight)).masked_fill(both_zero, 0.0)
                           ).masked_fill_(both_zero, float("-inf"))


def generalized_jsd(student_logits, teacher_logits, beta=0.5, temperature=1.0):
    """β KL(p_t ‖ m) + (1−β) KL(p_s ‖ m) with m = β p_t + (1−β) p_s, per token; 0 < β < 1.

    β = 0.5 is the symmetric Jensen-Shannon divergence; small β behaves like a scaled forward KL,
    β near 1 like a scaled reverse KL. The mixture is built in log space (logaddexp).
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"generalized JSD needs 0 < beta < 1, got {beta}")
    teacher_log_probs = log_probs(teacher_logits, temperature)
    student_log_probs = log_probs(student_logits, temperature)
    mixture_log_probs = _log_mixture(teacher_log_probs, student_log_probs, beta)
    return (beta * _kl_from_log_probs(teacher_log_probs, mixture_log_probs)
            + (1.0 - beta) * _kl_from_log_probs(student_log_probs, mixture_log_probs))


def skew_kl(log_p, log_q, skew):
    """KL(p ‖ skew·p + (1−skew)·q) per row, 0 < skew < 1; at most log(1/skew) per row."""
    if not 0.0 < skew < 1.0:
        raise ValueError(f"skew KL needs 0 < skew < 1, got {skew}")
    return _kl_from_log_probs(log_p, _log_mixture(log_p, log_q, skew))


def skew_forward_kl(student_logits, teacher_logits, skew=0.1, temperature=1.0):
    """KL(p_t ‖ skew·p_t + (1−skew)·p_s) per token, shape (N,) (DistiLLM's SKL)."""
    return skew_kl(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature),
                   skew)


def skew_reverse_kl(student_logits, teacher_logits, skew=0.1, temperature=1.0):
    """KL(p_s ‖ skew·p_s + (1−skew)·p_t) per token, shape (N,) (DistiLLM's SRKL)."""
    return skew_kl(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature),
                   skew)


def temperature_scale(temperature):
    """T², the factor on every divergence taken at softmax temperature T. Softened probabilities
    move about 1/T² as much per logit (Hinton et al. 2015), so without it the divergence's
    gradient would shrink as T grows and a change of T would also change the step size and the
    balance against cross-entropy."""
    return temperature ** 2


def distillation_loss(student_logits, teacher_logits, kind="forward", temperature=1.0, beta=0.5,
                      skew=0.1):
    """The chosen divergence per token, times T² so gradients keep their size as T changes."""
    if kind == "forward":
        loss = forward_kl(student_logits, teacher_logits, temperature)
    elif kind == "reverse":
        loss = reverse_kl(student_logits, teacher_logits, temperature)
    elif kind == "jsd":
        loss = generalized_jsd(student_logits, teacher_logits, beta, temperature)
    elif kind == "skew_forward":
        loss = skew_forward_kl(student_logits, teacher_logits, skew, temperature)
    elif kind == "skew_reverse":
        loss = skew_reverse_kl(student_logits, teacher_logits, skew, temperature)
    else:
        raise ValueError(f"unknown divergence {kind!r}; expected one of {KL_KINDS}")
    return loss * temperature_scale(temperature)


def sampled_reverse_kl(student_logits, sampled_ids, teacher_sampled_log_probs,
                       with_estimate=False):
    """Per-token surrogate whose gradient estimates that of reverse KL(p_s ‖ p_t), shape (N,),
    from the teacher's log-probability of each SAMPLED token only (x ~ p_s, one per position):

        advantage(x) = log p_t(x) − log p_s(x)           (detached: a reward, not a path)
        loss(x)      = −advantage(x) · log p_s(x)

    E_x~p_s[∇loss] = Σ_x p_s(x) (log p_s(x) − log p_t(x)) ∇log p_s(x) = ∇KL(p_s ‖ p_t) (the
    score-function identity; Σ_x p_s ∇log p_s = 0): unbiased, but from one sample per position,
    so noisy. Valid only on the student's own samples (on-policy), at temperature 1. The value
    is not the KL: −advantage, the per-token sampled reverse KL, is its estimate.

    student_logits (N, V); sampled_ids (N,); teacher_sampled_log_probs (N,). With
    with_estimate, returns (surrogate, −advantage) from the one log-softmax.
    """
    student_log_prob = log_probs(student_logits).gather(-1, sampled_ids.unsqueeze(-1)).squeeze(-1)
    advantage = (teacher_sampled_log_probs.to(student_log_prob.dtype) - student_log_prob).detach()
    surrogate = -advantage * student_log_prob
    return (surrogate, -advantage) if with_estimate else surrogate


@dataclass(frozen=True)
class KDObjective:
    """What every same-vocabulary distillation loss of the suite minimizes, per supervised token:

        (1 − alpha) · T² · D_T(p_teacher, p_student) + alpha · CE(student, data token)

    with D the `kind` divergence (KL_KINDS; beta for jsd, skew for skew_*) at softmax temperature
    T (T² keeps the gradients' size as T changes). The plain path (full logits), the chunked path
    (common/chunked.py: closed-form gradients of the same terms) and the sparse teacher of the
    cache and the server (common/teacher_cache.py: forward KL over top K + tail) all take one.
    """

    kind: str = "forward"
    temperature: float = 1.0
    beta: float = 0.5
    skew: float = 0.1
    alpha: float = 0.0

    def __post_init__(self):
        if self.kind not in KL_KINDS:
            raise ValueError(f"unknown divergence {self.kind!r}; expected one of {KL_KINDS}")

    def divergence(self, student_logits, teacher_logits):
        """T² · D_T per token, shape (N,)."""
        return distillation_loss(student_logits, teacher_logits, self.kind, self.temperature,
                                 self.beta, self.skew)

    def sparse_divergence(self, student_logits, teacher_ids, teacher_logprobs, teacher_tail):
        """T² · forward KL per token against a teacher given as its top K plus a tail bucket (the
        offline cache, a server): see sparse_forward_kl. Forward KL only."""
        if self.kind != "forward":
            raise ValueError(f"a top-K teacher defines forward KL only, not {self.kind!r}")
        return sparse_forward_kl(student_logits, teacher_ids, teacher_logprobs, teacher_tail,
                                 self.temperature) * self.scale

    @property
    def scale(self):
        """T², the factor on the divergence (see temperature_scale)."""
        return temperature_scale(self.temperature)

    def combine(self, kd, ce):
        """The loss from the (summed) T²·D and CE terms."""
        return combine_kd_and_ce(kd, ce, self.alpha)


def combine_kd_and_ce(kd, ce, alpha):
    """(1 − alpha) · kd + alpha · ce: how token_level.py and cross_tokenizer.py weigh their
    (T²-scaled) divergence against cross-entropy on the data, alpha in [0, 1] (0 = pure
    distillation; on_policy.py has no --alpha, so 0)."""
    return (1.0 - alpha) * kd + alpha * ce


def sparse_forward_kl(student_logits, teacher_ids, teacher_logprobs, teacher_tail,
                      temperature=1.0):
    """Forward KL(p_teacher ‖ p_student) from the teacher's top-K plus one tail bucket, shape (N,).

    student_logits (N, V); teacher_ids, teacher_logprobs (N, K); teacher_tail (N,) = log of the
    teacher mass outside its top K. The K buckets compare p_t(v) with p_s(v); the tail bucket
    compares the teacher's remaining mass with the student's mass outside those K tokens:
        Σ_k p_t(k) (log p_t(k) − log p_s(k)) + p_t(tail) (log p_t(tail) − log p_s(tail)).
    With K = V the tail is empty and this is exactly the dense forward KL. Reverse KL would need
    the teacher's probability of every token the student puts mass on, which the cache does not
    hold: it is refused rather than approximated.
    """
    student_log_probs = log_probs(student_logits, temperature)
    student_top = student_log_probs.gather(-1, teacher_ids)
    # Fill with the most negative finite value, not -inf: when the K ids cover the whole
    # vocabulary an all -inf row would give logsumexp a NaN gradient.
    outside = student_log_probs.scatter(-1, teacher_ids, torch.finfo(student_log_probs.dtype).min)
    student_tail = torch.logsumexp(outside, dim=-1)
    teacher_all = torch.cat([teacher_logprobs, teacher_tail.unsqueeze(-1)], dim=-1)
    student_all = torch.cat([student_top, student_tail.unsqueeze(-1)], dim=-1)
    teacher_probs = teacher_all.exp()
    terms = torch.where(teacher_probs > 0, teacher_probs * (teacher_all - student_all),
                        torch.zeros_like(teacher_probs))
    return terms.sum(dim=-1)


def cross_entropy(student_logits, target_ids):
    """Next-token cross-entropy per token, shape (N,), in float32 (or float64)."""
    return F.cross_entropy(_at_least_float32(student_logits), target_ids, reduction="none")


def shift_for_next_token(logits, labels):
    """Logits that predict supervised tokens and the tokens they predict.

    logits (B, T, V) and labels (B, T, -100 = not supervised) → (N, V) logits at positions t whose
    label at t+1 is supervised, and the (N,) target ids. Selecting before any float32 upcast keeps
    the large (B, T, V) tensor in the model's own dtype.
    """
    mask = supervised_positions(labels)
    return logits[:, :-1][mask], labels[:, 1:][mask]


# --- Universal Logit Distillation: distributions over DIFFERENT vocabularies ---------------------
#
# Shapes: `student_logits` (N, Vs) and `teacher_logits` (N, Vt), row i of each predicting tokens
# that common/align.py paired; Vs and Vt need not be equal and token ids mean nothing across the
# two.
# ULD (Boizard et al. 2024) compares only the *shape* of the two distributions: each row's
# probabilities p = softmax(logits / T), sorted descending, so a permutation of either vocabulary
# leaves the loss unchanged. These return the bare divergence: cross_tokenizer.py applies the
# T² factor (temperature_scale) and the alpha weighting (combine_kd_and_ce) as every script does.

ULD_KINDS = ("kl", "l1")


def _sorted_top(values, k):
    """The k largest entries of each row, descending; k may exceed the row length (no padding)."""
    return values.topk(min(k, values.shape[-1]), dim=-1, sorted=True).values


def uld_loss(student_logits, teacher_logits, kind="kl", top_k=64, temperature=1.0):
    """Per-token ULD, shape (N,). K = top_k ranks are compared (0 = whole vocabularies).

    - kind "l1": Σ_r |p_t(r) − p_s(r)| over ranks r = 1..K of the sorted probabilities, the shorter
      row zero-padded (the original ULD's closed-form Wasserstein-1 between sorted distributions);
      in [0, 2].
    - kind "kl": forward KL(q_t ‖ q_s) = Σ_r q_t(r) (log q_t(r) − log q_s(r)) where q is the top-K
      sorted probabilities renormalized to sum 1. Ranks 1..min(K, Vs, Vt) are compared (zero
      padding would make the KL infinite wherever the teacher has mass the student cannot match).
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = whole vocabularies), got {top_k}")
    student_log_probs = log_probs(student_logits, temperature)
    teacher_log_probs = log_probs(teacher_logits, temperature)
    if kind == "kl":
        k = min(top_k or math.inf, student_log_probs.shape[-1], teacher_log_probs.shape[-1])
        # log_softmax is monotone, so the top-K log-probs are those of the top-K probabilities.
        student_top = _sorted_top(student_log_probs, k)
        teacher_top = _sorted_top(teacher_log_probs, k)
        student_top = student_top - torch.logsumexp(student_top, dim=-1, keepdim=True)
        teacher_top = teacher_top - torch.logsumexp(teacher_top, dim=-1, keepdim=True)
        return _kl_from_log_probs(teacher_top, student_top)
    if kind == "l1":
        k = top_k or max(student_log_probs.shape[-1], teacher_log_probs.shape[-1])
        student_top = _sorted_top(student_log_probs.exp(), k)
        teacher_top = _sorted_top(teacher_log_probs.exp(), k)
        width = max(student_top.shape[-1], teacher_top.shape[-1])
        student_top = F.pad(student_top, (0, width - student_top.shape[-1]))
        teacher_top = F.pad(teacher_top, (0, width - teacher_top.shape[-1]))
        return (teacher_top - student_top).abs().sum(dim=-1)
    raise ValueError(f"unknown ULD loss {kind!r}; expected one of {ULD_KINDS}")


def shared_vocab_kl(student_logits, teacher_logits, student_ids, teacher_ids, temperature=1.0):
    """Exact forward KL over the tokens both vocabularies share, per token, shape (N,).

    student_ids (S,) and teacher_ids (S,) pair token s_i of the student's vocabulary with t_i of
    the teacher's (the same string). Each distribution is restricted to its shared tokens and
    renormalized: KL(p_t|S ‖ p_s|S) = Σ_i p_t|S(t_i) (log p_t|S(t_i) − log p_s|S(s_i)).
    """
    student_shared = log_probs(student_logits, temperature)[:, student_ids]
    teacher_shared = log_probs(teacher_logits, temperature)[:, teacher_ids]
    student_shared = student_shared - torch.logsumexp(student_shared, dim=-1, keepdim=True)
    teacher_shared = teacher_shared - torch.logsumexp(teacher_shared, dim=-1, keepdim=True)
    return _kl_from_log_probs(teacher_shared, student_shared)
