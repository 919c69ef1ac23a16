"""The shared loop: accumulation-invariant normalization, data order, checkpoints."""

import json
import os
import shutil

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


# --- the output directory: --overwrite, leftovers, unwritable places ------------------------------

def fake_finished_run(out, exported=("config.json", "model.safetensors", "tokenizer.json")):
    """What a finished run leaves: checkpoints, metrics, the exported student and its record."""
    write_checkpoint(out, "step_000002", 2)
    (out / "checkpoints" / ".tmp-step_000004").mkdir()
    (out / "metrics.jsonl").write_text('{"step": 2}\n')
    for name in exported:
        (out / name).write_text("exported")
    (out / "run_config.json").write_text(json.dumps({"finished": True, "files": list(exported)}))


USER_FILES = {"my_data.jsonl": '{"messages": []}\n', "notes.txt": "mine", "settings.json": "{}",
              "my_completions.jsonl": '{"id": "x"}\n', "teacher_completions.jsonl": "{}\n"}


def test_overwrite_removes_only_what_the_suite_wrote(tmp_path):
    from common.checkpoint import clear_output_dir

    fake_finished_run(tmp_path, exported=("config.json", "model.safetensors", "tokenizer.model"))
    for name, content in USER_FILES.items():
        (tmp_path / name).write_text(content)
    (tmp_path / "my_cache").mkdir()  # e.g. a --teacher-cache the user put here
    (tmp_path / "my_cache" / "meta.json").write_text("{}")
    (tmp_path / "checkpoints" / "my_notes.txt").write_text("mine too")

    kept = clear_output_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*USER_FILES, "my_cache", "checkpoints"])
    assert all((tmp_path / name).read_text() == content for name, content in USER_FILES.items())
    assert (tmp_path / "my_cache" / "meta.json").is_file()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["my_notes.txt"]
    assert sorted(kept) == sorted([*USER_FILES, "my_cache", "checkpoints/my_notes.txt"])


def test_overwrite_reads_only_plain_names_from_the_record(tmp_path):
    from common.checkpoint import clear_output_dir

    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "outside.txt").write_text("mine")
    (out / "run_config.json").write_text(json.dumps({"files": ["../outside.txt", "a/b"]}))
    clear_output_dir(out)
    assert (tmp_path / "outside.txt").read_text() == "mine"


def test_overwrite_of_an_older_output_removes_the_names_save_pretrained_writes(tmp_path):
    """run_config.json without a list of files (written before it had one): the export's names
    are the ones save_pretrained and the tokenizer write, and a user's files still stay."""
    from common.checkpoint import clear_output_dir

    for name in ("config.json", "model-00001-of-00002.safetensors", "merges.txt", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "run_config.json").write_text('{"finished": true}')
    assert clear_output_dir(tmp_path) == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_leftovers_of_a_killed_checkpoint_write_are_removed(tmp_path):
    from common.checkpoint import remove_leftovers

    write_checkpoint(tmp_path, "step_000002", 2)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_000006").mkdir()
    (root / ".tmp-step_000006" / "model.safetensors").write_text("half")
    (root / "step_000008").mkdir()  # empty
    # killed between the two renames of a rewrite of step 4: the old copy is the checkpoint
    write_checkpoint(tmp_path, ".old-step_000004", 4)
    (root / ".tmp-step_000004").mkdir()
    write_checkpoint(tmp_path, "my_backup", 1)  # not a name this suite writes
    (tmp_path / ".tmp-export").mkdir()
    (tmp_path / ".run_config.json.tmp").write_text("{")
    (tmp_path / ".my_hidden").write_text("mine")

    remove_leftovers(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["my_backup", "step_000002", "step_000004"]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1, 2, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".my_hidden", "checkpoints"]


def test_output_dir_inside_a_file_or_read_only_is_refused_before_any_work(tmp_path,
                                                                          monkeypatch):
    (tmp_path / "a_file").write_text("x")
    for path in (tmp_path / "a_file", tmp_path / "a_file" / "out"):
        with pytest.raises(UserError, match="a_file.*a file; pass a directory") as error:
            check_output_dir(path, resume=False, overwrite=True)
        assert "\n" not in str(error.value)
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    # root writes anyway; report what access(2) says for the mode bits, as for any other user
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: real_access(path, mode) and not (
        mode & os.W_OK and not os.stat(path).st_mode & 0o222))
    for path in (read_only, read_only / "new" / "out"):
        with pytest.raises(UserError, match="read_only is read-only"):
            check_output_dir(path, resume=False, overwrite=False)
    assert list(read_only.iterdir()) == []


