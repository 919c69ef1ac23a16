"""The one training loop shared by every method.

A method supplies a `Method`: its `loss(model, batch) -> (loss_sum, stats)` gives the SUM of its
per-token loss over the batch's supervised positions, plus a dict of other per-token sums to log
(e.g. {"kd": .., "ce": ..}). Supervised positions are those whose `labels` are not -100; a method
whose labels only exist after some work (on-policy sampling) gives `prepare(model, batch, step) ->
batch`, run before counting.

The loop divides by the number of supervised tokens in the whole optimizer step (all micro-batches,
all processes), so the gradient is the per-token mean over the effective batch however it is split:
1 x 8 and 2 x 4 micro-batching give the same update.
"""

import contextlib
import json
import math
import os
import pickle
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from common.chat import IGNORE_INDEX, collate, supervised_positions
from common.checkpoint import (METRICS_FILE, TENSORBOARD_DIR, changed_settings,
                               data_fingerprint, error_on_every_process, known_settings,
                               resumable_checkpoint, save_checkpoint, setting_name,
                               truncate_metrics)
from common.errors import UserError
from common.sharding import check_sharding_settings


_MPI_WORLD_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_world_size():
    """Processes in this run according to the launcher: torchrun / accelerate's multi-process
    launcher set WORLD_SIZE, mpirun (Open MPI, Intel MPI, MVAPICH) its own variable."""
    for name in ("WORLD_SIZE", *_MPI_WORLD_SIZE_VARIABLES):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def single_process_cpu_launch_warning(num_processes):
    """The warning for `accelerate launch --cpu --num_processes N` (N > 1) without an MPI hostfile.

    accelerate's "simple" launcher handles --cpu: without --mpirun_hostfile it starts ONE process,
    with MASTER_ADDR set only because more than one was asked for. Training then runs as one
    process with a smaller global batch than asked; say so instead of letting it pass silently.
    """
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if num_processes > 1 or not use_cpu or "MASTER_ADDR" not in os.environ:
        return None
    return ("warning: `accelerate launch --cpu` started ONE process (without --mpirun_hostfile it "
            "never starts more), so this run trains as a single process; for N CPU processes "
            "use `accelerate launch --config_file configs/ddp.yaml --num_processes N` (no --cpu), "
            "`torchrun --nproc_per_node N` or `accelerate launch --cpu --mpirun_hostfile FILE`")


def make_accelerator(args):
    """Accelerator whose accumulation is driven by our explicit windows of `grad_accum` batches."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    plugin = GradientAccumulationPlugin(num_steps=args.grad_accum, sync_with_dataloader=False)
    # accelerate only sets up multi-process CPU training (gloo) when told it is on the CPU; a
    # torchrun or accelerate multi-process launch on a machine without CUDA does not tell it.
    world_size = launched_world_size()
    cpu_only = world_size > 1 and not torch.cuda.is_available()
    if cpu_only and "WORLD_SIZE" not in os.environ:
        # Started by a bare `mpirun -n N python script.py`: gloo needs a rendezvous address, and
        # one machine is the only case where we can guess it.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    accelerator = Accelerator(gradient_accumulation_plugin=plugin,
                              mixed_precision=args.mixed_precision, cpu=cpu_only,
                              log_with=make_trackers(args) or None)
    if not accelerator.is_local_main_process:
        # The libraries' progress bars and notices once per machine, not once per process.
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    warning = single_process_cpu_launch_warning(accelerator.num_processes)
    if warning:
        accelerator.print(warning)
    configure_deepspeed(accelerator, args)
    return accelerator


TRACKER_PROJECT = "distillation"


def run_name(args):
    """--run-name, or the output directory's last folder."""
    return args.run_name or Path(os.path.abspath(args.output_dir)).name


