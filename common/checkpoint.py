"""Atomic checkpoints, resume, and the final export of the student.

Layout of OUTPUT_DIR:
    checkpoints/step_000050/   accelerate state (model, optimizer, scheduler, RNG) + trainer_state.json
    metrics.jsonl              one row per logged step
    run_config.json            the run's arguments and outcome (written at the end)
    config.json, model.safetensors, tokenizer files ...   the final student (save_pretrained)

A checkpoint is written into `checkpoints/.tmp-step_000050/` and renamed into place only once it is
complete, so a run killed mid-write never leaves a half checkpoint that looks whole. Resume reads
the step from `trainer_state.json`, never from the folder name.
"""

import json
import os
import shutil
from pathlib import Path

from common.errors import UserError

STATE_FILE = "trainer_state.json"
RUN_CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
def list_checkpoints(output_dir):
    """[(step, path)] of complete checkpoints, oldest first. Half-written temp dirs are ignored."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        state_file = path / STATE_FILE
        if path.name.startswith(".") or not state_file.is_file():
            continue
        try:
            found.append((int(json.loads(state_file.read_text())["step"]), path))
        except (ValueError, KeyError, json.JSONDecodeError):
            continue  # unreadable state: not a checkpoint we can resume from
    return sorted(found)


def latest_checkpoint(output_dir):
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def is_finished(output_dir):
    """run_config.json is written last by the export, so its presence means a finished run."""
    return (Path(output_dir) / RUN_CONFIG_FILE).is_file()


def check_output_dir(output_dir, resume, overwrite):
    """Refuse to clobber an earlier run by accident. Reads only; call before any work."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--output-dir {path} is a file; pass a directory")
    if overwrite or not path.exists():
        return
    if is_finished(path):
        raise UserError(f"{path} already holds a finished run; pass --overwrite to train again "
                        f"or choose another --output-dir")
    has_checkpoints = bool(list_checkpoints(path))
    if has_checkpoints and not resume:
        raise UserError(f"{path} holds checkpoints of an unfinished run; pass --resume to continue "
                        f"it or --overwrite to start afresh")
    if not has_checkpoints and (path / "config.json").exists():
        raise UserError(f"{path} already holds a model; choose another --output-dir or pass "
                        f"--overwrite to replace it")


def clear_output_dir(output_dir, keep=()):
    """For --overwrite: remove what an earlier run wrote (only the kinds of files this suite
    writes), except the file names in `keep` (e.g. an expensive teacher-completions cache)."""
    path = Path(output_dir)
    if not path.is_dir():
        return
    shutil.rmtree(path / CHECKPOINTS, ignore_errors=True)
    for child in path.iterdir():
        if child.is_file() and child.name not in keep and child.suffix in (
                ".json", ".safetensors", ".jinja", ".jsonl", ".model", ".txt"):
            child.unlink()


def prepare_output_dir(accelerator, output_dir, overwrite, keep=()):
    """Clear it (--overwrite, see clear_output_dir) and create it, on the main process only; every
    process waits, so none writes into a directory still being cleared. Returns it as a Path."""
    output_dir = Path(output_dir)
    if accelerator.is_main_process:
        if overwrite:
            clear_output_dir(output_dir, keep=keep)
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return output_dir


def make_run_config(method, command, **groups):
    """What every checkpoint and the final output record about the run: the method, the command
    line and each argument group (dataclasses) as a dict."""
    import dataclasses

    return {"method": method, "command": command,
            **{name: dataclasses.asdict(args) for name, args in groups.items()}}


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path, data):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def error_on_every_process(accelerator, message):
    """The exception to raise for a UserError that every process hits at the same point (a stop
    signal, a failed checkpoint, too many bad steps): the main process reports it, the others
    exit with the same status quietly, so the message is printed once, not once per process."""
    if accelerator.is_main_process:
        return UserError(message)
    return SystemExit(2)


def _write_errors():
    """Exception types a failed write surfaces as: the OS's, torch.save's RuntimeError ("file write
    failed", "unexpected pos") and safetensors' own error type (a full disk raises all three)."""
    errors = [OSError, RuntimeError]
    try:
        from safetensors import SafetensorError
        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


