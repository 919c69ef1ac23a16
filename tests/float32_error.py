"""Float64 references for the float32 loss code, and the error budgets it is held to.

The model of float32 error (Higham, Accuracy and Stability of Numerical Algorithms, ch. 2-3): each
operation returns its exact result times (1 + δ) with |δ| ≤ u = 2**-24, a sum or inner product of k
terms rounds k times (error ≤ k·u times the sum of the terms' magnitudes), and to first order the
roundings along a chain of operations add up. So a float32 result is within
    (roundings on its longest path from the inputs) · u · (size of the quantities combined)
of the exact one, which float64 stands in for (its own error is 2**-29 times smaller). A backward
pass retraces its forward path, so a gradient's budget counts that path twice. These are
worst-case bounds: observed errors are typically ten to a hundred times smaller (rounding errors of
random sign partly cancel), yet a wrong formula, a missing factor or a precision loss that grows
with the size of the logits (which a budget never covers) is far outside them.
"""

import math

import torch

UNIT_ROUNDOFF = 2.0 ** -24  # float32: 24-bit significand, round to nearest

# Where a logit is -inf the references use this instead: exp((MASKED_LOGIT - max) / T) underflows
# to exactly 0 in float64 for the logits (|x| < 1e6) and temperatures (T < 1e3) of these tests, so
# its terms are 0 · finite = 0 and its gradient 0, with no masking in the reference to get wrong.
MASKED_LOGIT = -1e9


def loss_roundings(vocab_size, num_positions):
    """A divergence over V tokens summed over N positions: the log-softmax's sum of V exponentials
    (V), its max, log and subtraction (3), the term p·(log p − log q) (3; the JSD's mixture 2 more),
    the sum over the vocabulary (V) and over positions (N)."""
    return 2 * vocab_size + num_positions + 8


def decoder_roundings(config, seq_len):
    """A Llama-style decoder's forward pass to its logits. Per layer: RMSNorm (H sums + 3) twice,
    the q/k/v projection (H), attention scores (head dim), their softmax (seq + 3), the weighted
    sum of values (seq), the output projection (H), gate/up projection (H), SiLU and product (5),
    the down projection (intermediate), two residual adds, and 4 for constant scalings some
    architectures add (Granite's multipliers); then the final RMSNorm and the output layer (H)."""
    hidden, intermediate = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    per_layer = (2 * (hidden + 3) + hidden + head_dim + (seq_len + 3) + seq_len + hidden + hidden
                 + 5 + intermediate + 2 + 4)
    return config.num_hidden_layers * per_layer + (hidden + 3) + hidden


def log_prob_scale(*logits, temperature=1.0):
    """The largest finite |log-probability| of these (N, V) logits at this temperature: the size of
    what a log-softmax combines (computed on logits/T − max, whose entries are no larger than
    their |log-probability|). A divergence's terms weigh two such values with probabilities that
    sum to 1, so one position's divergence combines at most twice this much."""
    scale = 0.0
    for rows in logits:
        log_probs = torch.log_softmax(rows.detach().double() / temperature, dim=-1)
        finite = log_probs[torch.isfinite(log_probs)]
        scale = max(scale, finite.abs().max().item() if finite.numel() else 0.0)
    return scale


def stat_scales(student_logits, teacher_logits, num_positions, temperature, alpha):
    """Sizes of what each statistic sums (see the module docstring): per position, kd combines
    two log-probabilities at T (times T²) and ce one at T = 1."""
    kd = temperature ** 2 * num_positions * 2 * log_prob_scale(
        student_logits, teacher_logits, temperature=temperature)
    ce = num_positions * log_prob_scale(student_logits)
    return {"kd": kd, "ce": ce, "loss": (1.0 - alpha) * kd + alpha * ce}


