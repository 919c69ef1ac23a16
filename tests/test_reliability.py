"""Reliability at scale: several processes, FSDP, preemption, non-finite steps, failed writes.

Multi-process runs use gloo on the CPU. One run often serves several assertions: the one-process
baselines are module fixtures, and the preempted two-process run is also the resume test and the
"a finished run is never clobbered" test. The FSDP runs force accelerate into FSDP mode on the CPU
(accelerate itself only enables FSDP with GPUs) with the settings of configs/fsdp.yaml.
"""

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.chat import ChatEncoder
from common.checkpoint import list_checkpoints, save_checkpoint
from common.errors import UserError, run_cli
from conftest import REPO
from examples.tiny_setup import toy_conversations

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
# --standalone: a free rendezvous port, so concurrent test runs on one machine do not collide
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out):
    return load_file(out / "model.safetensors")


def assert_same_weights(expected, got, atol=1e-5):
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=atol), name


def assert_same_trajectory(expected_rows, got_rows):
    assert [r["step"] for r in expected_rows] == [r["step"] for r in got_rows]
    for a, b in zip(expected_rows, got_rows):
        assert a["supervised_tokens"] == b["supervised_tokens"], a["step"]
        # metrics.jsonl rounds to 6 decimals: two processes sum in another order, and a 1e-12
        # difference can land on either side of a rounding boundary (one unit of the last digit)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1.5e-6), a["step"]