def _describe_write_error(exc):
    first_line = (str(exc).splitlines() or [""])[0]
    if isinstance(exc, OSError) and exc.strerror:
        first_line = exc.strerror
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def _all_processes_succeeded(accelerator, error):
    """Every process learns whether any failed, so none waits at a barrier for one that left
    (a barrier itself when there are several processes)."""
    if accelerator.num_processes == 1:
        return error is None
    import torch

    failures = torch.tensor(float(error is not None), device=accelerator.device)
    return accelerator.reduce(failures, "sum").item() == 0


def save_checkpoint(accelerator, output_dir, step, trainer_state, save_total_limit=0):
    """Write checkpoints/step_{step:06d}/ atomically on every process' behalf; return its path.

    A write that fails (full disk, read-only directory, quota) is a UserError on every process;
    the half-written directory is removed and the previous checkpoints are untouched.
    """
    root = Path(output_dir) / CHECKPOINTS
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}"
    error = None
    if accelerator.is_main_process:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError as exc:
            error = exc
    # Every process takes the same branch (save_state may hold collectives of its own).
    written = _all_processes_succeeded(accelerator, error)
    if written:
        try:
            accelerator.save_state(str(tmp), safe_serialization=True)
            if accelerator.is_main_process:
                write_json_atomic(tmp / STATE_FILE, trainer_state)
        except _write_errors() as exc:
            error = exc
        written = _all_processes_succeeded(accelerator, error)
    if not written:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = _describe_write_error(error) if error is not None else "on another process"
        raise error_on_every_process(accelerator, (
            f"could not write checkpoint {final} ({reason}); free disk space or fix permissions, "
            f"then rerun with --resume (the previous checkpoint is intact)")) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replaced = None
        if final.exists():  # rewriting the same step (e.g. after a resume): keep it until swapped
            replaced = root / f".old-step_{step:06d}"
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(tmp, final)
        _fsync_dir(root)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        if save_total_limit > 0:
            for _, old in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(checkpoint_dir):
    return json.loads((Path(checkpoint_dir) / STATE_FILE).read_text())


def truncate_metrics(output_dir, step):
    """Drop metrics rows logged after `step` (by a run that died before its next checkpoint)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _save_tokenizer_as_given(tokenizer, directory):
    """save_pretrained without the pad token load_tokenizer lent a padless tokenizer for batching."""
    if not getattr(tokenizer, "pad_token_borrowed_from_eos", False):
        tokenizer.save_pretrained(directory)
        return
    pad_token = tokenizer.pad_token
    tokenizer.pad_token = None
    try:
        tokenizer.save_pretrained(directory)
    finally:
        tokenizer.pad_token = pad_token


def finish_run(accelerator, student, tokenizer, output_dir, run_config, state,
               end_of_turn_id=None):
    """The end of every training script: export the student (with the run's final step) and
    close the accelerator."""
    export_student(accelerator, student, tokenizer, output_dir,
                   {**run_config, "finished": True, "final_step": state["step"]},
                   end_of_turn_id=end_of_turn_id)
    accelerator.print(f"student saved to {output_dir}")
    accelerator.end_training()


def export_student(accelerator, model, tokenizer, output_dir, run_config, end_of_turn_id=None):
    """Save the trained student as a plain `save_pretrained` directory with its tokenizer."""
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    output_dir = Path(output_dir)
    student = accelerator.unwrap_model(model)
    if end_of_turn_id is not None and getattr(student, "generation_config", None) is not None:
        # Generation should stop at the chat template's end of turn, not only at EOS.
        eos = student.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if end_of_turn_id not in eos:
            student.generation_config.eos_token_id = eos + [end_of_turn_id]
        if student.generation_config.pad_token_id is None:
            student.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = output_dir / ".tmp-export"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        student.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        _save_tokenizer_as_given(tokenizer, tmp)
        for item in tmp.iterdir():
            os.replace(item, output_dir / item.name)
        tmp.rmdir()
        # Written last: its presence means the export is complete.
        write_json_atomic(output_dir / RUN_CONFIG_FILE, run_config)
    except _write_errors() as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write the trained student to {output_dir} "
                        f"({_describe_write_error(exc)}); free disk space or fix permissions, then "
                        f"rerun with --resume (it continues from the newest checkpoint)") from None