def make_trackers(args):
    """accelerate trackers for --report-to, built here so that the run is named by --run-name and
    the project by the tracker's usual environment variable (as transformers' integrations do):
    accelerate would use one name for both."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    from common.args import installed_trackers

    names = installed_trackers(getattr(args, "report_to", "none"))
    name = run_name(args) if names else None
    trackers = []
    for tracker in names:
        if tracker == "tensorboard":  # OUTPUT_DIR/tensorboard/RUN_NAME/events.out.tfevents.*
            trackers.append(TensorBoardTracker(name, str(Path(args.output_dir) / TENSORBOARD_DIR)))
        elif tracker == "wandb":
            trackers.append(WandBTracker(os.environ.get("WANDB_PROJECT", TRACKER_PROJECT),
                                         name=name))
        elif tracker == "trackio":
            trackers.append(TrackioTracker(os.environ.get("TRACKIO_PROJECT", TRACKER_PROJECT),
                                           name=name))
        elif tracker == "mlflow":  # MLFLOW_EXPERIMENT_NAME, when set, wins inside accelerate
            trackers.append(MLflowTracker(TRACKER_PROJECT, run_name=name))
    return trackers


@contextlib.contextmanager
def _closing_trackers(accelerator):
    """Close the trackers when training ends, stopped or failed too, so that their last rows
    reach disk (a resume drops the event rows after its checkpoint, not before).
    accelerator.end_training() would also destroy the process group the export still needs."""
    try:
        yield
    finally:
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers = []


def tracker_config(run_config, args):
    """The run's settings as tracker hyper-parameters: flat "group.field" keys, scalars only
    (lists joined by commas, unset values left out). run_config is already free of secrets (the
    API URL is redacted before it is made)."""
    flat = {"run_name": run_name(args)}

    def add(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                add(f"{prefix}.{key}" if prefix else key, item)
        elif isinstance(value, (list, tuple)):
            if value:
                flat[prefix] = ",".join(map(str, value))
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value

    add("", run_config)
    return flat


def tracker_values(row):
    """A metrics.jsonl row as tracker scalars: its numbers but the step (the x axis)."""
    return {key: value for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def configure_deepspeed(accelerator, args):
    """Write our batch settings into an accelerate DeepSpeed config's "auto" fields.

    accelerate fills them from a DataLoader passed to prepare(); this loop builds its own batches,
    so it says what they are: micro-batch per process, accumulation, and --max-grad-norm (DeepSpeed
    clips inside its own step, so the value must be in its config). No-op without DeepSpeed.
    """
    deepspeed_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed_plugin is None:
        return
    config = deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = args.batch_size
    config["gradient_accumulation_steps"] = args.grad_accum
    config["train_batch_size"] = args.batch_size * args.grad_accum * accelerator.num_processes
    config["gradient_clipping"] = args.max_grad_norm  # 0 = no clipping, as for --max-grad-norm


class BatchOrder:
    """Which example indices each process reads for micro-batch number `position` of the run.

    Every epoch is a fresh permutation seeded by (seed, epoch), identical on all processes; a
    global micro-batch of batch_size x num_processes rows is cut from it and each process takes its
    slice. The last, short batch of an epoch wraps around to the epoch's start, so every process
    always has a full batch. Position alone determines the batch, which makes resume exact.

    With `lengths` (one per example; --group-by-length), each run of GROUP_BATCHES global batches
    of the permutation is sorted by length and cut into batches, whose order is then shuffled:
    rows of a batch have similar lengths (less padding), while which lengths come when stays
    random. Still a function of (seed, epoch) alone.
    """

    GROUP_BATCHES = 64

    def __init__(self, num_examples, batch_size, num_processes=1, process_index=0, seed=0,
                 lengths=None):
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.global_batch_size = batch_size * num_processes
        self.process_index = process_index
        self.seed = seed
        self.lengths = lengths
        self.batches_per_epoch = math.ceil(num_examples / self.global_batch_size)
        self._epoch, self._permutation = None, None

    def permutation(self, epoch):
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            permutation = torch.randperm(self.num_examples, generator=generator).tolist()
            if self.lengths is not None:
                permutation = self._grouped(permutation, generator)
            self._permutation, self._epoch = permutation, epoch
        return self._permutation

    def _grouped(self, permutation, generator):
        size = self.global_batch_size
        group = size * self.GROUP_BATCHES
        batches = []
        for start in range(0, len(permutation), group):
            # sorted() is stable: equal lengths keep their shuffled order.
            rows = sorted(permutation[start:start + group], key=lambda i: -self.lengths[i])
            batches += [rows[k:k + size] for k in range(0, len(rows), size)]
        # The one short batch (the epoch's tail) stays last: it wraps around as before.
        full = [b for b in batches if len(b) == size]
        short = [b for b in batches if len(b) < size]
        order = torch.randperm(len(full), generator=generator).tolist()
        return [i for k in order for i in full[k]] + [i for b in short for i in b]

    def indices(self, position):
        epoch, index = divmod(position, self.batches_per_epoch)
        permutation = self.permutation(epoch)
        start = index * self.global_batch_size + self.process_index * self.batch_size
        return [permutation[(start + k) % self.num_examples] for k in range(self.batch_size)]


def count_supervised(batch):
    """Positions whose next token is supervised (what the losses average over)."""
    return supervised_positions(batch["labels"]).sum()


def backward_window(accelerator, model, window, loss_fn):
    """Forward + backward over one optimizer step's micro-batches; returns summed stats.

    The gradient left in the parameters is d(Σ token losses)/dθ / (supervised tokens in the whole
    window, across processes). `window` must hold accelerator.gradient_accumulation_steps batches.
    """
    accumulation_steps = accelerator.gradient_accumulation_steps
    if len(window) != accumulation_steps:
        raise ValueError(f"window of {len(window)} batches, accelerator expects {accumulation_steps}")
    local_tokens = sum(count_supervised(batch) for batch in window)
    global_tokens = accelerator.reduce(local_tokens.to(accelerator.device), "sum")
    # accelerator.backward divides by the accumulation steps and DDP averages gradients over
    # processes; multiply both back so the result is the per-token mean over the global window.
    scale = accumulation_steps * accelerator.num_processes / global_tokens.clamp(min=1).float()
    sums = {}
    for batch in window:
        with accelerator.accumulate(model):
            loss_sum, stats = loss_fn(model, batch)
            accelerator.backward(loss_sum * scale)
        for name, value in {"loss": loss_sum, **stats}.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
    return sums, global_tokens


def evaluate(accelerator, model, examples, batch_size, loss_fn, collate_fn, pad_token_id):
    """The loss and its statistics per supervised token over held-out `examples`, all processes
    together: ({name: mean}, supervised tokens). No gradients; the model is left in train mode.

    Process p scores examples p, p + P, ...; every process runs the same number of batches (a
    DDP or sharded forward holds collectives that must pair up), the shortfall filled with a copy
    of an example whose labels are all masked, which adds nothing.
    """
    processes = accelerator.num_processes
    mine = examples[accelerator.process_index::processes]
    filler = {**examples[0], "labels": [IGNORE_INDEX] * len(examples[0]["labels"])}
    mine += [filler] * (math.ceil(len(examples) / processes) - len(mine))
    sums, tokens = {}, torch.zeros((), dtype=torch.long, device=accelerator.device)
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(mine), batch_size):
                batch = collate_fn(mine[start:start + batch_size], pad_token_id)
                batch = {name: tensor.to(accelerator.device) for name, tensor in batch.items()}
                loss_sum, stats = loss_fn(model, batch)
                for name, value in {"loss": loss_sum, **stats}.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().double()
                tokens += count_supervised(batch).to(tokens.device)
    finally:
        model.train()
    names = sorted(sums)
    totals = accelerator.reduce(torch.stack([sums[n] for n in names]), "sum")
    tokens = int(accelerator.reduce(tokens, "sum"))  # an integer: exact past 2^24 tokens
    return {n: totals[i].item() / max(tokens, 1) for i, n in enumerate(names)}, tokens


class _StopFlag:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the end of the step and exits.

    Repeated signals change nothing: a scheduler may signal every process while the launcher
    forwards the same signal again, and the run must still end in a checkpoint.
    """

    def __init__(self):
        self.signal_name = None

    @contextmanager
    def installed(self):
        previous = {}

        def handler(signum, _frame):
            self.signal_name = self.signal_name or signal.Signals(signum).name

        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[signum] = signal.signal(signum, handler)
            except ValueError:  # not the main thread
                pass
        try:
            yield self
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)


