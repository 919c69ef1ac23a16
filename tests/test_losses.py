"""Loss properties against naive references."""

import math

import pytest
import torch
import torch.nn.functional as F

from common.losses import (cross_entropy, distillation_loss, forward_kl, generalized_jsd,
                           masked_mean, reverse_kl, shift_for_next_token)


def naive_kl(p, q):
    """Σ p log(p/q) with plain probabilities, in float64."""
    p, q = p.double(), q.double()
    return (p * (p.log() - q.log())).sum(-1)


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
        assert torch.allclose(loss, torch.zeros(6), atol=1e-6), kind


def test_forward_is_kl_teacher_student(logits):
    student, teacher = logits
    expected = naive_kl(teacher.softmax(-1), student.softmax(-1))
    assert torch.allclose(forward_kl(student, teacher).double(), expected, atol=1e-5)
    # and agrees with torch's kl_div, whose target is the teacher
    reference = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                         reduction="none").sum(-1)
    assert torch.allclose(forward_kl(student, teacher), reference, atol=1e-5)


def test_reverse_is_kl_student_teacher(logits):
    student, teacher = logits
    expected = naive_kl(student.softmax(-1), teacher.softmax(-1))
    assert torch.allclose(reverse_kl(student, teacher).double(), expected, atol=1e-5)


def test_directions_differ(logits):
    student, teacher = logits
    assert not torch.allclose(forward_kl(student, teacher), reverse_kl(student, teacher), atol=1e-3)
    # swapping the arguments swaps the direction
    assert torch.allclose(forward_kl(student, teacher), reverse_kl(teacher, student), atol=1e-6)


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
    p_t, p_s = teacher.softmax(-1).double(), student.softmax(-1).double()
    mixture = beta * p_t + (1 - beta) * p_s
    expected = beta * naive_kl(p_t, mixture) + (1 - beta) * naive_kl(p_s, mixture)
    assert torch.allclose(generalized_jsd(student, teacher, beta).double(), expected, atol=1e-5)
    # symmetric JSD is bounded by log 2
    assert (generalized_jsd(student, teacher, 0.5) <= math.log(2) + 1e-6).all()


def test_temperature_softens_and_scales_by_t_squared(logits):
    student, teacher = logits
    temperature = 2.0
    soft = naive_kl((teacher / temperature).softmax(-1), (student / temperature).softmax(-1))
    loss = distillation_loss(student, teacher, "forward", temperature=temperature)
    assert torch.allclose(loss.double(), soft * temperature ** 2, atol=1e-5)


def test_float32_whatever_the_input_dtype(logits):
    student, teacher = logits
    loss = distillation_loss(student.bfloat16(), teacher.bfloat16(), "reverse")
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, reverse_kl(student.bfloat16().float(), teacher.bfloat16().float()))


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
    assert torch.allclose(forward_kl(student, teacher), forward_kl(student[:, :-3], teacher[:, :-3]),
                          atol=1e-6)


def test_gradients_are_finite_with_masked_entries(logits):
    student, teacher = logits
    teacher = teacher.clone()
    teacher[:, 0] = float("-inf")
    student = student.clone().requires_grad_(True)
    distillation_loss(student, teacher, "forward").sum().backward()
    assert torch.isfinite(student.grad).all()


def test_masked_mean_all_masked_is_zero_not_nan():
    values = torch.tensor([1.0, 2.0, 3.0])
    assert masked_mean(values, torch.zeros(3, dtype=torch.bool)).item() == 0.0
    assert masked_mean(values, torch.tensor([True, False, True])).item() == pytest.approx(2.0)


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
    assert torch.allclose(loss, forward_kl(student, teacher))
    with pytest.raises(RuntimeError):
        distillation_loss(student, padded_teacher, "forward")  # shapes must agree


def test_cross_entropy_matches_torch(logits):
    student, _ = logits
    targets = torch.tensor([0, 1, 2, 3, 4, 5])
    assert torch.allclose(cross_entropy(student, targets),
                          F.cross_entropy(student, targets, reduction="none"))


def test_jsd_rejects_endpoints(logits):
    student, teacher = logits
    with pytest.raises(ValueError):
        generalized_jsd(student, teacher, beta=0.0)
