"""The memory-bounded KD loss equals the full-logits one, in values and gradients, and never makes a
(positions x vocabulary) tensor; make_kd_loss_fn uses it only where the output layer is plain."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from common.chunked import auto_chunk_size, chunked_kd_loss
from common.errors import UserError
from common.losses import KL_KINDS, cross_entropy, distillation_loss, shift_for_next_token
from float32_error import (MASKED_COLUMNS, assert_close, decoder_roundings, is_infinite,
                           kd_loss_float64, large_logits, loss_roundings, stat_scales)

NUM_POSITIONS, HIDDEN, TEACHER_HIDDEN, VOCAB = 23, 12, 20, 97


def naive_loss(student_hidden, student_weight, student_bias, teacher_logits, target_ids,
               vocab_size, kind, temperature, beta, alpha):
    """The full-logits path: what common/distill.py computes without chunking. Given float64
    inputs it runs in float64 and is the reference the float32 results are held to."""
    student_logits = F.linear(student_hidden, student_weight, student_bias)[:, :vocab_size]
    kd = distillation_loss(student_logits, teacher_logits[:, :vocab_size], kind, temperature, beta)
    ce = cross_entropy(student_logits, target_ids)
    return (1.0 - alpha) * kd.sum() + alpha * ce.sum(), kd.sum(), ce.sum()


def float64_copy(inputs):
    """The inputs in float64, as new leaves that require grad where the originals do."""
    return {name: value.detach().double().requires_grad_(value.requires_grad)
            if value is not None and value.is_floating_point() else value
            for name, value in inputs.items()}


def make_inputs(seed=0, num_positions=NUM_POSITIONS, student_rows=VOCAB, teacher_rows=VOCAB,
                bias=False):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    return {
        "student_hidden": randn(num_positions, HIDDEN).requires_grad_(),
        "student_weight": randn(student_rows, HIDDEN, scale=0.5).requires_grad_(),
        "student_bias": randn(student_rows).requires_grad_() if bias else None,
        "teacher_hidden": randn(num_positions, TEACHER_HIDDEN),
        "teacher_weight": randn(teacher_rows, TEACHER_HIDDEN, scale=0.5),
        "target_ids": torch.randint(0, VOCAB, (num_positions,), generator=generator),
    }


def grads_of(loss, inputs, grad_scale=1.0):
    params = [inputs[name] for name in ("student_hidden", "student_weight", "student_bias")
              if inputs[name] is not None]
    return torch.autograd.grad(loss * grad_scale, params)


def check_against_naive(inputs, kind="forward", temperature=1.0, beta=0.5, alpha=0.0,
                        chunk_size=5, vocab_size=VOCAB, teacher_as_logits=False):
    """The chunked loss in float32 against the full-logits loss in float64, values and gradients."""
    teacher_logits = F.linear(inputs["teacher_hidden"], inputs["teacher_weight"])
    settings = {"kind": kind, "temperature": temperature, "beta": beta, "alpha": alpha}
    reference = float64_copy(inputs)
    reference_teacher_logits = F.linear(reference["teacher_hidden"], reference["teacher_weight"])
    expected = dict(zip(("loss", "kd", "ce"), naive_loss(
        reference["student_hidden"], reference["student_weight"], reference["student_bias"],
        reference_teacher_logits, reference["target_ids"], vocab_size, **settings)))
    teacher = ({"teacher_logits": teacher_logits} if teacher_as_logits else
               {"teacher_hidden": inputs["teacher_hidden"],
                "teacher_weight": inputs["teacher_weight"]})
    loss, stats = chunked_kd_loss(inputs["student_hidden"], inputs["student_weight"],
                                  inputs["target_ids"], vocab_size,
                                  student_bias=inputs["student_bias"], chunk_size=chunk_size,
                                  **teacher, **settings)
    num_positions = inputs["target_ids"].shape[0]
    student_logits = F.linear(reference["student_hidden"], reference["student_weight"],
                              reference["student_bias"])[:, :vocab_size]
    scales = stat_scales(student_logits, reference_teacher_logits[:, :vocab_size], num_positions,
                         temperature, alpha)
    # Forward: an output layer (its hidden size) and the loss. The gradients add the way back:
    # the loss's closed-form gradient, the student's output layer, and the matmul that sums it over
    # positions (weight) or the vocabulary (hidden states).
    output_layer = max(HIDDEN, TEACHER_HIDDEN)
    forward = output_layer + loss_roundings(vocab_size, num_positions)
    backward = forward + loss_roundings(vocab_size, num_positions) + HIDDEN + max(
        num_positions, vocab_size)
    for name, value in (("loss", loss), *stats.items()):
        assert_close(value, expected[name], forward, scales[name], name)
    assert not stats["kd"].requires_grad and not stats["ce"].requires_grad
    # a scale on the way back (the loop's 1 / tokens) must reach every gradient
    for got, want in zip(grads_of(loss, inputs, 0.37), grads_of(expected["loss"], reference, 0.37)):
        assert_close(got, want, backward, what="gradient")
    return loss


@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.0), (2.0, 0.3), (0.7, 1.0)])
def test_values_and_gradients_equal_the_naive_loss(kind, temperature, alpha):
    check_against_naive(make_inputs(), kind, temperature, beta=0.3, alpha=alpha)


@pytest.mark.parametrize("chunk_size", [1, 4, NUM_POSITIONS, NUM_POSITIONS + 10, 0])
def test_any_chunk_size_gives_the_same_result(chunk_size):
    # 4 does not divide 23; 0 = automatic (one chunk here)
    check_against_naive(make_inputs(seed=1), "jsd", chunk_size=chunk_size, alpha=0.5)


def test_padded_vocabularies_compare_real_ids_only():
    inputs = make_inputs(seed=2, student_rows=VOCAB + 3, teacher_rows=VOCAB + 11)
    check_against_naive(inputs, "forward", alpha=0.2)
    loss, _ = chunked_kd_loss(inputs["student_hidden"], inputs["student_weight"],
                              inputs["target_ids"], VOCAB, teacher_hidden=inputs["teacher_hidden"],
                              teacher_weight=inputs["teacher_weight"])
    (weight_grad,) = torch.autograd.grad(loss, inputs["student_weight"])
    assert weight_grad[VOCAB:].abs().max() == 0  # padded rows are in no distribution


def test_ready_teacher_logits_and_a_biased_output_layer():
    inputs = make_inputs(seed=3, teacher_rows=VOCAB + 5, bias=True)
    check_against_naive(inputs, "reverse", temperature=1.5, alpha=0.4, teacher_as_logits=True)
    check_against_naive(inputs, "jsd", chunk_size=7)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_teacher_logits_of_minus_infinity_give_no_nan(kind):
    inputs = make_inputs(seed=5)
    teacher_logits = F.linear(inputs["teacher_hidden"], inputs["teacher_weight"])
    teacher_logits[:, :7] = float("-inf")  # a masked part of the vocabulary
    settings = {"kind": kind, "temperature": 1.5, "beta": 0.5, "alpha": 0.2}
    reference = float64_copy(inputs)
    expected, _, _ = naive_loss(reference["student_hidden"], reference["student_weight"], None,
                                teacher_logits.double(), inputs["target_ids"], VOCAB, **settings)
    loss, _ = chunked_kd_loss(inputs["student_hidden"], inputs["student_weight"],
                              inputs["target_ids"], VOCAB, teacher_logits=teacher_logits,
                              chunk_size=6, **settings)
    if kind == "reverse":  # the student puts mass where the teacher has none: infinite, as naive
        assert torch.isinf(loss) and torch.isinf(expected)
        return
    student_logits = F.linear(reference["student_hidden"], reference["student_weight"])
    scale = stat_scales(student_logits, teacher_logits, NUM_POSITIONS, 1.5, 0.2)["loss"]
    forward = HIDDEN + loss_roundings(VOCAB, NUM_POSITIONS)
    assert torch.isfinite(loss)
    assert_close(loss, expected, forward, scale, "loss")
    for got, want in zip(grads_of(loss, inputs), grads_of(expected, reference)):
        assert torch.isfinite(got).all()
        assert_close(got, want, 2 * forward + VOCAB, what="gradient")


def chunked_on_exact_logits(student_logits, teacher_logits, target_ids, student_bias=None,
                            **settings):
    """chunked_kd_loss whose student logits are exactly student_logits (+ student_bias): one-hot
    hidden states pick one column of the weight each, so the output layer only adds zeros, and
    d loss / d weight is d loss / d logits transposed. Returns (loss, stats, d loss / d logits)."""
    num_positions, vocab = student_logits.shape
    weight = student_logits.T.contiguous().requires_grad_()
    loss, stats = chunked_kd_loss(torch.eye(num_positions), weight, target_ids, vocab,
                                  student_bias=student_bias, teacher_logits=teacher_logits,
                                  chunk_size=3, **settings)
    (grad,) = torch.autograd.grad(loss, weight)
    return loss, stats, grad.T


def assert_chunked_matches_float64(got, student_logits, teacher_logits, target_ids, **settings):
    """got = chunked_on_exact_logits(...) within float32 error of kd_loss_float64: exact logits
    into the loss (plus a bias add), then the way back through the loss."""
    loss, stats, grad = got
    expected_loss, expected_kd, expected_ce, _, expected_grad = kd_loss_float64(
        student_logits, teacher_logits, target_ids, **settings)
    num_positions, vocab = student_logits.shape
    scales = stat_scales(student_logits, teacher_logits, num_positions,
                         settings["temperature"], settings["alpha"])
    forward = 1 + loss_roundings(vocab, num_positions)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close(loss, expected_loss, forward, scales["loss"], "loss")
    assert_close(stats["kd"], expected_kd, forward, scales["kd"], "kd")
    assert_close(stats["ce"], expected_ce, forward, scales["ce"], "ce")
    assert_close(grad, expected_grad, 2 * forward, what="gradient")


@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("masked", list(MASKED_COLUMNS))
def test_minus_inf_logits_give_finite_gradients_equal_to_float64(kind, masked):
    """As on the full-logits path (tests/test_losses.py): a -inf logit, the teacher's or the
    student's (here through the output layer's bias), is a token of probability 0."""
    generator = torch.Generator().manual_seed(6)
    student_logits = torch.randn(8, 11, generator=generator) * 2
    teacher_logits = torch.randn(8, 11, generator=generator) * 2
    teacher_columns, student_columns = MASKED_COLUMNS[masked]
    teacher_logits[:, teacher_columns] = float("-inf")
    bias = torch.zeros(11)
    bias[student_columns] = float("-inf")
    target_ids = torch.randint(2, 8, (8,), generator=generator)  # never a masked column
    settings = {"kind": kind, "temperature": 0.7, "beta": 0.3, "alpha": 0.2}
    got = chunked_on_exact_logits(student_logits, teacher_logits, target_ids, bias, **settings)
    if is_infinite(kind, teacher_columns, student_columns):
        assert torch.isposinf(got[0]) and torch.isposinf(got[1]["kd"])
        return
    assert_chunked_matches_float64(got, student_logits + bias, teacher_logits, target_ids,
                                   **settings)
    assert (got[2][:, student_columns] == 0).all()


@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("student_shift, teacher_shift", [(0, 0), (1000, 0), (0, -1000)])
def test_large_logits_and_shifts_keep_float32_precision(kind, student_shift, teacher_shift):
    """As on the full-logits path (tests/test_losses.py): at logits of 1e4 and T = 0.05, and with
    a constant added to every student logit (through the bias) or every teacher logit, the loss,
    both statistics and the gradient stay within float32 error of float64 on the unshifted
    logits."""
    temperature, generator = 0.05, torch.Generator().manual_seed(8)
    student_logits = large_logits(generator, 8, 11, temperature)
    teacher_logits = large_logits(generator, 8, 11, temperature)
    target_ids = torch.randint(0, 11, (8,), generator=generator)
    settings = {"kind": kind, "temperature": temperature, "beta": 0.3, "alpha": 0.3}
    got = chunked_on_exact_logits(student_logits, teacher_logits + teacher_shift, target_ids,
                                  torch.full((11,), float(student_shift)), **settings)
    assert_chunked_matches_float64(got, student_logits, teacher_logits, target_ids, **settings)


def test_all_masked_batch_is_zero_with_zero_gradients():
    inputs = make_inputs(num_positions=0)
    loss, stats = chunked_kd_loss(inputs["student_hidden"], inputs["student_weight"],
                                  inputs["target_ids"], VOCAB, alpha=0.5,
                                  teacher_hidden=inputs["teacher_hidden"],
                                  teacher_weight=inputs["teacher_weight"])
    assert loss.item() == 0.0 and stats["kd"].item() == 0.0 and stats["ce"].item() == 0.0
    hidden_grad, weight_grad = grads_of(loss, inputs)
    assert hidden_grad.shape == (0, HIDDEN) and weight_grad.abs().max() == 0


def test_low_precision_matmul_stays_close_and_returns_float32_weight_gradients():
    inputs = make_inputs(seed=4)
    expected, _, _ = naive_loss(inputs["student_hidden"], inputs["student_weight"], None,
                                F.linear(inputs["teacher_hidden"], inputs["teacher_weight"]),
                                inputs["target_ids"], VOCAB, "forward", 1.0, 0.5, 0.0)
    loss, _ = chunked_kd_loss(inputs["student_hidden"], inputs["student_weight"],
                              inputs["target_ids"], VOCAB, teacher_hidden=inputs["teacher_hidden"],
                              teacher_weight=inputs["teacher_weight"], chunk_size=4,
                              compute_dtype=torch.bfloat16, teacher_compute_dtype=torch.bfloat16)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, expected, rtol=0.05)
    hidden_grad, weight_grad = grads_of(loss, inputs)
    assert weight_grad.dtype == hidden_grad.dtype == torch.float32


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


def test_no_positions_by_vocabulary_tensor_is_ever_made():
    num_positions, chunk_size, vocab = 64, 8, 1000
    inputs = make_inputs(num_positions=num_positions, student_rows=vocab, teacher_rows=vocab)
    inputs["target_ids"] = inputs["target_ids"] % vocab
    with LargestTensor() as largest:
        loss, _ = chunked_kd_loss(inputs["student_hidden"], inputs["student_weight"],
                                  inputs["target_ids"], vocab, kind="jsd", alpha=0.5,
                                  teacher_hidden=inputs["teacher_hidden"],
                                  teacher_weight=inputs["teacher_weight"], chunk_size=chunk_size)
        loss.backward()
    # the largest things alive are one chunk's logits (the jsd stacks two) and the weight's
    # gradient, far below the (64, 1000) of full logits
    assert largest.numel <= max(2 * chunk_size * vocab, vocab * TEACHER_HIDDEN)
    assert largest.numel < num_positions * vocab / 3


def test_second_backward_is_refused():
    inputs = make_inputs()
    loss, _ = chunked_kd_loss(inputs["student_hidden"], inputs["student_weight"],
                              inputs["target_ids"], VOCAB, teacher_hidden=inputs["teacher_hidden"],
                              teacher_weight=inputs["teacher_weight"])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


def test_auto_chunk_size_keeps_a_chunk_of_logits_near_128_mib():
    assert auto_chunk_size(128_256) == 256
    assert auto_chunk_size(32_000) == 1048
    assert auto_chunk_size(10**9) == 1
    for vocab in (32_000, 128_256, 151_936):
        assert 64 * 2**20 <= auto_chunk_size(vocab) * vocab * 4 <= 256 * 2**20


# --- make_kd_loss_fn: the chunked path against the full-logits path on real HF models ---------

def make_accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(cpu=True)


def tiny_llama(hidden, layers, vocab, seed, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(config)


def tiny_batch(vocab, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (3, 14), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 10:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :6] = -100  # the prompt
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def step(loss_fn, student, batch):
    student.zero_grad(set_to_none=True)
    loss, stats = loss_fn(student, batch)
    loss.backward()
    return loss.detach(), stats, {n: p.grad.clone() for n, p in student.named_parameters()}


def float64_reference(accelerator, teacher, student, vocab, batch, **settings):
    """The full-logits path on float64 copies of both models: (loss, stats, gradients) of `step`,
    and the sizes of what the statistics sum."""
    from common.distill import make_kd_loss_fn

    teacher, student = copy.deepcopy(teacher).double(), copy.deepcopy(student).double()
    expected = step(make_kd_loss_fn(accelerator, teacher, vocab, **settings, loss_chunk_size=-1),
                    student, batch)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        student_logits, targets = shift_for_next_token(student(**inputs).logits, batch["labels"])
        teacher_logits, _ = shift_for_next_token(teacher(**inputs).logits, batch["labels"])
    scales = stat_scales(student_logits[:, :vocab], teacher_logits[:, :vocab], targets.shape[0],
                         settings.get("temperature", 1.0), settings.get("alpha", 0.0))
    return expected, scales


def assert_matches_float64(got, reference, teacher, student, vocab, batch):
    """A float32 `step` result within float32 error of the float64 reference: the budget counts
    both models' forward paths into the loss; the way back retraces the student's path and the
    loss, and each weight's gradient is a sum over the batch's tokens."""
    expected, scales = reference
    seq_len = batch["input_ids"].shape[1]
    num_positions = int((batch["labels"][:, 1:] != -100).sum())
    teacher_path = decoder_roundings(teacher.config, seq_len)
    student_path = decoder_roundings(student.config, seq_len)
    loss_path = loss_roundings(vocab, num_positions)
    forward = teacher_path + student_path + loss_path
    backward = forward + student_path + loss_path + batch["input_ids"].numel()
    assert_close(got[0], expected[0], forward, scales["loss"], "loss")
    for name in ("kd", "ce"):
        assert_close(got[1][name], expected[1][name], forward, scales[name], name)
    for name, grad in expected[2].items():
        assert_close(got[2][name], grad, backward, what=f"gradient of {name}")


@pytest.mark.parametrize("kl, temperature, alpha, tie", [
    ("forward", 1.0, 0.0, False), ("reverse", 2.0, 0.2, True), ("jsd", 1.0, 0.5, False)])
def test_make_kd_loss_fn_chunked_equals_full_logits(kl, temperature, alpha, tie):
    """Both paths, in float32, within float32 error of the full-logits path in float64."""
    from common.distill import make_kd_loss_fn

    vocab = 61
    teacher = tiny_llama(32, 2, vocab + 3, seed=1).eval().requires_grad_(False)  # padded rows
    student = tiny_llama(16, 1, vocab, seed=2, tie=tie)
    batch = tiny_batch(vocab)
    accelerator = make_accelerator()
    settings = dict(kl=kl, temperature=temperature, beta=0.3, alpha=alpha)
    reference = float64_reference(accelerator, teacher, student, vocab, batch, **settings)
    for loss_chunk_size in (-1, 4):
        got = step(make_kd_loss_fn(accelerator, teacher, vocab, **settings,
                                   loss_chunk_size=loss_chunk_size), student, batch)
        assert_matches_float64(got, reference, teacher, student, vocab, batch)
    assert student.get_output_embeddings().forward.__func__ is torch.nn.Linear.forward


def test_logit_scaling_commutes_with_the_output_layer_so_chunking_stays_exact():
    """Granite divides its logits by logits_scaling; through the pass-through that division lands
    on the hidden states, and the output layer of those gives the model's logits: no fallback."""
    from transformers import GraniteConfig, GraniteForCausalLM

    from common.distill import make_kd_loss_fn, why_output_layer_is_not_plain

    vocab = 61
    torch.manual_seed(3)
    student = GraniteForCausalLM(GraniteConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, logits_scaling=4.0))
    teacher = tiny_llama(32, 1, vocab, seed=4).eval().requires_grad_(False)
    batch = tiny_batch(vocab)
    assert why_output_layer_is_not_plain(student, batch["input_ids"],
                                         batch["attention_mask"]) is None
    accelerator = make_accelerator()
    reference = float64_reference(accelerator, teacher, student, vocab, batch)
    for loss_chunk_size in (4, -1):
        got = step(make_kd_loss_fn(accelerator, teacher, vocab, loss_chunk_size=loss_chunk_size),
                   student, batch)
        assert_matches_float64(got, reference, teacher, student, vocab, batch)


