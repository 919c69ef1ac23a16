"""Loss properties against naive references in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from common.losses import (KL_KINDS, KDObjective, cross_entropy, distillation_loss, forward_kl,
                           generalized_jsd, reverse_kl, shift_for_next_token,
                           skew_forward_kl, skew_reverse_kl)
from float32_error import (MASKED_COLUMNS, UNIT_ROUNDOFF, assert_close, is_infinite,
                           kd_loss_float64, large_logits, log_prob_scale, loss_roundings)


def naive_kl(p, q):
    """Σ p log(p/q) with plain probabilities (pass float64 ones)."""
    return (p * (p.log() - q.log())).sum(-1)


def probs64(logits, temperature=1.0):
    return (logits.double() / temperature).softmax(-1)


def assert_close_per_token(loss, expected, student, teacher, temperature=1.0, factor=1.0):
    """A float32 per-token divergence against a float64 one: one position's budget (see
    tests/float32_error.py), at the size of two log-probabilities (times the loss's factor, T²)."""
    scale = factor * 2 * log_prob_scale(student, teacher, temperature=temperature)
    assert_close(loss, expected, loss_roundings(student.shape[-1], 1), scale, "per-token loss")


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 11, generator=generator) * 2
    teacher = torch.randn(6, 11, generator=generator) * 2
    return student, teacher


def test_zero_on_identical_inputs(logits):
    student, _ = logits
    for kind in ("forward", "reverse", "jsd"):
        loss = distillation_loss(student, student.clone(), kind)
        assert_close_per_token(loss, torch.zeros(6), student, student)


def test_forward_is_kl_teacher_student(logits):
    student, teacher = logits
    expected = naive_kl(probs64(teacher), probs64(student))
    assert_close_per_token(forward_kl(student, teacher), expected, student, teacher)
    # and agrees with torch's kl_div, whose target is the teacher
    reference = F.kl_div(student.double().log_softmax(-1), teacher.double().log_softmax(-1),
                         log_target=True, reduction="none").sum(-1)
    assert_close_per_token(forward_kl(student, teacher), reference, student, teacher)


def test_reverse_is_kl_student_teacher(logits):
    student, teacher = logits
    expected = naive_kl(probs64(student), probs64(teacher))
    assert_close_per_token(reverse_kl(student, teacher), expected, student, teacher)


def test_directions_differ(logits):
    student, teacher = logits
    assert not torch.allclose(forward_kl(student, teacher), reverse_kl(student, teacher), atol=1e-3)
    # swapping the arguments swaps the direction: the very same computation
    assert torch.equal(forward_kl(student, teacher), reverse_kl(teacher, student))


def test_forward_kl_is_mode_covering():
    """A bimodal teacher: forward KL prefers the student that covers both modes, reverse KL the
    one that sits on one mode."""
    teacher = torch.log(torch.tensor([[0.49, 0.49, 0.01, 0.01]]))
    covering = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25]]))
    seeking = torch.log(torch.tensor([[0.97, 0.01, 0.01, 0.01]]))
    assert forward_kl(covering, teacher) < forward_kl(seeking, teacher)
    assert reverse_kl(seeking, teacher) < reverse_kl(covering, teacher)


def test_jsd_matches_naive_mixture(logits):
    student, teacher = logits
    beta = 0.3
    p_t, p_s = probs64(teacher), probs64(student)
    mixture = beta * p_t + (1 - beta) * p_s
    expected = beta * naive_kl(p_t, mixture) + (1 - beta) * naive_kl(p_s, mixture)
    assert_close_per_token(generalized_jsd(student, teacher, beta), expected, student, teacher)
    # symmetric JSD is bounded by log 2 (up to float32 error)
    error_bound = loss_roundings(11, 1) * UNIT_ROUNDOFF * 2 * log_prob_scale(student, teacher)
    assert (generalized_jsd(student, teacher, 0.5) <= math.log(2) + error_bound).all()