def assert_close(got, reference, roundings, scale=None, what="value"):
    """|got − reference| ≤ roundings · u · scale everywhere (scale: the largest |reference| entry
    unless given: a normwise bound, as an element can be small by cancellation)."""
    reference = reference.double()
    if scale is None:
        scale = reference.abs().max().item()
    bound = roundings * UNIT_ROUNDOFF * scale
    error = (got.double() - reference).abs().max().item()
    assert error <= bound, (f"{what}: float32 error {error:.3g} exceeds {roundings} roundings "
                            f"({bound:.3g} at scale {scale:.3g}; {error / bound:.1f}x the budget)")


def kd_loss_float64(student_logits, teacher_logits, target_ids=None, kind="forward",
                    temperature=1.0, beta=0.5, alpha=0.0, skew=0.1):
    """(1 − α)·T²·Σ D + α·Σ CE over (N, V) logits in float64, by the textbook formulas of
    common/losses.py's docstring. Returns (loss, Σ T²·D, Σ CE, T²·D per position, d loss / d
    student_logits)."""
    student = student_logits.detach().double().requires_grad_()
    safe_student = torch.where(torch.isneginf(student), MASKED_LOGIT, student)
    safe_teacher = torch.where(torch.isneginf(teacher_logits), MASKED_LOGIT,
                               teacher_logits.detach().double())
    log_q = torch.log_softmax(safe_student / temperature, dim=-1)
    log_p = torch.log_softmax(safe_teacher / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward":
        divergence = (p * (log_p - log_q)).sum(-1)
    elif kind == "reverse":
        divergence = (q * (log_q - log_p)).sum(-1)
    elif kind == "jsd":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
        divergence = (beta * (p * (log_p - log_m)).sum(-1)
                      + (1.0 - beta) * (q * (log_q - log_m)).sum(-1))
    elif kind in ("skew_forward", "skew_reverse"):
        first, log_first, second = (p, log_p, q) if kind == "skew_forward" else (q, log_q, p)
        # where first is 0 (an underflowed masked token) the term is 0; the mixture is set to 1
        # there before the log, so that no log(0) sends NaN through the gradient
        mixture = torch.where(first > 0, skew * first + (1.0 - skew) * second, 1.0)
        divergence = (first * (log_first - mixture.log())).sum(-1)
    else:
        raise ValueError(f"no float64 reference for {kind!r}")
    per_position = temperature ** 2 * divergence
    ce = torch.zeros((), dtype=torch.float64)
    if target_ids is not None:
        ce = -torch.log_softmax(safe_student, dim=-1)[torch.arange(len(target_ids)),
                                                      target_ids].sum()
    loss = (1.0 - alpha) * per_position.sum() + alpha * ce
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), per_position.sum().detach(), ce.detach(), per_position.detach(), grad


# Columns of an 11-token vocabulary at -inf (probability 0), as (teacher's, student's).
MASKED_COLUMNS = {"teacher": ([8, 9, 10], []), "student": ([], [0, 1]),
                  "both": ([8, 9, 10], [8, 9, 10]), "apart": ([8, 9, 10], [0, 1])}


def is_infinite(kind, teacher_columns, student_columns):
    """Forward KL is infinite where the student gives 0 to a token the teacher does not, reverse
    KL the other way round; the mixtures of the JSD and skew KL are never 0 where either is not."""
    if kind == "forward":
        return bool(set(student_columns) - set(teacher_columns))
    if kind == "reverse":
        return bool(set(teacher_columns) - set(student_columns))
    return False


def large_logits(generator, rows, vocab, temperature):
    """Logits of size ~1e4 whose distributions at `temperature` are not one-hot (each row is a
    large offset plus a spread of a few T), on a grid of 2**-10: below 2**14 in size, they and
    their shifts by ±1000 are exact in float32 (24 bits), so a shifted copy holds the very same
    distribution (and the grid is fine enough that logits / T is not exact)."""
    offsets = torch.randint(-10_000, 10_000, (rows, 1), generator=generator).float()
    spread = torch.randn(rows, vocab, generator=generator) * 2 * temperature
    return offsets + (spread * 1024).round() / 1024
