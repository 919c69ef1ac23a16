"""token_level.py as a user runs it: end to end per --kl, resume, and every bad input."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.errors import run_cli
from conftest import REPO, run_script


def base_args(tiny, output_dir, *extra):
    return ["--teacher", tiny / "teacher", "--student", tiny / "student",
            "--dataset", tiny / "train.jsonl", "--output-dir", output_dir, "--batch-size", "4",
            "--log-steps", "4", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("kl", ["forward", "reverse", "jsd", "skew_reverse"])
def test_end_to_end_per_divergence(tiny, tmp_path, kl):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    result = run_script("token_level.py", *base_args(tiny, out, "--kl", kl, "--max-steps", "12",
                                                     "--learning-rate", "1e-3", "--alpha", "0.1"))
    assert "student saved to" in result.stdout
    student = AutoModelForCausalLM.from_pretrained(out)  # a plain save_pretrained directory
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert student.config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template  # the template it was trained with travels along
    # the teacher is padded beyond the tokenizer; training still compares real ids only
    teacher_config = json.loads((tiny / "teacher" / "config.json").read_text())
    assert teacher_config["vocab_size"] > len(tokenizer)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [4, 8, 12]
    assert all(row["kd"] >= 0 and row["loss"] == row["loss"] for row in rows)  # no NaN
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["token_level"]["kl"] == kl and run_config["finished"] is True
    # the student moved away from its initialisation
    before = load_file(tiny / "student" / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)


@pytest.mark.slow
def test_distillation_moves_the_student_towards_the_teacher(tiny, tmp_path):
    """Forward-KL at a high learning rate must lower the KD loss on the training data."""
    out = tmp_path / "out"
    run_script("token_level.py", *base_args(tiny, out, "--max-steps", "40", "--learning-rate",
                                            "3e-3", "--warmup-ratio", "0", "--log-steps", "1",
                                            "--lr-scheduler", "constant"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["kd"] for r in rows[:5]) / 5, sum(r["kd"] for r in rows[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def final_weights(path):
    return load_file(path / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("student", [[], ["--lora-r", "4", "--lora-dropout", "0.1"]],
                         ids=["full", "lora"])
def test_killed_run_resumes_to_the_same_result(tiny, tmp_path, student):
    # --group-by-length: its order, too, must follow from (seed, epoch) alone; a LoRA student's
    # adapters and its dropout's random state must come back as well
    args = ["--max-steps", "120", "--save-steps", "10", "--learning-rate", "1e-3",
            "--batch-size", "2", "--grad-accum", "2", "--log-steps", "10", "--group-by-length",
            *student]
    uninterrupted = tmp_path / "uninterrupted"
    run_script("token_level.py", *base_args(tiny, uninterrupted, *args))

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "token_level.py",
                                *map(str, base_args(tiny, killed, *args))], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_000030").exists():
        assert process.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "run_config.json").exists()

    # without --resume the unfinished run is protected
    result = run_script("token_level.py", *base_args(tiny, killed, *args), check=False)
    assert result.returncode == 2 and "--resume" in result.stderr
    result = run_script("token_level.py", *base_args(tiny, killed, *args, "--resume"))
    assert "resumed from" in result.stdout
    expected, resumed = final_weights(uninterrupted), final_weights(killed)
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    if student:  # the adapter exported beside the merged student, too
        adapter = Path("adapter") / "adapter_model.safetensors"
        expected, resumed = load_file(uninterrupted / adapter), load_file(killed / adapter)
        assert expected.keys() == resumed.keys() and expected
        for name in expected:
            assert torch.equal(expected[name], resumed[name]), name
    steps = [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(10, 121, 10))  # no duplicated rows from the killed run


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(tiny, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "token_level.py",
                                *map(str, base_args(tiny, out, "--max-steps", "100000",
                                                    "--save-steps", "0"))],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "SIGTERM" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert latest_checkpoint_step(out) >= 4


def latest_checkpoint_step(out):
    from common.checkpoint import list_checkpoints

    return list_checkpoints(out)[-1][0]


def bfloat16_copy(source, destination):
    """`source` saved in bfloat16, as most Hub checkpoints are (Llama-3.2, Qwen2.5, Gemma)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(source).to(torch.bfloat16).save_pretrained(destination)
    AutoTokenizer.from_pretrained(source).save_pretrained(destination)
    return destination