def mean_over_processes(accelerator, row):
    """A metrics row whose numbers (e.g. on-policy sample lengths, measured on each process' own
    rows) are averaged over processes; flags and strings are kept. Every process must pass the
    same keys (they all call this at the same step)."""
    names = sorted(name for name, value in row.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool))
    if accelerator.num_processes == 1 or not names:
        return row
    values = torch.tensor([float(row[name]) for name in names], device=accelerator.device)
    values = accelerator.reduce(values, "mean")
    return {**row, **{name: round(values[i].item(), 6) for i, name in enumerate(names)}}


def _make_optimizer_and_schedule(model, args, total_steps):
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=args.learning_rate)
    scheduler = get_scheduler(
        "constant_with_warmup" if args.lr_scheduler == "constant" else args.lr_scheduler,
        optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * total_steps),
        num_training_steps=total_steps)
    return optimizer, scheduler


def _load_errors():
    """What a damaged checkpoint raises from load_state: torch.load's and safetensors' errors."""
    errors = [OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError]
    try:
        from safetensors import SafetensorError
        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


def first_sentence(exc):
    """The first sentence of an error, at most 200 characters. torch's advice after it (load with
    weights_only=False) would run whatever code a damaged or planted pickle holds."""
    first_line = (str(exc).splitlines() or [""])[0]
    return first_line.split(". ", 1)[0][:200]