def soft_capped_llama(vocab):
    from transformers import LlamaForCausalLM

    class SoftCappedLlama(LlamaForCausalLM):
        """Caps its logits after the output layer, with no config field saying so."""

        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = 2.0 * torch.tanh(output.logits / 2.0)
            return output

    base = tiny_llama(16, 1, vocab, seed=5)
    model = SoftCappedLlama(base.config)
    model.load_state_dict(base.state_dict())
    return model


def test_capped_logits_fall_back_to_the_full_path_with_one_warning(capsys):
    from transformers import Gemma2Config

    from common.distill import make_kd_loss_fn, why_output_layer_is_not_plain

    vocab = 61
    student = soft_capped_llama(vocab)
    teacher = tiny_llama(32, 1, vocab, seed=4).eval().requires_grad_(False)
    batch = tiny_batch(vocab)
    assert "transformation" in why_output_layer_is_not_plain(student, batch["input_ids"],
                                                             batch["attention_mask"])
    accelerator = make_accelerator()
    student.train()
    loss_fn = make_kd_loss_fn(accelerator, teacher, vocab, loss_chunk_size=4)
    first, second = step(loss_fn, student, batch), step(loss_fn, student, batch)
    full = step(make_kd_loss_fn(accelerator, teacher, vocab, loss_chunk_size=-1), student, batch)
    assert torch.equal(first[0], full[0]) and torch.equal(second[0], full[0])
    assert capsys.readouterr().out.count("warning: the student's output layer") == 1
    assert student.training  # the probe put it back in training mode

    # a declared soft cap is refused from the config alone (small logits could pass the probe)
    class Declared(torch.nn.Module):
        config = Gemma2Config(final_logit_softcapping=30.0)

        def get_output_embeddings(self):
            return torch.nn.Linear(4, 4)

    assert "soft-caps" in why_output_layer_is_not_plain(Declared(), None, None)