def start(command):
    """A command in its own process group, so the launcher and its workers can be stopped
    together (killing only the launcher would leave the workers running)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([str(c) for c in command], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def finish(process, timeout=600):
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run(command, check=True):
    result = finish(start(command))
    if check and result.returncode != 0:
        raise AssertionError(f"{command[:6]} failed ({result.returncode}):\n"
                             f"{result.stderr[-3000:]}")
    return result


def python(*args):
    return run([sys.executable, *args])


# --- token_level: accelerate --cpu, two-process preemption and resume, finished runs --------------

def token_level_args(tiny, out, *extra):
    return ["--teacher", tiny / "teacher", "--student", tiny / "student", "--dataset",
            tiny / "train.jsonl", "--output-dir", out, "--max-steps", "60", "--log-steps", "5",
            "--learning-rate", "1e-3", *extra]


@pytest.fixture(scope="module")
def one_process_token_level(tiny, tmp_path_factory):
    """The issue's command: `accelerate launch --cpu --num_processes 2` starts ONE process (its
    simple launcher needs an MPI hostfile for more), so with --batch-size 4 this is also the
    one-process baseline for two processes x batch 2."""
    out = tmp_path_factory.mktemp("acc_cpu") / "out"
    result = run([*ACCELERATE, "--cpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "token_level.py",
                  *token_level_args(tiny, out, "--batch-size", "4")])
    return out, result


@pytest.mark.slow
def test_accelerate_launch_cpu_completes_and_says_it_ran_one_process(one_process_token_level):
    out, result = one_process_token_level
    assert "student saved to" in result.stdout
    AutoModelForCausalLM.from_pretrained(out)
    warnings = [line for line in result.stdout.splitlines() if "started ONE process" in line]
    assert len(warnings) == 1 and "torchrun" in warnings[0] and "configs/ddp.yaml" in warnings[0]
    assert [row["step"] for row in metrics(out)] == list(range(5, 61, 5))


@pytest.mark.slow
def test_two_processes_preempted_and_resumed_match_one_process(tiny, tmp_path,
                                                               one_process_token_level):
    """configs/ddp.yaml starts two gloo processes on a CPU machine; SIGTERM to the launcher stops
    both at the same step with one checkpoint; --resume ends where one process x batch 4 ends."""
    baseline, _ = one_process_token_level
    out = tmp_path / "out"
    command = [*ACCELERATE, "--config_file", REPO / "configs" / "ddp.yaml", "--num_processes", "2",
               "token_level.py", *token_level_args(tiny, out, "--batch-size", "2")]
    process = start(command)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and process.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # to the launcher only: it forwards it to both workers
    result = finish(process, timeout=300)
    stderr = result.stderr
    assert result.returncode != 0, stderr[-3000:]
    stopped = [line for line in stderr.splitlines() if line.startswith("error: stopped by")]
    assert len(stopped) == 1, stderr[-3000:]  # reported by the main process only
    assert "SIGTERM" in stopped[0] and "--resume" in stopped[0]
    stopped_at = list_checkpoints(out)[-1][0]
    assert 5 <= stopped_at < 60 and not (out / "run_config.json").exists()
    state = json.loads((list_checkpoints(out)[-1][1] / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["global_batch_size"] == 4

    result = run(command + ["--resume"])
    assert "resumed from" in result.stdout and result.stdout.count("student saved to") == 1
    assert_same_trajectory(metrics(baseline), metrics(out))  # each step logged once
    assert_same_weights(weights(baseline), weights(out))

    # A rerun into the finished run's directory changes nothing, with or without --resume.
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    import token_level

    for extra in ([], ["--resume"]):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(token_level.main, [str(a) for a in token_level_args(tiny, out, *extra)])
        assert exit_info.value.code == 2
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*")} == before


# --- on_policy: two processes (DDP and FSDP) against one ------------------------------------------

# Test-only: accelerate enables FSDP only on GPUs, so this forces its FSDP mode on a CPU run with
# the settings of configs/fsdp.yaml, and reports how much of the teacher each process holds.
FSDP_ON_CPU = '''
import os, runpy, sys
sys.path.insert(0, os.getcwd())
import torch, yaml
import common.sharding, common.train
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

make_accelerator, prepare_teacher = common.train.make_accelerator, common.sharding.prepare_teacher

def make_fsdp_accelerator(args):
    accelerator = make_accelerator(args)
    settings = yaml.safe_load(open("configs/fsdp.yaml"))["fsdp_config"]
    renamed = {"fsdp_version": "fsdp_version", "fsdp_offload_params": "cpu_offload",
               "fsdp_transformer_layer_cls_to_wrap": "transformer_cls_names_to_wrap"}
    options = {renamed.get(key, key.removeprefix("fsdp_")): value
               for key, value in settings.items()}
    options["auto_wrap_policy"] = options["auto_wrap_policy"].lower()
    options["cpu_ram_efficient_loading"] = False  # meta-device loading needs a CUDA device
    options.pop("sync_module_states", None)
    plugin = FullyShardedDataParallelPlugin(**options)
    for state in (accelerator.state, PartialState()):
        state.distributed_type = DistributedType.FSDP
        state.device = torch.device("cpu")  # accelerate says cpu:0; FSDP's own check wants cpu
    accelerator.state.fsdp_plugin = plugin
    return accelerator

def reporting_prepare_teacher(accelerator, teacher):
    total = sum(p.numel() for p in teacher.parameters())
    teacher = prepare_teacher(accelerator, teacher)
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel()  # FSDP2: DTensors
                for p in teacher.parameters())
    print(f"teacher parameters on process {accelerator.process_index}: {local} of {total}",
          flush=True)
    return teacher

common.train.make_accelerator = make_fsdp_accelerator
common.sharding.prepare_teacher = reporting_prepare_teacher
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def on_policy_args(tiny, out, *extra):
    # Near-greedy sampling (T = 1e-5), so one process and two sample the same tokens.
    return ["--teacher", tiny / "teacher", "--student", tiny / "student", "--dataset",
            tiny / "train.jsonl", "--output-dir", out, "--lmbda", "1", "--max-new-tokens", "10",
            "--sampling-temperature", "1e-5", "--max-steps", "4", "--log-steps", "1",
            "--learning-rate", "1e-3", *extra]


@pytest.fixture(scope="module")
def one_process_on_policy(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("gkd") / "one"
    python("on_policy.py", *on_policy_args(tiny, out, "--batch-size", "4"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_on_policy_two_processes_match_one_process(tiny, tmp_path, one_process_on_policy, mode):
    out = tmp_path / mode
    args = on_policy_args(tiny, out, "--batch-size", "2", "--save-steps", "2")
    if mode == "fsdp":
        harness = tmp_path / "fsdp_on_cpu.py"
        harness.write_text(FSDP_ON_CPU)
        result = python(*TORCHRUN, harness, "on_policy.py", *args)
        reports = [line for line in result.stdout.splitlines() if "teacher parameters" in line]
        assert len(reports) == 2
        for report in reports:  # each process holds about half of the teacher, not all of it
            local, total = map(int, report.split(": ")[1].split(" of "))
            assert local <= 0.6 * total
        assert (list_checkpoints(out)[-1][1] / "pytorch_model_fsdp_0").is_dir()  # sharded save
    else:
        python(*TORCHRUN, "on_policy.py", *args)
    expected, got = metrics(one_process_on_policy), metrics(out)
    assert_same_trajectory(expected, got)
    # sample statistics are averaged over both processes' rows, not the main process' alone
    assert [r["sampled_length"] for r in expected] == pytest.approx(
        [r["sampled_length"] for r in got])
    assert_same_weights(weights(one_process_on_policy), weights(out))


# --- sequence_level: the teacher generates on the main process only -------------------------------

@pytest.mark.slow
def test_sequence_level_two_processes_generate_once_and_train_like_one(tiny, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    common = ["--student", tiny / "student", "--max-steps", "6", "--log-steps", "2",
              "--learning-rate", "1e-3", "--max-length", "256"]
    result = python(*TORCHRUN, "sequence_level.py", "--teacher", tiny / "teacher",
                        "--dataset", tiny / "train.jsonl", "--max-new-tokens", "8",
                        "--output-dir", two, "--batch-size", "2", *common)
    from sequence_level import completion_id, prompt_of

    cache = [json.loads(line) for line in
             (two / "teacher_completions.jsonl").read_text().splitlines()]
    expected_ids = {completion_id(prompt_of(json.loads(line)["messages"]), 0)
                    for line in (tiny / "train.jsonl").read_text().splitlines()}
    assert sorted(row["id"] for row in cache) == sorted(expected_ids)  # each prompt asked once
    assert result.stdout.count("student saved to") == 1
    # one process x batch 4 on the same completions, no teacher: the same training
    python("sequence_level.py", "--completions", two / "teacher_completions.jsonl",
               "--output-dir", one, "--batch-size", "4", *common)
    assert_same_trajectory(metrics(one), metrics(two))
    assert_same_weights(weights(one), weights(two))


# --- the loop in-process: non-finite steps, fp16 overflow, failed checkpoint writes ---------------

def fresh_accelerator(mixed_precision="no"):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradientAccumulationPlugin

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    plugin = GradientAccumulationPlugin(num_steps=1, sync_with_dataloader=False)
    return Accelerator(gradient_accumulation_plugin=plugin, cpu=True,
                       mixed_precision=mixed_precision)


@pytest.fixture(scope="module")
def tiny_examples(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny / "student")
    encoder = ChatEncoder(tokenizer, 128)
    return [encoder.encode(row["messages"]) for row in toy_conversations(8, seed=5)], tokenizer


def training_args(out, **overrides):
    from common.args import TrainingArguments

    return TrainingArguments(**{"output_dir": str(out), "max_steps": 6, "batch_size": 4,
                                "learning_rate": 1e-2, "warmup_ratio": 0.0, "save_steps": 0,
                                "log_steps": 1, "lr_scheduler": "constant", **overrides})


def cross_entropy_loss_fn(poisoned_steps=(), poison=float("nan")):
    """Sum of next-token cross-entropy; multiplied by `poison` on the given optimizer steps."""
    from common.losses import cross_entropy, shift_for_next_token

    current = {"step": 0}

    def loss_fn(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        selected, targets = shift_for_next_token(logits, batch["labels"])
        loss = cross_entropy(selected, targets).sum()
        return (loss * poison if current["step"] in poisoned_steps else loss), {}

    def prepare_fn(model, batch, step):  # records which step is running, and its weights
        current["step"] = step
        snapshots[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return batch

    snapshots = {}
    return loss_fn, prepare_fn, snapshots


def train_tiny(tiny, tiny_examples, args, loss_fn, prepare_fn, accelerator=None,
               run_config=None, examples=None):
    from common.train import Method, train

    all_examples, tokenizer = tiny_examples
    accelerator = accelerator or fresh_accelerator()
    model = AutoModelForCausalLM.from_pretrained(tiny / "student")
    return train(accelerator, model, all_examples if examples is None else examples, args,
                 Method(loss_fn, prepare=prepare_fn), tokenizer.pad_token_id,
                 run_config or {"test": True})


def test_a_non_finite_step_is_skipped_logged_and_training_goes_on(tiny, tiny_examples, tmp_path,
                                                                   capsys):
    loss_fn, prepare_fn, snapshots = cross_entropy_loss_fn(poisoned_steps={2})
    train_tiny(tiny, tiny_examples, training_args(tmp_path), loss_fn, prepare_fn)
    assert "step 00003 | non-finite loss or gradient" in capsys.readouterr().out
    changed = lambda a, b: any(not torch.equal(snapshots[a][n], snapshots[b][n])
                               for n in snapshots[a])
    assert changed(1, 2) and not changed(2, 3) and changed(3, 4)  # only step 2 left no trace
    rows = metrics(tmp_path)
    assert len(rows) == 6 and rows[2]["loss"] != rows[2]["loss"]  # NaN logged, not hidden


def test_too_many_bad_steps_stop_with_the_last_good_checkpoint_intact(tiny, tiny_examples,
                                                                      tmp_path):
    loss_fn, prepare_fn, snapshots = cross_entropy_loss_fn(poisoned_steps={3, 4, 5},
                                                          poison=float("inf"))
    args = training_args(tmp_path, save_steps=2, max_bad_steps=3, max_steps=10)
    with pytest.raises(UserError, match="3 optimizer steps in a row .* --resume"):
        train_tiny(tiny, tiny_examples, args, loss_fn, prepare_fn)
    # step 4 fell inside the bad run, so no checkpoint was written there: the newest is step 2
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2]
    saved = load_file(list_checkpoints(tmp_path)[-1][1] / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in saved.values())


@pytest.mark.slow
def test_fp16_overflow_is_left_to_the_loss_scaler(tiny, tiny_examples, tmp_path):
    """An inf gradient with a finite loss under fp16 is the loss scaler's: it skips that update
    and lowers its scale, and the run goes on (with --max-bad-steps 1 it would stop otherwise)."""
    accelerator = fresh_accelerator("fp16")
    # accelerate only builds a GradScaler with a GPU; give it one for the CPU
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    accelerator.native_amp = True
    # a finite loss (~1e35) that overflows float32 once scaled by 65536
    loss_fn, prepare_fn, snapshots = cross_entropy_loss_fn(poisoned_steps={1}, poison=1e34)
    train_tiny(tiny, tiny_examples, training_args(tmp_path, max_steps=3, max_bad_steps=1),
               loss_fn, prepare_fn, accelerator)
    assert accelerator.scaler.get_scale() < 2.0 ** 16
    first = next(iter(snapshots[1]))
    assert torch.equal(snapshots[1][first], snapshots[2][first])  # step 1 skipped
    assert not torch.equal(snapshots[0][first], snapshots[1][first])  # step 0 applied


@pytest.mark.slow
def test_a_run_whose_every_step_was_non_finite_is_not_finished(tiny, tiny_examples, tmp_path):
    """--loss-temperature inf makes every step NaN: fewer steps than --max-bad-steps must not end
    in an export of the untouched student as a finished run."""
    loss_fn, prepare_fn, _ = cross_entropy_loss_fn(poisoned_steps=set(range(6)))
    with pytest.raises(UserError, match="all 6 optimizer steps had a NaN/inf") as error:
        train_tiny(tiny, tiny_examples, training_args(tmp_path, max_bad_steps=10), loss_fn,
                   prepare_fn)
    assert "\n" not in str(error.value)
    assert len(metrics(tmp_path)) == 6  # it did run every step


def run_config_of(args, **method_options):
    """A run config as the scripts make it: every argument group, a method group among them."""
    import dataclasses

    from common.checkpoint import make_run_config

    @dataclasses.dataclass
    class MethodOptions:
        kl: str = "forward"
        loss_temperature: float = 1.0

    return make_run_config("test", "python test.py", training=args,
                           test_method=MethodOptions(**method_options))


@pytest.fixture
def stopped_run(tiny, tiny_examples, tmp_path):
    """A 6-step run with checkpoints at steps 2 and 4, as a run killed after step 4 leaves it
    (the rows of steps 5 and 6 are dropped by the resume), and its final weights."""
    out = tmp_path / "out"
    out.mkdir()
    args = training_args(out, save_steps=2, save_total_limit=0, learning_rate=1e-3)
    loss_fn, prepare_fn, _ = cross_entropy_loss_fn()
    model, _ = train_tiny(tiny, tiny_examples, args, loss_fn, prepare_fn,
                          run_config=run_config_of(args))
    return out, args, {name: p.detach().clone() for name, p in model.named_parameters()}


def resume(tiny, tiny_examples, out, args, method_options=None, examples=None, **changes):
    import dataclasses

    args = dataclasses.replace(args, resume=True, **changes)
    loss_fn, prepare_fn, _ = cross_entropy_loss_fn()
    return train_tiny(tiny, tiny_examples, args, loss_fn, prepare_fn, examples=examples,
                      run_config=run_config_of(args, **(method_options or {})))


def snapshot(out):
    return {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("change, expected", [
    ({"learning_rate": 0.5}, "--learning-rate (0.001 in the checkpoint, 0.5 now)"),
    ({"max_steps": 8}, "--max-steps (6 in the checkpoint, 8 now)"),
    ({"seed": 7}, "--seed (42 in the checkpoint, 7 now)"),
    ({"batch_size": 2}, "--batch-size x processes (4 in the checkpoint, 2 now)"),
    ({"method_options": {"kl": "reverse"}}, '--kl ("forward" in the checkpoint, "reverse" now)'),
    ({"examples": "reversed"}, "the training data's content"),
])
def test_resume_refuses_settings_that_change_the_result(tiny, tiny_examples, stopped_run, change,
                                                        expected):
    out, args, _ = stopped_run
    if change.get("examples") == "reversed":
        change = {"examples": tiny_examples[0][::-1]}
    before = snapshot(out)
    with pytest.raises(UserError) as error:
        resume(tiny, tiny_examples, out, args, **change)
    message = str(error.value)
    assert "\n" not in message and expected in message, message
    assert "--allow-changed-settings" in message
    assert snapshot(out) == before  # refused before anything was written


@pytest.mark.slow
def test_resume_ignores_settings_that_cannot_change_the_result(tiny, tiny_examples, stopped_run,
                                                               capsys):
    out, args, final_weights = stopped_run
    model, state = resume(tiny, tiny_examples, out, args, log_steps=2, save_steps=3,
                          save_total_limit=1, eval_steps=5, max_bad_steps=3)
    assert "resumed from" in capsys.readouterr().out and state["step"] == 6
    for name, parameter in model.named_parameters():  # the run ends where it would have
        assert torch.equal(parameter, final_weights[name]), name


@pytest.mark.slow
def test_an_allowed_change_takes_effect(tiny, tiny_examples, stopped_run, capsys):
    """--allow-changed-settings learning-rate: the asked rate is used from the resumed step on
    (the checkpoint's optimizer and schedule would otherwise bring the old one back)."""
    out, args, _ = stopped_run
    resume(tiny, tiny_examples, out, args, learning_rate=0.5, max_steps=8,
           allow_changed_settings="learning-rate,--max-steps")
    assert "continuing with changed settings" in capsys.readouterr().out
    rows = metrics(out)
    assert [row["step"] for row in rows] == list(range(1, 9))
    assert [row["lr"] for row in rows] == [1e-3] * 4 + [0.5] * 4


@pytest.mark.slow
def test_an_unknown_allowed_setting_is_refused(tiny, tiny_examples, stopped_run):
    out, args, _ = stopped_run
    with pytest.raises(UserError, match="unknown setting.*learnig_rate"):
        resume(tiny, tiny_examples, out, args, allow_changed_settings="learnig-rate")


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.bin", "trainer_state.json"])
def test_resume_skips_a_damaged_checkpoint_for_the_previous_one(tiny, tiny_examples, stopped_run,
                                                               capsys, damaged):
    out, args, final_weights = stopped_run
    path = out / "checkpoints" / "step_000004" / damaged
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])  # cut short by a full disk
    model, _ = resume(tiny, tiny_examples, out, args)
    printed = capsys.readouterr().out
    warnings = [line for line in printed.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and damaged in warnings[0] and "step 2" in warnings[0]
    assert "resumed from" in printed and "step_000002 at step 2" in printed
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, final_weights[name]), name