def check_resume_settings(accelerator, saved_state, current_state, allow_changed_settings):
    """Refuse to resume with settings that change the result (named, one line), unless
    --allow-changed-settings names them; a checkpoint without a record of its settings (written
    by hand or an old version) is resumed with a warning."""
    renamed_settings = current_state["args"].get("renamed_settings") or {}
    renamed = {old: new for fields in renamed_settings.values()
               for old, new in fields.items()}  # an old flag name stands for its new one
    allowed = {renamed.get(setting_name(name), setting_name(name))
               for name in (allow_changed_settings or "").split(",") if name.strip()}
    unknown = sorted(allowed - known_settings(current_state["args"]))
    if unknown:
        raise error_on_every_process(accelerator, (
            f"--allow-changed-settings: unknown setting(s) {', '.join(unknown)}; name flags of "
            f"this script without dashes, e.g. max-steps,learning-rate"))
    if saved_state.get("args") is None:
        accelerator.print("warning: the checkpoint does not record its settings; they cannot "
                          "be compared with this run's")
        return []
    changes = changed_settings(saved_state, current_state)
    refused = [(name, what) for name, what in changes if name not in allowed]
    if refused:
        names = ",".join(dict.fromkeys(name.replace("_", "-") for name, _ in refused))
        raise error_on_every_process(accelerator, (
            f"--resume: this run's settings differ from the checkpoint's in ways that change the "
            f"result: {'; '.join(what for _, what in refused)}. Rerun with the checkpoint's "
            f"settings, or pass --allow-changed-settings {names} to continue with the new ones "
            f"(the result then matches no uninterrupted run)"))
    if changes:
        accelerator.print("note: continuing with changed settings: "
                          + "; ".join(what for _, what in changes))
    saved_versions = saved_state["args"].get("versions")
    current_versions = current_state["args"].get("versions")
    if saved_versions and current_versions and saved_versions != current_versions:
        accelerator.print(f"note: the checkpoint was written with {saved_versions}, this run has "
                          f"{current_versions}; the result may differ in the last digits")
    return changes


