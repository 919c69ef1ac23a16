"""The shared loop: accumulation-invariant normalization, data order, checkpoints."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.chat import ChatEncoder, collate
from common.checkpoint import (check_output_dir, latest_checkpoint, list_checkpoints,
                               truncate_metrics)
from common.errors import UserError
from common.train import BatchOrder, backward_window, count_supervised
from examples.tiny_setup import toy_conversations


def make_accelerator(grad_accum):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradientAccumulationPlugin

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    plugin = GradientAccumulationPlugin(num_steps=grad_accum, sync_with_dataloader=False)
    return Accelerator(gradient_accumulation_plugin=plugin, cpu=True)


@pytest.fixture(scope="module")
def setup(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny / "student")
    encoder = ChatEncoder(tokenizer, 512)
    # replies of very different lengths, so micro-batches hold different token counts
    conversations = [row["messages"] for row in toy_conversations(8, seed=3)]
    conversations[0][1]["content"] = "a much longer reply " * 6
    examples = [encoder.encode(c) for c in conversations]
    teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher").eval().requires_grad_(False)
    return tokenizer, examples, teacher


def kd_loss_fn(teacher, vocab_size):
    from common.losses import distillation_loss, shift_for_next_token

    def loss_fn(student, batch):
        student_logits = student(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).logits
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).logits
        s, _ = shift_for_next_token(student_logits, batch["labels"])
        t, _ = shift_for_next_token(teacher_logits, batch["labels"])
        kd = distillation_loss(s[:, :vocab_size], t[:, :vocab_size], "forward")
        return kd.sum(), {"kd": kd.sum()}

    return loss_fn


def gradients(tiny, setup, micro_batches, grad_accum):
    tokenizer, examples, teacher = setup
    accelerator = make_accelerator(grad_accum)
    student = AutoModelForCausalLM.from_pretrained(tiny / "student")
    student = accelerator.prepare(student)
    size = len(examples) // micro_batches
    window = [collate(examples[i * size:(i + 1) * size], tokenizer.pad_token_id)
              for i in range(micro_batches)]
    sums, tokens = backward_window(accelerator, student, window,
                                   kd_loss_fn(teacher, len(tokenizer)))
    return {name: p.grad.clone() for name, p in student.named_parameters()}, sums, tokens, window


def test_one_by_eight_equals_two_by_four(tiny, setup):
    grads_1x8, sums_1x8, tokens_1x8, _ = gradients(tiny, setup, 1, 1)
    grads_2x4, sums_2x4, tokens_2x4, window = gradients(tiny, setup, 2, 2)
    counts = [int(count_supervised(b)) for b in window]
    assert counts[0] != counts[1], "the test needs micro-batches of unequal token counts"
    assert int(tokens_1x8) == int(tokens_2x4) == sum(counts)
    assert torch.allclose(sums_1x8["loss"], sums_2x4["loss"], rtol=1e-5)
    for name in grads_1x8:
        assert torch.allclose(grads_1x8[name], grads_2x4[name], rtol=1e-4, atol=1e-7), name
    # Negative control: averaging each micro-batch separately (the common bug) would differ.
    _, examples, teacher = setup
    tokenizer = setup[0]
    student = AutoModelForCausalLM.from_pretrained(tiny / "student")
    loss_fn = kd_loss_fn(teacher, len(tokenizer))
    for batch in window:
        loss_sum, _ = loss_fn(student, batch)
        (loss_sum / count_supervised(batch) / len(window)).backward()
    naive = {name: p.grad for name, p in student.named_parameters()}
    assert not all(torch.allclose(grads_1x8[n], naive[n], rtol=1e-4, atol=1e-7) for n in naive)


def test_batch_order_is_a_permutation_per_epoch_and_wraps():
    order = BatchOrder(num_examples=10, batch_size=4, seed=1)
    assert order.batches_per_epoch == 3
    first_epoch = [i for position in range(3) for i in order.indices(position)]
    assert sorted(first_epoch[:10]) == list(range(10))  # all examples once, then wrap-around
    assert first_epoch[10:] == first_epoch[:2]
    second_epoch = [i for position in range(3, 6) for i in order.indices(position)]
    assert second_epoch[:10] != first_epoch[:10]  # reshuffled
    assert BatchOrder(10, 4, seed=1).indices(4) == order.indices(4)  # position alone decides


def test_batch_order_splits_the_global_batch_across_processes():
    single = BatchOrder(num_examples=12, batch_size=4, seed=5)
    ranks = [BatchOrder(12, 2, num_processes=2, process_index=r, seed=5) for r in range(2)]
    for position in range(6):
        assert ranks[0].indices(position) + ranks[1].indices(position) == single.indices(position)


def test_group_by_length_keeps_a_permutation_and_cuts_padding():
    generator = torch.Generator().manual_seed(0)
    lengths = (torch.randn(3000, generator=generator) * 0.8 + 5).exp().long().add(1).tolist()
    plain = BatchOrder(len(lengths), batch_size=8, seed=3)
    grouped = BatchOrder(len(lengths), batch_size=8, seed=3, lengths=lengths)
    epoch = range(grouped.batches_per_epoch)
    rows = [i for position in epoch for i in grouped.indices(position)]
    assert sorted(rows[:len(lengths)]) == list(range(len(lengths)))
    assert BatchOrder(len(lengths), 8, seed=3, lengths=lengths).indices(7) == grouped.indices(7)
    ranks = [BatchOrder(len(lengths), 4, num_processes=2, process_index=r, seed=3,
                        lengths=lengths) for r in range(2)]
    assert all(ranks[0].indices(p) + ranks[1].indices(p) == grouped.indices(p) for p in epoch)

    def padding(order):
        batches = [[lengths[i] for i in order.indices(p)] for p in epoch]
        return sum(max(b) * len(b) - sum(b) for b in batches)

    assert padding(grouped) < 0.25 * padding(plain)
    # the order of lengths over the epoch stays shuffled, not longest first
    firsts = [lengths[grouped.indices(p)[0]] for p in epoch]
    assert firsts != sorted(firsts, reverse=True)


def write_checkpoint(root, name, step):
    path = root / "checkpoints" / name
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    return path


def test_checkpoints_are_found_by_their_state_not_their_name(tmp_path):
    write_checkpoint(tmp_path, "step_000010", 10)
    newest = write_checkpoint(tmp_path, "renamed", 30)
    write_checkpoint(tmp_path, ".tmp-step_000040", 40)  # half-written: ignored
    (tmp_path / "checkpoints" / "step_000050").mkdir()  # no state file: ignored
    assert [step for step, _ in list_checkpoints(tmp_path)] == [10, 30]
    assert latest_checkpoint(tmp_path) == newest


def test_output_dir_guard(tmp_path):
    check_output_dir(tmp_path / "new", resume=False, overwrite=False)  # fresh: fine
    write_checkpoint(tmp_path, "step_000010", 10)
    with pytest.raises(UserError, match="--resume"):
        check_output_dir(tmp_path, resume=False, overwrite=False)
    check_output_dir(tmp_path, resume=True, overwrite=False)
    (tmp_path / "run_config.json").write_text("{}")
    with pytest.raises(UserError, match="finished run"):
        check_output_dir(tmp_path, resume=True, overwrite=False)
    check_output_dir(tmp_path, resume=False, overwrite=True)


def test_truncate_metrics_drops_rows_after_the_checkpoint(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (5, 10, 15)] + ['{"step": 2']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    truncate_metrics(tmp_path, 10)
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10]


def test_evaluate_is_the_per_token_mean_over_held_out_examples(setup, tiny):
    """evaluate() with the chunked cross-entropy = a hand sum over single unpadded forwards, for
    any batch size; the all-masked filler that evens out processes adds nothing."""
    from common.distill import make_ce_loss_fn
    from common.train import evaluate

    tokenizer = AutoTokenizer.from_pretrained(tiny / "student")
    encoder = ChatEncoder(tokenizer, 512)
    examples = [encoder.encode(row["messages"]) for row in toy_conversations(7, seed=11)]
    student = AutoModelForCausalLM.from_pretrained(tiny / "student")
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            logits = student(torch.tensor([example["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(example["labels"][1:])
            keep = targets != -100
            total += torch.nn.functional.cross_entropy(
                logits[keep][:, :len(tokenizer)].double(), targets[keep], reduction="sum").item()
            count += int(keep.sum())
    accelerator = make_accelerator(1)
    loss_fn = make_ce_loss_fn(accelerator, len(tokenizer), loss_chunk_size=5)
    for batch_size in (1, 3, 8):
        means, tokens = evaluate(accelerator, student, examples, batch_size, loss_fn, collate,
                                 tokenizer.pad_token_id)
        assert tokens == count and means["loss"] == pytest.approx(total / count, rel=1e-5)
        assert means["ce"] == pytest.approx(means["loss"])
    assert student.training  # left in train mode
    filler = {**examples[0], "labels": [-100] * len(examples[0]["labels"])}
    means, tokens = evaluate(accelerator, student, examples + [filler], 4, loss_fn, collate,
                             tokenizer.pad_token_id)
    assert tokens == count and means["loss"] == pytest.approx(total / count, rel=1e-5)