@pytest.mark.parametrize("skew", [0.1, 0.5])
def test_skew_kl_matches_naive_mixture_and_is_bounded(logits, skew):
    """DistiLLM: skew forward KL = KL(p_t ‖ α p_t + (1−α) p_s), skew reverse KL = KL(p_s ‖ α p_s +
    (1−α) p_t); each is at most log(1/α), even against a teacher that gives a token ~0, where
    plain reverse KL grows without bound."""
    student, teacher = logits
    p_t, p_s = probs64(teacher), probs64(student)
    assert_close_per_token(skew_forward_kl(student, teacher, skew),
                           naive_kl(p_t, skew * p_t + (1 - skew) * p_s), student, teacher)
    assert_close_per_token(skew_reverse_kl(student, teacher, skew),
                           naive_kl(p_s, skew * p_s + (1 - skew) * p_t), student, teacher)
    confident = teacher.clone()
    confident[:, 0] = -60.0  # p_t ≈ 1e-26 where the student puts real mass
    student = student.clone()
    student[:, 0] = 8.0
    error_bound = loss_roundings(11, 1) * UNIT_ROUNDOFF * 2 * log_prob_scale(student, confident)
    assert (skew_reverse_kl(student, confident, skew) <= math.log(1 / skew) + error_bound).all()
    assert (reverse_kl(student, confident) > 40).all()  # the unbounded plain reverse KL
    assert torch.equal(distillation_loss(student, confident, "skew_reverse", skew=skew),
                       skew_reverse_kl(student, confident, skew))
    with pytest.raises(ValueError, match="skew"):
        skew_reverse_kl(student, teacher, 0.0)


def test_temperature_softens_and_scales_by_t_squared(logits):
    student, teacher = logits
    temperature = 2.0
    soft = naive_kl(probs64(teacher, temperature), probs64(student, temperature))
    loss = distillation_loss(student, teacher, "forward", temperature=temperature)
    assert_close_per_token(loss, soft * temperature ** 2, student, teacher, temperature,
                           factor=temperature ** 2)


def test_float32_whatever_the_input_dtype(logits):
    student, teacher = logits
    loss = distillation_loss(student.bfloat16(), teacher.bfloat16(), "reverse")
    assert loss.dtype == torch.float32
    assert torch.equal(loss, reverse_kl(student.bfloat16().float(), teacher.bfloat16().float()))


def test_minus_inf_logits_give_no_nan(logits):
    student, teacher = logits
    teacher = teacher.clone()
    student = student.clone()
    teacher[:, -3:] = float("-inf")  # masked vocabulary entries in both models
    student[:, -3:] = float("-inf")
    for kind in ("forward", "reverse", "jsd"):
        loss = distillation_loss(student, teacher, kind)
        assert torch.isfinite(loss).all(), kind
    # equals the loss over the unmasked entries only
    expected = naive_kl(probs64(teacher[:, :-3]), probs64(student[:, :-3]))
    assert_close_per_token(forward_kl(student, teacher), expected, student, teacher)


def test_gradients_are_finite_with_masked_entries(logits):
    student, teacher = logits
    teacher = teacher.clone()
    teacher[:, 0] = float("-inf")
    student = student.clone().requires_grad_(True)
    distillation_loss(student, teacher, "forward").sum().backward()
    assert torch.isfinite(student.grad).all()


def masked_logits(logits, masked):
    student, teacher = (x.clone() for x in logits)
    teacher_columns, student_columns = MASKED_COLUMNS[masked]
    teacher[:, teacher_columns] = float("-inf")
    student[:, student_columns] = float("-inf")
    return student, teacher


@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("masked", list(MASKED_COLUMNS))
def test_minus_inf_logits_give_finite_gradients_equal_to_float64(logits, kind, masked):
    """A -inf logit is a token of probability 0: its terms are 0 (0·log 0 = 0), so are the
    gradients through them, and everything else is the loss over the other tokens."""
    temperature, beta = 0.7, 0.3
    student, teacher = masked_logits(logits, masked)
    student.requires_grad_()
    loss = distillation_loss(student, teacher, kind, temperature, beta)
    if is_infinite(kind, *MASKED_COLUMNS[masked]):
        assert torch.isposinf(loss).all()
        return
    (grad,) = torch.autograd.grad(loss.sum(), student)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    _, _, _, expected, expected_grad = kd_loss_float64(student, teacher, kind=kind,
                                                       temperature=temperature, beta=beta)
    assert_close_per_token(loss, expected, student, teacher, temperature, temperature ** 2)
    assert_close(grad, expected_grad, 2 * loss_roundings(11, 1), what="gradient")
    assert (grad[:, MASKED_COLUMNS[masked][1]] == 0).all()