def _apply_optimizer_settings(optimizer, scheduler, args):
    """This run's --learning-rate and --weight-decay, at the schedule's current step (the
    checkpoint restored its own base rate, rate and decay)."""
    lr_lambdas = getattr(scheduler, "lr_lambdas", None)
    for index, group in enumerate(optimizer.param_groups):
        if index == 0:  # the matrices; biases and norms never decay
            group["weight_decay"] = args.weight_decay
        if lr_lambdas is not None:
            group["lr"] = args.learning_rate * lr_lambdas[index](scheduler.last_epoch)
    if lr_lambdas is not None:
        scheduler.base_lrs = [args.learning_rate] * len(optimizer.param_groups)


def total_optimizer_steps(args, num_examples, num_processes):
    if args.max_steps > 0:
        return args.max_steps
    batches_per_epoch = math.ceil(num_examples / (args.batch_size * num_processes))
    return max(1, math.ceil(args.num_epochs * batches_per_epoch / args.grad_accum))


@dataclass(frozen=True)
class Method:
    """What a method gives the shared loop: its loss and, where the defaults do not fit, how its
    batches are built and scored.

    `loss(model, batch) -> (loss_sum, stats)`: the SUM of the method's per-token loss over the
    batch's supervised positions (labels != -100), and a dict of other per-token sums to log
    (e.g. {"kd": .., "ce": ..}).
    `collate(examples, pad_token_id) -> dict of tensors` builds a micro-batch; a method whose
    examples carry more fields than input_ids/labels passes its own.
    `prepare(model, batch, step) -> batch` runs on each micro-batch before the supervised tokens
    are counted (`step` = 0-based index of the optimizer step); on-policy sampling happens there.
    `step_metrics(step) -> dict` adds method-specific fields to that step's metrics row.
    `eval_loss` and `eval_collate` score held-out examples (default: `loss` and `collate`), never
    through `prepare`.
    """

    loss: Callable
    collate: Callable = collate
    prepare: Optional[Callable] = None
    step_metrics: Optional[Callable] = None
    eval_loss: Optional[Callable] = None
    eval_collate: Optional[Callable] = None


@dataclass
class LoopState:
    """How far the loop has gone. A checkpoint records all but bad_steps_in_row, which a resumed
    run counts afresh."""

    step: int = 0  # optimizer steps taken, skipped updates included
    applied_steps: int = 0
    non_finite_steps: int = 0  # updates skipped for a NaN/inf loss or gradient
    bad_steps_in_row: int = 0

    def count(self, applied):
        self.step += 1
        self.bad_steps_in_row = 0 if applied else self.bad_steps_in_row + 1
        self.applied_steps += applied
        self.non_finite_steps += not applied


def _micro_batches(accelerator, model, examples, order, method, pad_token_id, step, grad_accum):
    """The `grad_accum` micro-batches of optimizer step `step` (0-based), on the device and
    through method.prepare."""
    window = []
    for k in range(grad_accum):
        batch = method.collate(
            [examples[i] for i in order.indices(step * grad_accum + k)], pad_token_id)
        batch = {name: tensor.to(accelerator.device) for name, tensor in batch.items()}
        window.append(method.prepare(model, batch, step) if method.prepare else batch)
    return window


def _clip_gradients(accelerator, model, max_grad_norm):
    """Clip to --max-grad-norm (0 = never); returns the norm before clipping, or None."""
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    # DeepSpeed clips inside its own step and may report no norm: nothing to check then.
    return None if grad_norm is None else float(grad_norm)


def _means_and_stop_vote(accelerator, sums, global_tokens, stop_requested):
    """The window's sums as means per supervised token over all processes, and whether any
    process was asked to stop."""
    # Everything logged is a mean per supervised token over all processes. A stop signal rides
    # along in the same reduction: every process must stop at the same step, or the ones still
    # training would wait forever for the ones writing a checkpoint.
    names = sorted(sums)
    stop_vote = torch.tensor(float(stop_requested), device=accelerator.device)
    totals = accelerator.reduce(torch.stack([*(sums[n] for n in names), stop_vote]), "sum")
    means = {n: (totals[i] / global_tokens.clamp(min=1)).item() for i, n in enumerate(names)}
    return means, totals[-1].item() > 0