def test_sharded_weights_take_the_full_logits_path(monkeypatch, capsys):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    import common.distill as distill

    vocab = 61
    teacher = tiny_llama(32, 1, vocab, seed=1).eval().requires_grad_(False)
    student = tiny_llama(16, 1, vocab, seed=2)
    batch = tiny_batch(vocab)
    accelerator = make_accelerator()
    full = step(distill.make_kd_loss_fn(accelerator, teacher, vocab, loss_chunk_size=-1),
                student, batch)
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda _: DistributedType.FSDP))

    def refuse(*args, **kwargs):
        raise AssertionError("sharded weights must not reach the chunked loss")

    monkeypatch.setattr(distill, "chunked_kd_loss", refuse)
    sharded = step(distill.make_kd_loss_fn(accelerator, teacher, vocab), student, batch)
    assert torch.equal(sharded[0], full[0])
    assert "--loss-chunk-size has no effect" in capsys.readouterr().out


def test_loss_chunk_size_is_validated():
    from on_policy import OnPolicyArguments
    from token_level import TokenLevelArguments

    for arguments in (TokenLevelArguments, OnPolicyArguments):
        assert arguments().loss_chunk_size == 0
        arguments(loss_chunk_size=-1)
        with pytest.raises(UserError, match="--loss-chunk-size"):
            arguments(loss_chunk_size=-2)


def test_bf16_mixed_precision_keeps_the_chunked_path(tiny, capsys):
    """Under accelerate's bf16 autocast the output-layer probe must still accept a plain Llama
    head (a reference rebuilt in float32 would never match bf16 logits), and the chunked
    cross-entropy must follow the full-logits one within bf16 precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.chat import ChatEncoder, collate
    from common.distill import make_ce_loss_fn
    from examples.tiny_setup import toy_conversations

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    tokenizer = AutoTokenizer.from_pretrained(tiny / "student")
    encoder = ChatEncoder(tokenizer, 256)
    batch = collate([encoder.encode(row["messages"]) for row in toy_conversations(4, seed=2)],
                    tokenizer.pad_token_id)
    model = accelerator.prepare(AutoModelForCausalLM.from_pretrained(tiny / "student"))
    losses = {}
    for chunk_size in (-1, 4):
        loss, _ = make_ce_loss_fn(accelerator, len(tokenizer), chunk_size)(model, batch)
        losses[chunk_size] = loss.item()
    assert "output layer" not in capsys.readouterr().out  # no fallback warning
    assert losses[4] == pytest.approx(losses[-1], rel=2e-2)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