def test_an_unfinished_run_without_checkpoints_needs_resume_or_overwrite(tmp_path):
    """A run killed before its first checkpoint leaves metrics.jsonl: a plain rerun would append
    a second run's rows to it."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserError, match="unfinished run.*--resume.*--overwrite"):
        check_output_dir(tmp_path, resume=False, overwrite=False)
    check_output_dir(tmp_path, resume=True, overwrite=False)
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "checkpoints" / "step_000005").mkdir(parents=True)  # a checkpoint, damaged
    with pytest.raises(UserError, match="unfinished run"):
        check_output_dir(tmp_path, resume=False, overwrite=False)


# --- damaged checkpoints and changed settings -----------------------------------------------------

def sized_checkpoint(root, name, step, files):
    path = write_checkpoint(root, name, step)
    for file, content in files.items():
        (path / file).write_bytes(content)
    state = {"step": step, "files": {file: len(content) for file, content in files.items()}}
    (path / "trainer_state.json").write_text(json.dumps(state))
    return path


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    from common.checkpoint import resumable_checkpoint

    files = {"model.safetensors": b"m" * 100, "optimizer.bin": b"o" * 50}
    older = sized_checkpoint(tmp_path, "step_000002", 2, files)
    newer = sized_checkpoint(tmp_path, "step_000004", 4, files)
    (tmp_path / "checkpoints" / "my_stuff").mkdir()  # not a checkpoint: no warning about it
    assert resumable_checkpoint(tmp_path, log=None)[0] == newer
    for damage in ("model.safetensors", "optimizer.bin", "trainer_state.json"):
        (newer / damage).write_bytes((newer / damage).read_bytes()[:7])
        warnings = []
        path, state = resumable_checkpoint(tmp_path, log=warnings.append)
        assert path == older and state["step"] == 2
        assert len(warnings) == 1 and damage in warnings[0] and "step 2" in warnings[0]
        sized_checkpoint(tmp_path, "repaired", 4, files)  # restore it for the next damage
        shutil.rmtree(newer)
        (tmp_path / "checkpoints" / "repaired").rename(newer)
    (older / "optimizer.bin").unlink()
    (newer / "trainer_state.json").write_text("[1, 2]")  # JSON, but no state
    with pytest.raises(UserError, match="no intact checkpoint.*optimizer.bin is missing") as error:
        resumable_checkpoint(tmp_path, log=None)
    assert "\n" not in str(error.value)


def test_changed_settings_compare_every_group_and_skip_neutral_ones():
    from common.checkpoint import changed_settings

    def state(**changes):
        args = {"method": "token_level", "command": "python token_level.py ...",
                "versions": {"torch": "2"}, "model": {"student": "s", "teacher": "t"},
                "training": {"learning_rate": 1e-3, "max_steps": 10, "output_dir": "a",
                             "log_steps": 5, "save_steps": 2, "batch_size": 2},
                "token_level": {"kl": "forward", "loss_temperature": 1.0}}
        for name, value in changes.items():
            group, field = name.split(".")
            args[group] = {**args[group], field: value}
        return {"args": args, "global_batch_size": 4, "data_fingerprint": "8 examples, a"}

    assert changed_settings(state(), state()) == []
    neutral = state(**{"training.output_dir": "b", "training.log_steps": 1,
                       "training.save_steps": 9, "training.batch_size": 1})
    neutral["args"]["command"], neutral["args"]["versions"] = "other", {"torch": "3"}
    assert changed_settings(state(), neutral) == []
    changed = state(**{"training.learning_rate": 0.5, "token_level.kl": "reverse",
                       "model.teacher": "t2", "training.max_steps": 20})
    changed["data_fingerprint"], changed["global_batch_size"] = "8 examples, b", 8
    names = [name for name, _ in changed_settings(state(), changed)]
    assert names == ["teacher", "kl", "learning_rate", "max_steps", "batch_size", "dataset"]
    described = dict(changed_settings(state(), changed))
    assert described["learning_rate"] == "--learning-rate (0.001 in the checkpoint, 0.5 now)"
    # a field one side does not know (another version's flag) is not a change
    newer = state()
    newer["args"]["token_level"]["new_flag"] = 3
    assert changed_settings(state(), newer) == []


def test_an_error_starts_on_its_own_line_under_a_progress_bar(capsys):
    import sys

    from tqdm.auto import tqdm

    from common.errors import run_cli

    def main():
        bar = tqdm(total=10, desc="training", file=sys.stderr)
        bar.update(3)
        raise UserError("boom")

    with pytest.raises(SystemExit):
        run_cli(main)
    err = capsys.readouterr().err
    assert "training" in err and "\nerror: boom\n" in err


@pytest.mark.parametrize("script, old_field", [("token_level", "loss_temperature"),
                                               ("on_policy", "sampling_temperature"),
                                               ("sequence_level", "sampling_temperature"),
                                               ("cross_tokenizer", "loss_temperature")])
def test_a_checkpoint_with_the_old_temperature_field_resumes_compared_under_the_new_name(
        script, old_field):
    """Checkpoints written before --temperature was renamed store the field as `temperature`:
    it is compared with the renamed field (same value resumes, another is a named change)."""
    import importlib

    from common.checkpoint import changed_settings, known_settings, make_run_config

    module = importlib.import_module(script)
    options_class = next(value for name, value in vars(module).items()
                         if name.endswith("Arguments") and value.__module__ == script)
    current = make_run_config(script, "python ...",
                              **{script: options_class(**{old_field: 0.5})})
    assert current["renamed_settings"] == {script: {"temperature": old_field}}
    assert old_field in known_settings(current)

    def old_checkpoint(temperature):
        saved = {key: value for key, value in current.items() if key != "renamed_settings"}
        group = dict(saved[script])
        del group[old_field]
        saved[script] = {**group, "temperature": temperature}
        return {"args": saved}

    now = {"args": current}
    assert changed_settings(old_checkpoint(0.5), now) == []
    assert changed_settings(old_checkpoint(0.7), now) == [
        (old_field, f"--{old_field.replace('_', '-')} (0.7 in the checkpoint, 0.5 now)")]
    # --allow-changed-settings takes the old name for the new one too
    from accelerate import Accelerator

    from common.train import check_resume_settings

    for allowed in ("temperature", old_field.replace("_", "-")):
        assert check_resume_settings(Accelerator(cpu=True), old_checkpoint(0.7), now,
                                     allowed) == changed_settings(old_checkpoint(0.7), now)
    with pytest.raises(UserError, match="--resume: this run's settings differ"):
        check_resume_settings(Accelerator(cpu=True), old_checkpoint(0.7), now, None)


def test_a_checkpoint_with_a_removed_setting_is_refused_not_resumed_without_it():
    """cross_tokenizer.py's --distill-weight was removed when --alpha became the CE share: an old
    run's alpha=1 meant CE + ULD, now pure CE. Its checkpoint must not resume as if the missing
    field were just another version's extra key."""
    from accelerate import Accelerator

    from common.checkpoint import changed_settings, known_settings, make_run_config
    from common.train import check_resume_settings
    from cross_tokenizer import CrossTokenizerArguments

    current = make_run_config("cross_tokenizer", "python ...",
                              cross_tokenizer=CrossTokenizerArguments(alpha=1.0))
    assert "distill_weight" in current["removed_settings"]["cross_tokenizer"]
    assert "distill_weight" in known_settings(current)
    old_group = {**current["cross_tokenizer"], "distill_weight": 1.0}
    old = {"args": {**{k: v for k, v in current.items() if k != "removed_settings"},
                    "cross_tokenizer": old_group}}
    now = {"args": current}
    [(name, what)] = changed_settings(old, now)
    assert name == "distill_weight" and what.startswith(
        "--distill-weight (1.0 in the checkpoint, removed now: --alpha is now the cross-entropy")
    with pytest.raises(UserError, match="--distill-weight"):
        check_resume_settings(Accelerator(cpu=True), old, now, None)
    assert check_resume_settings(Accelerator(cpu=True), old, now, "distill-weight") == [
        (name, what)]
    # a checkpoint of this version has no such field: nothing to refuse
    assert changed_settings({"args": current}, now) == []
