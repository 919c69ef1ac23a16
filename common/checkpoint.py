"""Atomic checkpoints, resume, and the final export of the student.

Layout of OUTPUT_DIR:
    checkpoints/step_000050/   accelerate state (model, optimizer, scheduler, RNG) + trainer_state.json
    metrics.jsonl              one row per logged step
    run_config.json            the run's arguments and outcome (written at the end)
    config.json, model.safetensors, tokenizer files ...   the final student (save_pretrained)

A checkpoint is written into `checkpoints/.tmp-step_000050/` and renamed into place only once it is
complete, so a run killed mid-write never leaves a half checkpoint that looks whole (the next start
removes the temp folder). Resume reads the step from `trainer_state.json`, never from the folder
name; that file also records each file's size, so a damaged checkpoint is skipped for the previous
intact one, and the run's settings, so a resume with settings that change the result is refused.
--overwrite removes these files and no others.
"""

import json
import os
import re
import shutil
from pathlib import Path

from common.errors import UserError

STATE_FILE = "trainer_state.json"
RUN_CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"  # --report-to tensorboard writes its event files here
CHECKPOINTS = "checkpoints"
EXPORT_TMP = ".tmp-export"
# What the export wrote before it recorded its files in run_config.json: the names
# save_pretrained and a tokenizer's save_pretrained produce (read only for such older outputs).
_LEGACY_EXPORT_NAMES = frozenset({
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model"})
_LEGACY_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_STEP_DIR = re.compile(r"step_\d+")
_TMP_STEP_DIR = re.compile(r"\.(tmp|old)-step_\d+")


def _read_state(checkpoint_dir):
    """The checkpoint's trainer_state.json as a dict with an integer step, or None."""
    try:
        state = json.loads((Path(checkpoint_dir) / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None
    return state


def list_checkpoints(output_dir):
    """[(step, path)] of checkpoints with a readable state, oldest first. Half-written temp dirs
    are ignored; whether their files are intact is checkpoint_problem's question."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        state = None if path.name.startswith(".") else _read_state(path)
        if state is not None:
            found.append((state["step"], path))
    return sorted(found)


def latest_checkpoint(output_dir):
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def checkpoint_problem(checkpoint_dir):
    """Why a checkpoint cannot be resumed from, as a phrase naming the damaged file, or None.

    Every file's size is recorded in trainer_state.json when the checkpoint is written, so a
    truncated model or optimizer file is caught here rather than as a traceback inside load_state.
    """
    path = Path(checkpoint_dir)
    if not (path / STATE_FILE).is_file():
        return f"{path / STATE_FILE} is missing"
    state = _read_state(path)
    files = state.get("files", {}) if state is not None else None
    if not isinstance(files, dict):
        return f"{path / STATE_FILE} is unreadable or holds no step"
    for name, size in sorted(files.items()):
        file = path / name
        if not isinstance(size, int):  # hand-edited: no size to compare with
            return f"{path / STATE_FILE} holds no byte size for {name}"
        if ".." in Path(name).parts or not file.is_file():
            return f"{file} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{file} is damaged ({actual} bytes, {size} when written)"
    return None


def resumable_checkpoint(output_dir, log=print):
    """(path, state) of the newest checkpoint whose files are intact, or (None, None) if there is
    no checkpoint at all. A damaged one is skipped with a warning naming the damaged file; if
    every checkpoint is damaged, a UserError (starting from step 0 would throw the run away)."""
    root = Path(output_dir) / CHECKPOINTS
    # A folder of ours, or one with a trainer state (a checkpoint renamed or copied by hand).
    candidates = sorted(path for path in root.iterdir() if path.is_dir() and (
        _STEP_DIR.fullmatch(path.name) or (path / STATE_FILE).is_file())) if root.is_dir() else []
    intact, damaged = [], []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            intact.append((_read_state(path)["step"], path))
        else:
            damaged.append(problem)
    if not intact:
        if damaged:
            raise UserError(f"no intact checkpoint to resume from: {'; '.join(damaged)}; delete "
                            f"the damaged checkpoint folders to start from step 0, or pass "
                            f"--overwrite")
        return None, None
    step, newest = max(intact)
    for problem in damaged:
        log(f"warning: skipping a damaged checkpoint ({problem}); resuming from {newest} "
            f"(step {step}) instead")
    return newest, _read_state(newest)


def is_finished(output_dir):
    """run_config.json is written last by the export, so its presence means a finished run."""
    return (Path(output_dir) / RUN_CONFIG_FILE).is_file()


def has_started(output_dir):
    """Whether an earlier run left training state here: metrics rows or checkpoint folders."""
    path = Path(output_dir)
    checkpoints = path / CHECKPOINTS
    return (path / METRICS_FILE).exists() or (checkpoints.is_dir() and any(
        _STEP_DIR.fullmatch(child.name) for child in checkpoints.iterdir()))


def check_writable_location(output_dir):
    """A UserError unless --output-dir can be created and written: its nearest existing ancestor
    must be a writable directory (a file there, or a read-only one, would fail after the work)."""
    path = Path(output_dir)
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == path.absolute() else f"is inside {existing}, a file"
        raise UserError(f"--output-dir {path} {what}; pass a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output-dir {path}: {existing} is read-only; fix its permissions "
                        f"or choose another --output-dir")


def check_output_dir(output_dir, resume, overwrite):
    """Refuse to clobber or extend an earlier run by accident. Reads only; call before any work."""
    path = Path(output_dir)
    check_writable_location(path)
    if overwrite or not path.exists():
        return
    if is_finished(path):
        raise UserError(f"{path} already holds a finished run; pass --overwrite to train again "
                        f"or choose another --output-dir")
    started = has_started(path)
    if started and resume:
        # Every checkpoint damaged: say so now, not after loading models or generating.
        resumable_checkpoint(path, log=lambda message: None)
    if started and not resume:
        # Training on would append a second run's rows to the first one's metrics.jsonl.
        raise UserError(f"{path} holds an unfinished run (metrics.jsonl or checkpoints); pass "
                        f"--resume to continue it (from its newest checkpoint, or from step 0 if it "
                        f"wrote none) or --overwrite to start afresh")
    if not started and (path / "config.json").exists():
        raise UserError(f"{path} already holds a model; choose another --output-dir or pass "
                        f"--overwrite to replace it")


def _exported_names(output_dir):
    """The file names the export of the run in `output_dir` wrote (its run_config.json's record;
    for an output older than that record, the names save_pretrained writes)."""
    try:
        run_config = json.loads((Path(output_dir) / RUN_CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()
    if not isinstance(run_config, dict):
        return set()
    files = run_config.get("files")
    if files is None:
        present = {child.name for child in Path(output_dir).iterdir()}
        return {name for name in present
                if name in _LEGACY_EXPORT_NAMES or _LEGACY_SHARD.fullmatch(name)}
    # Plain names only: a hand-edited record must not reach outside the directory.
    return {name for name in files if isinstance(name, str) and Path(name).name == name
            and name not in ("", ".", "..")}


def clear_output_dir(output_dir, keep=()):
    """For --overwrite: remove what an earlier run of this suite wrote, and only that: its
    checkpoints, metrics.jsonl, tensorboard/, run_config.json, the exported student's files (as
    recorded in run_config.json) and temporary files. Everything else (a dataset, notes, a
    completions file, a teacher cache) is kept, as are the names in `keep`. Returns the kept
    entries' names."""
    path = Path(output_dir)
    if not path.is_dir():
        return []
    ours = {METRICS_FILE, RUN_CONFIG_FILE, EXPORT_TMP, TENSORBOARD_DIR,
            f".{METRICS_FILE}.tmp", f".{RUN_CONFIG_FILE}.tmp", *_exported_names(path)} - set(keep)
    kept = []
    for child in sorted(path.iterdir()):
        is_dir = child.is_dir() and not child.is_symlink()
        if child.name == CHECKPOINTS and is_dir:
            for checkpoint in sorted(child.iterdir()):
                if (_STEP_DIR.fullmatch(checkpoint.name) or _TMP_STEP_DIR.fullmatch(
                        checkpoint.name)) and checkpoint.is_dir() and not checkpoint.is_symlink():
                    shutil.rmtree(checkpoint)
                else:
                    kept.append(f"{CHECKPOINTS}/{checkpoint.name}")
            if not any(child.iterdir()):
                child.rmdir()
        elif child.name not in ours:
            kept.append(child.name)
        elif is_dir:
            shutil.rmtree(child)
        else:
            child.unlink()
    return kept


def remove_leftovers(output_dir):
    """Clean up after a run killed while writing: temporary checkpoint folders (a checkpoint
    half-swapped in is restored first), empty step_* folders, the export's temp folder and our
    JSON temp files. Only names this module writes are touched."""
    path = Path(output_dir)
    root = path / CHECKPOINTS
    if root.is_dir():
        for old in root.glob(".old-step_*"):
            final = root / old.name.removeprefix(".old-")
            if old.is_dir() and not final.exists():  # killed between the two renames
                os.replace(old, final)
        for child in root.iterdir():
            if child.is_symlink() or not child.is_dir():
                continue
            if _TMP_STEP_DIR.fullmatch(child.name) or (
                    _STEP_DIR.fullmatch(child.name) and not any(child.iterdir())):
                shutil.rmtree(child)
    shutil.rmtree(path / EXPORT_TMP, ignore_errors=True)
    for name in (METRICS_FILE, RUN_CONFIG_FILE):
        (path / f".{name}.tmp").unlink(missing_ok=True)


def prepare_output_dir(accelerator, output_dir, overwrite, keep=()):
    """Clear it (--overwrite, see clear_output_dir), create it and remove what a killed run left
    half-written, on the main process only; every process waits, so none writes into a
    directory still being cleared. Returns it as a Path."""
    output_dir = Path(output_dir)
    if accelerator.is_main_process:
        try:
            if overwrite:
                kept = clear_output_dir(output_dir, keep=keep)
                if kept:
                    shown = ", ".join(kept[:6]) + (f" and {len(kept) - 6} more"
                                                   if len(kept) > 6 else "")
                    accelerator.print(f"note: --overwrite kept {len(kept)} entries of {output_dir} "
                                      f"that this suite did not write: {shown}")
            output_dir.mkdir(parents=True, exist_ok=True)
            remove_leftovers(output_dir)
        except OSError as exc:
            raise UserError(f"cannot prepare --output-dir {output_dir} "
                            f"({_describe_write_error(exc)}); fix its permissions or choose "
                            f"another --output-dir") from None
    accelerator.wait_for_everyone()
    return output_dir


def make_run_config(method, command, **groups):
    """What every checkpoint and the final output record about the run: the method, the command
    line, each argument group (dataclasses) as a dict, and the versions that ran it; and, for
    groups that renamed a flag, {group: {old field: new field}}, so that a checkpoint written
    under the old name is compared with the new one on resume; and for groups that removed a flag,
    {group: {removed field: what replaced it}}, so that a checkpoint that still has it is refused
    rather than resumed with the setting silently dropped."""
    import dataclasses
    import platform

    import accelerate
    import torch
    import transformers

    from common.args import renamed_flags

    renamed = {name: {old: new for old, (new, _) in renamed_flags(type(args)).items()}
               for name, args in groups.items()}
    renamed = {name: fields for name, fields in renamed.items() if fields}
    removed = {name: dict(getattr(type(args), "REMOVED_FLAGS", {})) for name, args in groups.items()}
    removed = {name: fields for name, fields in removed.items() if fields}
    return {"method": method, "command": command,
            **{name: dataclasses.asdict(args) for name, args in groups.items()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__,
                         "accelerate": accelerate.__version__},
            **({"renamed_settings": renamed} if renamed else {}),
            **({"removed_settings": removed} if removed else {})}


# Settings that cannot change the trained weights, by field name in any argument group: where
# output goes, how often it is logged, scored or saved, memory knobs that change only the float
# rounding, how the teacher API is reached. --batch-size is here because the checkpoint's global
# batch (--batch-size x processes) is compared instead: 2 processes x 2 rows resume as 1 x 4.
RESULT_NEUTRAL_SETTINGS = frozenset({
    "output_dir", "log_steps", "save_steps", "save_total_limit", "eval_dataset",
    "eval_dataset_split", "eval_steps", "resume", "overwrite", "allow_changed_settings",
    "max_bad_steps", "gradient_checkpointing", "loss_chunk_size", "batch_size",
    "trust_remote_code", "api_key_env", "api_concurrency", "api_timeout", "api_max_retries",
    "generation_batch_size", "generate_only", "report_to", "run_name"})
# Parts of a run config that are records, not settings (the completions path of
# sequence_level.py follows --output-dir unless --completions names it).
_RECORD_KEYS = frozenset({"command", "versions", "completions", "finished", "final_step",
                          "num_processes", "effective_batch_size", "files", "renamed_settings",
                          "removed_settings"})
# Trainer-state entries compared on resume, with the --allow-changed-settings name of each.
_DERIVED_SETTINGS = {"global_batch_size": ("batch_size", "--batch-size x processes"),
                     "data_fingerprint": ("dataset", "the training data's content"),
                     "mixed_precision": ("mixed_precision", "the mixed precision in use")}


def setting_name(name):
    """--allow-changed-settings spelling of a flag or field: `--max-steps` -> `max_steps`."""
    return name.strip().lstrip("-").replace("-", "_")


def known_settings(run_config):
    names = {field for key, group in run_config.items()
             if isinstance(group, dict) and key not in _RECORD_KEYS for field in group}
    removed = {field for fields in (run_config.get("removed_settings") or {}).values()
               for field in fields}
    return names | removed | {key for key in run_config if key not in _RECORD_KEYS} | {
        name for name, _ in _DERIVED_SETTINGS.values()}


def renamed_to_current(saved, renamed):
    """The saved run config with the fields this version renamed ({group: {old: new}}) under
    their new names, where the checkpoint has only the old one."""
    saved = dict(saved)
    for group, fields in renamed.items():
        values = saved.get(group)
        if not isinstance(values, dict):
            continue
        values = dict(values)
        for old, new in fields.items():
            if old in values and new not in values:
                values[new] = values.pop(old)
        saved[group] = values
    return saved


def changed_settings(saved_state, current_state):
    """[(setting name, description)] of the ways this run's settings differ from a checkpoint's
    trainer state, for the settings that change the result. Every argument group is compared
    field by field; a field only one side has (written by another version) is not a change,
    unless this version removed it (its meaning moved to another setting)."""
    def same(a, b):  # JSON spelling: tuples are lists, and NaN equals NaN
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)

    def shown(value):
        return json.dumps(value) if isinstance(value, (str, type(None))) else value

    changes = []
    saved, current = saved_state.get("args") or {}, current_state["args"]
    saved = renamed_to_current(saved, current.get("renamed_settings") or {})
    for key in sorted(set(saved) & set(current) - _RECORD_KEYS):
        old, new = saved[key], current[key]
        if isinstance(old, dict) and isinstance(new, dict):
            for name in sorted(set(old) & set(new) - RESULT_NEUTRAL_SETTINGS):
                if not same(old[name], new[name]):
                    changes.append((name, f"--{name.replace('_', '-')} ({shown(old[name])} in "
                                          f"the checkpoint, {shown(new[name])} now)"))
        elif not same(old, new):
            changes.append((key, f"{key} ({shown(old)} in the checkpoint, {shown(new)} now)"))
    for group, fields in (current.get("removed_settings") or {}).items():
        values = saved.get(group)
        for name, note in fields.items():
            if isinstance(values, dict) and name in values:
                changes.append((name, f"--{name.replace('_', '-')} ({shown(values[name])} in the "
                                      f"checkpoint, removed now: {note})"))
    for key, (name, what) in _DERIVED_SETTINGS.items():
        if key in saved_state and key in current_state and not same(saved_state[key],
                                                                     current_state[key]):
            changes.append((name, f"{what} ({shown(saved_state[key])} in the checkpoint, "
                                  f"{shown(current_state[key])} now)"))
    return changes


def examples_digest(examples):
    """sha256 (16 hex digits) of encoded examples' token ids and labels, in order: covers the data,
    the chat template, masking and --max-length. Resume and the teacher cache both compare it."""
    import hashlib
    from array import array

    digest = hashlib.sha256()
    for example in examples:
        for name in ("input_ids", "labels"):
            values = example.get(name, ())
            digest.update(array("q", [len(values)]).tobytes())
            digest.update(array("q", values).tobytes())
    return digest.hexdigest()[:16]


def data_fingerprint(examples):
    """The training data as resume compares it, so a dataset edited in place, another
    --max-length or chat template is noticed."""
    return f"{len(examples)} examples, sha256 {examples_digest(examples)}"


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


def _file_sizes(directory):
    return {str(file.relative_to(directory)): file.stat().st_size
            for file in sorted(Path(directory).rglob("*")) if file.is_file()}


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
        except _write_errors() as exc:
            error = exc
        written = _all_processes_succeeded(accelerator, error)
    if written:  # every process has written its files: their sizes make truncation detectable
        if accelerator.is_main_process:
            try:
                write_json_atomic(tmp / STATE_FILE, {**trainer_state, "files": _file_sizes(tmp)})
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
    record = {name: state[name] for name in ("num_processes", "effective_batch_size",
                                             "mixed_precision", "non_finite_steps")
              if name in state}
    export_student(accelerator, student, tokenizer, output_dir,
                   {**run_config, **record, "finished": True, "final_step": state["step"]},
                   end_of_turn_id=end_of_turn_id)
    accelerator.print(f"student saved to {output_dir}")
    accelerator.end_training()


def export_student(accelerator, model, tokenizer, output_dir, run_config, end_of_turn_id=None):
    """Save the trained student as a plain `save_pretrained` directory with its tokenizer. A LoRA
    student (common/lora.py) is saved merged, and its adapter beside it in OUTPUT_DIR/adapter."""
    from common.lora import ADAPTER_DIR, is_adapter_model

    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    output_dir = Path(output_dir)
    student = accelerator.unwrap_model(model)
    has_adapter = is_adapter_model(student)
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
        if has_adapter:
            # The adapter alone (peft picks its weights out of the whole state dict), then the
            # student with the adapter merged into its weights, in place: the run is over.
            student.save_pretrained(tmp / ADAPTER_DIR, state_dict=state_dict,
                                    save_embedding_layers=False)
            student, state_dict = student.merge_and_unload(), None
        student.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        _save_tokenizer_as_given(tokenizer, tmp)
        names = sorted(item.name for item in tmp.iterdir())
        for name in names:
            os.replace(tmp / name, output_dir / name)
        tmp.rmdir()
        # Written last: its presence means the export is complete. Its list of files is what
        # --overwrite removes, and nothing else the directory holds.
        write_json_atomic(output_dir / RUN_CONFIG_FILE, {**run_config, "files": names})
    except _write_errors() as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write the trained student to {output_dir} "
                        f"({_describe_write_error(exc)}); free disk space or fix permissions, then "
                        f"rerun with --resume (it continues from the newest checkpoint)") from None