def test_bfloat16_checkpoint_trains_a_float32_student_by_default(tiny, tmp_path):
    """--dtype auto must not train in pure bfloat16 (AdamW loses the small updates): weights,
    optimizer state and the exported config are float32."""
    student = bfloat16_copy(tiny / "student", tmp_path / "student_bf16")
    assert json.loads((student / "config.json").read_text())["dtype"] == "bfloat16"
    out = tmp_path / "out"
    result = run_script("token_level.py", *base_args(tiny, out, "--student", student,
                                                     "--max-steps", "3", "--save-steps", "2"))
    assert "bfloat16" not in result.stderr  # no low-precision warning
    optimizer = torch.load(out / "checkpoints" / "step_000002" / "optimizer.bin",
                           weights_only=False)
    moments = [t for state in optimizer["state"].values() for t in state.values()
               if t.is_floating_point() and t.dim() > 0]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    assert all(t.dtype == torch.float32 for t in final_weights(out).values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_bfloat16_student_only_when_asked_and_with_a_warning(tiny, tmp_path, capsys):
    from common.models import load_student

    student = bfloat16_copy(tiny / "student", tmp_path / "student_bf16")

    def warnings():  # stderr also holds transformers' progress bars
        return [line for line in capsys.readouterr().err.splitlines() if "warning" in line]

    assert load_student(str(student)).dtype == torch.float32
    assert warnings() == []
    assert load_student(str(student), "bfloat16").dtype == torch.bfloat16
    warning = warnings()
    assert len(warning) == 1 and warning[0].startswith("warning: ") and \
        "--student-dtype float32 --mixed-precision bf16" in warning[0]
    # a LoRA student's weights are frozen: they keep the checkpoint's dtype, without a warning
    assert load_student(str(student), adapters=True).dtype == torch.bfloat16
    assert warnings() == []


def test_models_without_a_chat_template_warn_or_take_the_given_one(tiny, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    for name in ("teacher", "student"):  # as a base model or a GGUF conversion comes
        shutil.copytree(tiny / name, tmp_path / name)
        (tmp_path / name / "chat_template.jinja").unlink()
        assert AutoTokenizer.from_pretrained(tmp_path / name).chat_template is None
    args = ["--teacher", tmp_path / "teacher", "--student", tmp_path / "student",
            "--max-steps", "1"]
    result = run_script("token_level.py", *base_args(tiny, tmp_path / "default", *args))
    warnings = [line for line in result.stderr.splitlines() if "chat template" in line]
    assert len(warnings) == 1 and "--chat-template FILE" in warnings[0], warnings
    template = (tiny / "teacher" / "chat_template.jinja").read_text()
    (tmp_path / "template.jinja").write_text(template)
    result = run_script("token_level.py", *base_args(tiny, tmp_path / "given", *args,
                                                     "--chat-template", tmp_path / "template.jinja"))
    assert "chat template" not in result.stderr
    assert AutoTokenizer.from_pretrained(tmp_path / "given").chat_template == template


# --- bad input: one line on stderr, exit status 2, nothing written --------------------------------

def run_main(argv):
    import token_level

    with pytest.raises(SystemExit) as exit_info:
        run_cli(token_level.main, [str(a) for a in argv])
    return exit_info.value.code


def bad_dataset(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    return path


BAD_INPUTS = {
    "missing dataset": (lambda t, p: ["--dataset", p / "nope.jsonl"], "does not exist"),
    "unreadable dataset": (lambda t, p: ["--dataset", bad_dataset(p, "d.bin", "x")],
                           "unsupported file type"),
    "no needed columns": (lambda t, p: ["--dataset", bad_dataset(p, "d.jsonl", '{"text": "a"}\n')],
                          "--messages-field"),
    "empty dataset": (lambda t, p: ["--dataset", bad_dataset(p, "d.jsonl", "")], "empty"),
    "malformed json": (lambda t, p: ["--dataset", bad_dataset(p, "d.jsonl", '{"messages": [\n')],
                       "line 1 is not valid JSON"),
    "nothing fits max length": (lambda t, p: ["--max-length", "8"], "--max-length"),
    "unknown kl": (lambda t, p: ["--kl", "sideways"], "invalid choice"),
    "zero temperature": (lambda t, p: ["--loss-temperature", "0"],
                         "--loss-temperature must be > 0"),
    "missing teacher path": (lambda t, p: ["--teacher", p / "no_teacher"], "does not exist"),
    "missing student path": (lambda t, p: ["--student", "./no/such/student"], "does not exist"),
    "unreachable hub model": (lambda t, p: ["--teacher", "nobody-here/no-such-model"],
                              "Hugging Face Hub"),
    "mismatched tokenizers": (lambda t, p: ["--student", t / "student_sp"], "cross_tokenizer.py"),
    "bad alpha": (lambda t, p: ["--alpha", "1.5"], "--alpha"),
    "jsd endpoint beta": (lambda t, p: ["--kl", "jsd", "--beta", "1"], "--beta"),
    "skew endpoint": (lambda t, p: ["--kl", "skew_forward", "--skew", "0"], "--skew"),
    "missing chat template file": (lambda t, p: ["--chat-template", p / "nope.jinja"],
                                   "cannot be read"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_one_line_error(tiny, tmp_path, capsys, case):
    make_override, expected = BAD_INPUTS[case]
    out = tmp_path / "out"
    argv = base_args(tiny, out, "--max-steps", "2") + make_override(tiny, tmp_path)
    assert run_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and expected in err[-1], err
    assert not any(line.startswith("Traceback") for line in err)
    assert not out.exists(), "a refused run must write nothing"


def test_finished_run_is_not_clobbered(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_config.json").write_text('{"finished": true}')
    (out / "model.safetensors").write_text("precious")
    assert run_main(base_args(tiny, out, "--max-steps", "2")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_text() == "precious"


def test_subprocess_error_has_no_traceback(tiny, tmp_path):
    result = run_script("token_level.py", *base_args(tiny, tmp_path / "o", "--student",
                                                     tiny / "student_sp"), check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: teacher")


def test_help_documents_every_flag():
    result = run_script("token_level.py", "--help")
    for flag in ["--teacher", "--student", "--dataset", "--output-dir", "--max-steps",
                 "--num-epochs", "--batch-size", "--grad-accum", "--learning-rate",
                 "--warmup-ratio", "--max-length", "--seed", "--save-steps", "--log-steps",
                 "--resume", "--overwrite", "--dtype", "--kl", "--beta", "--loss-temperature",
                 "--alpha", "--messages-field", "--prompt-field", "--response-field",
                 "--dataset-split", "--max-samples"]:
        assert flag in result.stdout, flag
    assert "--temperature" not in result.stdout  # the old spelling is hidden


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tiny, tmp_path):
    """2 processes x batch 2 (gloo, CPU) must follow 1 process x batch 4: same data, same updates."""
    common = ["--max-steps", "6", "--learning-rate", "1e-3", "--log-steps", "2",
              "--eval-dataset", tiny / "test.jsonl", "--eval-steps", "3"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    run_script("token_level.py", *base_args(tiny, single, *common, "--batch-size", "4"))
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "token_level.py",
               *base_args(tiny, multi, *common, "--batch-size", "2"))
    rows = {name: [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]
            for name, path in [("single", single), ("multi", multi)]}
    evals = {name: [r for r in rows[name] if "eval_loss" in r] for name in rows}
    rows = {name: [r for r in rows[name] if "loss" in r] for name in rows}
    assert len(rows["multi"]) == 3  # only the main process writes metrics
    # held-out scoring: each process scores its share, the sums are the single process's
    assert [r["step"] for r in evals["multi"]] == [r["step"] for r in evals["single"]] == [3, 6]
    for a, b in zip(evals["single"], evals["multi"]):
        assert a["eval_supervised_tokens"] == b["eval_supervised_tokens"] > 0
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4, abs=1.5e-6)
        assert a["eval_kd"] == pytest.approx(b["eval_kd"], rel=1e-4, abs=1.5e-6)
    for a, b in zip(rows["single"], rows["multi"]):
        assert a["supervised_tokens"] == b["supervised_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1.5e-6)  # 6-decimal rounding
    expected, got = final_weights(single), final_weights(multi)
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name