@pytest.mark.slow
def test_resume_with_every_checkpoint_damaged_is_a_one_line_error(tiny, tiny_examples,
                                                                  stopped_run):
    out, args, _ = stopped_run
    for step in ("step_000002", "step_000004"):
        (out / "checkpoints" / step / "model.safetensors").write_bytes(b"{}")
    before = snapshot(out)
    with pytest.raises(UserError, match="no intact checkpoint.*model.safetensors is damaged"):
        resume(tiny, tiny_examples, out, args)
    assert snapshot(out) == before


@pytest.fixture
def prepared(tiny):
    accelerator = fresh_accelerator()
    model = AutoModelForCausalLM.from_pretrained(tiny / "student")
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator


def test_save_total_limit_keeps_the_newest(prepared, tmp_path):
    for step in range(1, 5):
        save_checkpoint(prepared, tmp_path, step, {"step": step}, save_total_limit=2)
    save_checkpoint(prepared, tmp_path, 4, {"step": 4}, save_total_limit=2)  # same step again
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000003",
                                                                              "step_000004"]


def test_a_full_disk_is_a_clear_error_and_the_previous_checkpoint_survives(prepared, tmp_path):
    save_checkpoint(prepared, tmp_path, 1, {"step": 1})
    # Files may not grow past 4 KB: what a full disk does to the first big write.
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(UserError) as error:
            save_checkpoint(prepared, tmp_path, 2, {"step": 2})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    message = str(error.value)
    assert "\n" not in message and "step_000002" in message and "File too large" in message
    assert "previous checkpoint is intact" in message
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]
    prepared.load_state(str(tmp_path / "checkpoints" / "step_000001"))  # still loads