def _update(accelerator, optimizer, scheduler, loss, grad_norm):
    """The optimizer update, skipped when the loss or the gradient is NaN/inf; returns whether it
    was applied. The schedule advances either way."""
    applied = math.isfinite(loss) and math.isfinite(grad_norm or 0.0)
    if accelerator.scaler is not None:
        # fp16: an inf gradient is the loss scaler's business (it skips that update and
        # lowers the scale); skipping its step() as well would leave it stuck. Only a
        # non-finite loss counts as a bad step.
        optimizer.step()
        applied = math.isfinite(loss)
    elif applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return applied


def _report_skipped_update(accelerator, loop, loss, grad_norm, max_bad_steps):
    """Say that this step's update was skipped; stop the run after --max-bad-steps in a row."""
    accelerator.print(f"step {loop.step:05d} | non-finite loss or gradient "
                      f"(loss {loss}, grad norm {grad_norm}): "
                      f"update skipped ({loop.bad_steps_in_row} in a row)")
    if loop.bad_steps_in_row >= max_bad_steps:
        raise error_on_every_process(accelerator, (
            f"{loop.bad_steps_in_row} optimizer steps in a row had a NaN/inf loss or "
            f"gradient (last at step {loop.step}); lower --learning-rate, use float32 "
            f"(--dtype float32 / --mixed-precision bf16), check the data, then rerun "
            f"with --resume from the last checkpoint"))


class _RunLog:
    """Where the loop reports: metrics.jsonl, the trackers and lines above the progress bar, all
    from the main process; and the input tokens counted for tokens_per_second."""

    def __init__(self, accelerator, output_dir, step, total_steps):
        self.accelerator, self.total_steps = accelerator, total_steps
        self.metrics_path = output_dir / METRICS_FILE
        self.progress = tqdm(total=total_steps, initial=step, desc="training", dynamic_ncols=True,
                             disable=not accelerator.is_local_main_process)
        self.last_time, self.tokens_since_log = time.perf_counter(), 0

    def step_done(self, window):
        self.progress.update(1)
        self.tokens_since_log += sum(int(b["attention_mask"].sum()) for b in window)

    def write(self, row, line):
        if self.accelerator.is_main_process:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.accelerator.log(tracker_values(row), step=row["step"])
            self.progress.write(f"step {row['step']:05d}/{self.total_steps} | {line}")

    def training_row(self, step, epoch, means, lr, grad_norm, step_metrics, global_tokens):
        """The row of optimizer step `step` (1-based); step_metrics(step - 1) adds the method's
        fields, averaged over processes."""
        accelerator = self.accelerator
        elapsed = time.perf_counter() - self.last_time
        row = {"step": step, "epoch": round(epoch, 4),
               **{n: round(v, 6) for n, v in means.items()},
               "lr": lr,
               "grad_norm": None if grad_norm is None else round(grad_norm, 6),
               **(mean_over_processes(accelerator, step_metrics(step - 1))
                  if step_metrics else {}),
               "supervised_tokens": int(global_tokens),
               "tokens_per_second": round(self.tokens_since_log * accelerator.num_processes
                                          / max(elapsed, 1e-9), 1)}
        extras = " | ".join(f"{n} {v:.4f}" for n, v in means.items() if n != "loss")
        self.write(row, f"loss {means['loss']:.4f}"
                        + (f" | {extras}" if extras else "")
                        + f" | lr {row['lr']:.2e}"
                        + (f" | grad {grad_norm:.3f}" if grad_norm is not None else "")
                        + f" | tok/s {row['tokens_per_second']:.0f}")
        self.progress.set_postfix(loss=f"{means['loss']:.4f}")
        self.last_time, self.tokens_since_log = time.perf_counter(), 0

    def held_out_row(self, step, means, eval_tokens):
        row = {"step": step, **{f"eval_{n}": round(v, 6) for n, v in means.items()},
               "eval_supervised_tokens": eval_tokens}
        self.write(row, " | ".join(f"eval {n} {v:.4f}" for n, v in means.items()))