@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("student_shift, teacher_shift", [(0, 0), (1000, 0), (0, -1000)])
def test_large_logits_and_shifts_keep_float32_precision(kind, student_shift, teacher_shift):
    """A softmax is unchanged by a constant added to a row's logits, so the loss and its
    gradient must be too, and as precise at logits of 1e4 and T = 0.05 (values of 2e5) as at small
    ones: the error budget depends on the log-probabilities, never on the logits' size."""
    temperature, generator = 0.05, torch.Generator().manual_seed(7)
    student = large_logits(generator, 6, 11, temperature)
    teacher = large_logits(generator, 6, 11, temperature)
    _, _, _, expected, expected_grad = kd_loss_float64(student, teacher, kind=kind,
                                                       temperature=temperature, beta=0.3)
    shifted = (student + student_shift).requires_grad_()
    loss = distillation_loss(shifted, teacher + teacher_shift, kind, temperature, beta=0.3)
    (grad,) = torch.autograd.grad(loss.sum(), shifted)
    assert_close_per_token(loss, expected, student, teacher, temperature, temperature ** 2)
    assert_close(grad, expected_grad, 2 * loss_roundings(11, 1), what="gradient")


def test_all_masked_batch_selects_nothing_and_sums_to_zero():
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    selected, targets = shift_for_next_token(logits, labels)
    assert selected.shape == (0, 7) and targets.shape == (0,)
    loss = distillation_loss(selected, selected, "forward").sum()
    assert loss.item() == 0.0 and not torch.isnan(loss)


def test_shift_for_next_token_pairs_logits_with_the_next_label():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    labels = torch.tensor([[-100, -100, 2, 1], [-100, 0, -100, -100]])
    selected, targets = shift_for_next_token(logits, labels)
    # row 0: positions 1 and 2 predict labels at 2 and 3; row 1: position 0 predicts label at 1
    assert torch.equal(selected, torch.stack([logits[0, 1], logits[0, 2], logits[1, 0]]))
    assert targets.tolist() == [2, 1, 0]


def test_padded_teacher_vocabulary_is_compared_over_real_ids_only(logits):
    """Extra embedding rows beyond the tokenizer must not leak into the distribution."""
    student, teacher = logits
    padded_teacher = torch.cat([teacher, torch.full((6, 5), 3.0)], dim=-1)  # junk in padded rows
    loss = distillation_loss(student, padded_teacher[:, :student.shape[-1]], "forward")
    expected = naive_kl(probs64(teacher), probs64(student))
    assert_close_per_token(loss, expected, student, teacher)
    with pytest.raises(RuntimeError):
        distillation_loss(student, padded_teacher, "forward")  # shapes must agree


def test_cross_entropy_matches_torch(logits):
    student, _ = logits
    targets = torch.tensor([0, 1, 2, 3, 4, 5])
    assert torch.equal(cross_entropy(student, targets),
                       F.cross_entropy(student, targets, reduction="none"))
    expected = -student.double().log_softmax(-1)[torch.arange(6), targets]
    assert_close(cross_entropy(student, targets), expected, loss_roundings(11, 1),
                 log_prob_scale(student), "cross-entropy")


def test_jsd_rejects_endpoints(logits):
    student, teacher = logits
    with pytest.raises(ValueError):
        generalized_jsd(student, teacher, beta=0.0)


def test_kd_objective_is_the_one_formula(logits):
    """(1 − α)·T²·D + α·CE, the same dense and against a top-K teacher that holds every token."""
    student, teacher = logits
    objective = KDObjective("forward", temperature=2.0, alpha=0.25)
    dense = objective.divergence(student, teacher)
    assert torch.equal(dense, distillation_loss(student, teacher, "forward", 2.0))
    teacher_log_probs = torch.log_softmax(teacher / 2.0, dim=-1)
    ids = teacher_log_probs.argsort(dim=-1, descending=True)
    sparse = objective.sparse_divergence(student, ids, teacher_log_probs.gather(-1, ids),
                                         torch.full((student.shape[0],), float("-inf")))
    expected = distillation_loss(student.double(), teacher.double(), "forward", 2.0)  # float64
    assert_close_per_token(sparse, expected, student, teacher, 2.0, 4.0)
    assert objective.combine(torch.tensor(2.0), torch.tensor(4.0)).item() == 0.75 * 2 + 0.25 * 4
    with pytest.raises(ValueError, match="sideways"):
        KDObjective("sideways")
    with pytest.raises(ValueError, match="forward KL only"):
        KDObjective("reverse").sparse_divergence(student, ids, teacher_log_probs, ids[:, 0] * 0.0)