def test_a_read_only_directory_is_a_clear_error(prepared, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):  # root ignores chmod, so refuse the way the OS would
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(prepared, "save_state", refuse)
    with pytest.raises(UserError, match="Permission denied.*fix permissions"):
        save_checkpoint(prepared, tmp_path, 1, {"step": 1})
    assert list_checkpoints(tmp_path) == []


# --- killed runs and --overwrite, end to end --------------------------------------------------------

def tolerant_metrics(out):
    """metrics.jsonl rows, without a last line a SIGKILL may have cut short."""
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def wait_for(condition, process, what):
    deadline = time.time() + 300
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {process.communicate()}"
        assert time.time() < deadline, f"no {what} after 300 s"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_is_never_mixed_with_a_rerun(tiny, tmp_path,
                                                                              capsys):
    import token_level

    out = tmp_path / "out"
    endless = token_level_args(tiny, out, "--max-steps", "100000", "--save-steps", "0",
                               "--log-steps", "1", "--batch-size", "4")
    process = start([sys.executable, "token_level.py", *endless])
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(tolerant_metrics(out)) >= 3,
             process, "3 metrics rows")
    os.killpg(process.pid, signal.SIGKILL)
    finish(process)
    # killed mid-run: rows logged, no checkpoint, nothing finished
    assert len(tolerant_metrics(out)) >= 3 and not (out / "checkpoints").exists()
    assert not (out / "run_config.json").exists()
    killed_metrics = (out / "metrics.jsonl").read_bytes()

    short = token_level_args(tiny, out, "--max-steps", "3", "--save-steps", "0", "--log-steps",
                             "1", "--batch-size", "4")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(token_level.main, [str(a) for a in short])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unfinished run" in error and "--resume" in error and "--overwrite" in error
    assert (out / "metrics.jsonl").read_bytes() == killed_metrics

    result = run([sys.executable, "token_level.py", *short, "--resume"])
    assert "no checkpoint" in result.stdout and "starting from step 0" in result.stdout
    assert [row["step"] for row in metrics(out)] == [1, 2, 3]  # the new run's rows only