def _checkpoint_due(args, loop, total_steps, interrupted):
    """Whether to save a checkpoint after this step: every --save-steps, and when stopped."""
    # No periodic checkpoint inside a run of bad steps: the newest one stays the last
    # good state (--save-total-limit would otherwise rotate good ones out).
    periodic = args.save_steps and loop.step % args.save_steps == 0 and loop.bad_steps_in_row == 0
    return loop.step < total_steps and (periodic or interrupted)


def _held_out_due(args, step, total_steps):
    """Whether to score the held-out examples after this step: every --eval-steps and at the
    end."""
    return step == total_steps or (args.eval_steps and step % args.eval_steps == 0)


def _score_held_out(accelerator, model, eval_examples, method, batch_size, pad_token_id):
    """evaluate() with the method's held-out loss and collate (default: its training ones)."""
    return evaluate(accelerator, model, eval_examples, batch_size, method.eval_loss or method.loss,
                    method.eval_collate or method.collate, pad_token_id)


def train(accelerator, model, examples, args, method, pad_token_id, run_config,
          eval_examples=None):
    """Train `model` on encoded `examples` with `method` (a Method); returns the model (still
    wrapped) and the final state.

    `eval_examples` (held-out, encoded like `examples`) are scored every `args.eval_steps` and at
    the end with the method's eval_loss and eval_collate; the result is a metrics row of eval_*
    fields.

    Checkpoints go to OUTPUT_DIR/checkpoints every `args.save_steps`; with `args.resume` the newest
    one is loaded first and the run continues exactly where it stopped.
    """
    check_sharding_settings(accelerator)
    output_dir = Path(args.output_dir)
    total_steps = total_optimizer_steps(args, len(examples), accelerator.num_processes)
    optimizer, scheduler = _make_optimizer_and_schedule(model, args, total_steps)
    # The scheduler is not passed to prepare(): accelerate would step it once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    order = BatchOrder(len(examples), args.batch_size, accelerator.num_processes,
                       accelerator.process_index, args.seed,
                       lengths=[len(e["input_ids"]) for e in examples]
                       if getattr(args, "group_by_length", False) else None)

    fingerprint = data_fingerprint(examples)
    loop = LoopState()
    checkpoint, state = None, None
    if args.resume:
        try:
            checkpoint, state = resumable_checkpoint(output_dir, log=accelerator.print)
        except UserError as exc:
            raise error_on_every_process(accelerator, str(exc)) from None
    if checkpoint is not None:
        current = {"args": run_config, "global_batch_size": order.global_batch_size,
                   "data_fingerprint": fingerprint, "mixed_precision": accelerator.mixed_precision}
        changes = check_resume_settings(accelerator, state, current,
                                        getattr(args, "allow_changed_settings", None))
        try:
            accelerator.load_state(str(checkpoint))
        except _load_errors() as exc:
            raise error_on_every_process(accelerator, (
                f"could not load checkpoint {checkpoint} ({type(exc).__name__}: "
                f"{first_sentence(exc)}); delete that folder to resume from "
                f"the previous checkpoint, or pass --overwrite")) from None
        if changes:
            # The checkpoint restored its own learning rate and weight decay; the flags allowed
            # to change decide them now, on the (possibly new) schedule at this step.
            _apply_optimizer_settings(optimizer, scheduler, args)
        loop = LoopState(step=state["step"],
                         applied_steps=state.get("applied_steps", state["step"]),
                         non_finite_steps=state.get("non_finite_steps", 0))
        if accelerator.is_main_process:
            truncate_metrics(output_dir, loop.step)
            accelerator.print(f"resumed from {checkpoint} at step {loop.step}/{total_steps}")
    elif args.resume:
        if accelerator.is_main_process:
            truncate_metrics(output_dir, 0)  # the rows of an attempt killed before a checkpoint
        accelerator.print(f"--resume: no checkpoint in {output_dir}, starting from step 0")

    def trainer_state():
        position = loop.step * args.grad_accum
        return {"step": loop.step, "total_steps": total_steps,
                "epoch": position / order.batches_per_epoch, "micro_batches_seen": position,
                "data_position": {"epoch": position // order.batches_per_epoch,
                                  "batch_in_epoch": position % order.batches_per_epoch},
                "num_processes": accelerator.num_processes,
                "global_batch_size": order.global_batch_size,
                "effective_batch_size": order.global_batch_size * args.grad_accum,
                "mixed_precision": accelerator.mixed_precision,
                "applied_steps": loop.applied_steps, "non_finite_steps": loop.non_finite_steps,
                "data_fingerprint": fingerprint, "args": run_config}

    if accelerator.log_with:
        # The same rows as metrics.jsonl, at the same steps. A resumed run drops the event rows
        # after its checkpoint, as truncate_metrics did for metrics.jsonl.
        from accelerate.tracking import TensorBoardTracker

        for tracker in accelerator.log_with:
            if isinstance(tracker, TensorBoardTracker) and args.resume:
                tracker.init_kwargs["purge_step"] = loop.step + 1
        accelerator.init_trackers(TRACKER_PROJECT, config=tracker_config(run_config, args))
    log = _RunLog(accelerator, output_dir, loop.step, total_steps)
    model.train()
    stop = _StopFlag()
    with stop.installed(), _closing_trackers(accelerator):
        while loop.step < total_steps:
            window = _micro_batches(accelerator, model, examples, order, method, pad_token_id,
                                    loop.step, args.grad_accum)
            sums, global_tokens = backward_window(accelerator, model, window, method.loss)
            grad_norm = _clip_gradients(accelerator, model, args.max_grad_norm)
            means, interrupted = _means_and_stop_vote(accelerator, sums, global_tokens,
                                                      stop.signal_name is not None)
            applied = _update(accelerator, optimizer, scheduler, means["loss"], grad_norm)
            loop.count(applied)
            log.step_done(window)
            if not applied:
                _report_skipped_update(accelerator, loop, means["loss"], grad_norm,
                                       args.max_bad_steps)
            if loop.step % args.log_steps == 0 or loop.step == total_steps:
                log.training_row(loop.step, loop.step * args.grad_accum / order.batches_per_epoch,
                                 means, scheduler.get_last_lr()[0], grad_norm,
                                 method.step_metrics, global_tokens)
            if _checkpoint_due(args, loop, total_steps, interrupted):
                save_checkpoint(accelerator, output_dir, loop.step, trainer_state(),
                                args.save_total_limit)
            # Scored after that step's checkpoint: a failure here cannot cost the weights.
            if eval_examples and not interrupted and _held_out_due(args, loop.step, total_steps):
                log.held_out_row(loop.step, *_score_held_out(accelerator, model, eval_examples,
                                                             method, args.batch_size, pad_token_id))
            if interrupted and loop.step < total_steps:
                log.progress.close()
                raise error_on_every_process(accelerator, (
                    f"stopped by {stop.signal_name or 'a signal to another process'} at step "
                    f"{loop.step}; checkpoint saved, rerun the same command with --resume to "
                    f"continue"))
    log.progress.close()
    if loop.applied_steps == 0:
        # Exporting now would mark the untouched student as a finished, trained run.
        raise error_on_every_process(accelerator, (
            f"all {loop.step} optimizer steps had a NaN/inf loss or gradient, so the student was "
            f"never updated and is not saved; check --loss-temperature and --learning-rate, use "
            f"float32 (--dtype float32), check the data, then rerun with --overwrite"))
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        # Drop DDP's gradient-sync wrapper now, while the process group is alive (the export
        # needs only the module). Left to the end of the script, its destructor can be what
        # destroys the gloo group, holding the GIL while a gloo thread waits for it to free a
        # tensor: the process then hangs at exit (pytorch/pytorch#56297).
        accelerator.wait_for_everyone()
        model = accelerator.unwrap_model(model)
        accelerator.free_memory()
    return model, trainer_state()