# Test-only: the checkpoint of step 4 writes a part of its model file, then hangs there until
# the test kills the process (a SIGKILL mid-write, at a known point).
KILL_DURING_SAVE = """
import os, runpy, sys, time
from pathlib import Path
sys.path.insert(0, os.getcwd())
from accelerate import Accelerator

save_state = Accelerator.save_state

def save_state_and_hang_at_step_4(self, output_dir=None, **kwargs):
    if Path(output_dir).name == ".tmp-step_000004":
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(bytes(100))
        Path(MARKER).touch()
        time.sleep(600)
    return save_state(self, output_dir, **kwargs)

Accelerator.save_state = save_state_and_hang_at_step_4
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_nothing_behind(tiny, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "writing_step_4"
    harness = tmp_path / "kill_during_save.py"
    harness.write_text(f"MARKER = {str(marker)!r}\n" + KILL_DURING_SAVE)
    args = token_level_args(tiny, out, "--max-steps", "6", "--save-steps", "2", "--log-steps",
                            "1", "--batch-size", "4")
    process = start([sys.executable, harness, "token_level.py", *args])
    wait_for(marker.exists, process, "the checkpoint of step 4")
    os.killpg(process.pid, signal.SIGKILL)
    finish(process)
    root = out / "checkpoints"
    # killed while writing step 4: its temp folder holds a part of a file, step 2 is complete
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step_000004", "step_000002"]
    assert (root / ".tmp-step_000004" / "model.safetensors").stat().st_size == 100
    assert not (out / "run_config.json").exists()

    # resumed without further checkpoints (--save-steps cannot change the result): the next
    # start removes the half-written folder, it is not left for ever
    result = run([sys.executable, "token_level.py", *args, "--save-steps", "0", "--resume"])
    assert "step_000002 at step 2" in result.stdout
    assert sorted(p.name for p in root.iterdir()) == ["step_000002"]
    assert [row["step"] for row in metrics(out)] == list(range(1, 7))


@pytest.mark.slow
def test_overwrite_keeps_the_users_files_and_the_run_is_recorded(tiny, tmp_path):
    """A user keeps the dataset, notes and settings inside the output dir: --overwrite replaces
    the earlier run (its checkpoints, metrics and exported files, as its run_config.json lists
    them) and leaves the rest alone. run_config.json records how the new run was made."""
    from common.checkpoint import export_student

    out = tmp_path / "out"
    out.mkdir()
    model = AutoModelForCausalLM.from_pretrained(tiny / "student")
    export_student(fresh_accelerator(), model, AutoTokenizer.from_pretrained(tiny / "student"),
                   out, {"finished": True})
    record = json.loads((out / "run_config.json").read_text())
    (out / "tokenizer.model").write_text("an earlier export's tokenizer")
    record.setdefault("files", []).append("tokenizer.model")
    (out / "run_config.json").write_text(json.dumps(record))
    (out / "metrics.jsonl").write_text('{"step": 40}\n')
    (out / "checkpoints" / "step_000040").mkdir(parents=True)
    users = {"my_data.jsonl": (tiny / "train.jsonl").read_text(), "notes.txt": "my notes",
             "settings.json": '{"mine": true}'}
    for name, content in users.items():
        (out / name).write_text(content)

    result = python("token_level.py", *token_level_args(
        tiny, out, "--dataset", out / "my_data.jsonl", "--max-steps", "2", "--log-steps", "1",
        "--batch-size", "2", "--grad-accum", "2", "--overwrite"))
    assert all((out / name).read_text() == content for name, content in users.items())
    assert "kept 3 entries" in result.stdout and "my_data.jsonl" in result.stdout
    assert not (out / "tokenizer.model").exists() and not (out / "checkpoints").exists()
    assert [row["step"] for row in metrics(out)] == [1, 2]
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["num_processes"] == 1 and run_config["effective_batch_size"] == 4
    assert set(run_config["versions"]) == {"python", "torch", "transformers", "accelerate"}
    assert run_config["versions"]["torch"] == torch.__version__
    assert sorted(run_config["files"]) == sorted(
        set(p.name for p in out.iterdir()) - set(users) - {"metrics.jsonl", "run_config.json"})


# --- security hygiene -----------------------------------------------------------------------------

def test_remote_code_needs_the_flag(tiny, tmp_path):
    """A model that ships Python code is refused (one line) and its code never runs."""
    from common.models import load_model

    model_dir = tmp_path / "custom"
    AutoModelForCausalLM.from_pretrained(tiny / "student").save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig",
                          "AutoModelForCausalLM": "custom.CustomModel"}
    config["model_type"] = "custom_tiny"  # an architecture only its own code knows
    (model_dir / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code_ran"
    (model_dir / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(UserError) as error:
        load_model(str(model_dir))
    assert "\n" not in str(error.value) and "--trust-remote-code" in str(error.value)
    assert not marker.exists()


def test_safetensors_weights_win_over_a_pickle(tiny, tmp_path):
    from common.models import load_model

    model_dir = tmp_path / "both"
    model = AutoModelForCausalLM.from_pretrained(tiny / "student")
    model.save_pretrained(model_dir)
    tampered = {name: torch.zeros_like(tensor) for name, tensor in model.state_dict().items()}
    torch.save(tampered, model_dir / "pytorch_model.bin")
    loaded = load_model(str(model_dir))
    expected = load_file(model_dir / "model.safetensors")
    assert all(torch.equal(loaded.state_dict()[name], expected[name]) for name in expected)
