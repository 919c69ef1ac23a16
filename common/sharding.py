"""What changes when the models are sharded across processes (FSDP, DeepSpeed ZeRO-3).

Under plain DDP every process holds whole models and nothing here does anything special. Under
FSDP or ZeRO-3 each process holds a slice of every weight, and two things need care:

- The teacher. Left alone it would be replicated whole on every device, which is exactly what
  sharding is meant to avoid. `prepare_teacher` shards it the way the student is sharded: with
  accelerate's FSDP wrapping (frozen, never checkpointed), or as its own DeepSpeed inference
  engine under ZeRO-3 (no optimizer). Each teacher forward then gathers one layer at a time.
- Generation (on-policy sampling). `model.generate` runs the model's forward once per new token;
  with sharded weights (a) the root module's own weights (embeddings, final norm, output layer)
  must be gathered first, which is what `FullyShardedDataParallel.summon_full_params(recurse=False)`
  or `deepspeed.zero.GatheredParameters` does, and (b) every process must run the same number of
  forwards, because each one is a collective: a process whose samples all ended early keeps
  stepping (`synced_gpus=True`) until the slowest process is done. `full_params_for_generation`
  does both. It is the failure behind TRL's GKD "device mismatch" under FSDP.

The DeepSpeed paths are written against accelerate's and DeepSpeed's documented APIs but have not
run here (no GPU); see docs/distributed.md for what was tested where.
"""

import copy
from contextlib import contextmanager, nullcontext

from common.errors import UserError


def sharding_of(accelerator):
    """'fsdp', 'fsdp2', 'zero3', 'deepspeed' (ZeRO-0/1/2: weights whole), or None (one process,
    DDP)."""
    state = getattr(accelerator, "state", None)
    if state is None:  # a stand-in accelerator (tests): nothing is sharded
        return None
    from accelerate.utils import DistributedType

    if state.distributed_type == DistributedType.FSDP:
        return "fsdp2" if getattr(state.fsdp_plugin, "fsdp_version", 1) == 2 else "fsdp"
    if state.distributed_type == DistributedType.DEEPSPEED:
        return "zero3" if state.deepspeed_plugin.zero_stage == 3 else "deepspeed"
    return None


def check_sharding_settings(accelerator):
    """Refuse, in one line, sharding settings the training loop cannot work with."""
    if sharding_of(accelerator) == "fsdp" and not accelerator.state.fsdp_plugin.use_orig_params:
        raise UserError("FSDP needs `fsdp_use_orig_params: true` in the accelerate config (as in "
                        "configs/fsdp.yaml): the optimizer is built from the model's own "
                        "parameters before FSDP wraps it")


def prepare_teacher(accelerator, teacher):
    """The frozen teacher, placed for this run: whole on the device (one process, DDP, ZeRO-1/2)
    or sharded like the student (FSDP, ZeRO-3). Call `freeze(teacher)` first; use the returned
    module for the teacher's forward passes."""
    sharding = sharding_of(accelerator)
    if sharding in ("fsdp", "fsdp2"):
        return _fsdp_teacher(accelerator, teacher, sharding)
    if sharding in ("zero3", "deepspeed"):
        return _deepspeed_teacher(accelerator, teacher)
    return teacher.to(accelerator.device)


def _fsdp_teacher(accelerator, teacher, sharding):
    plugin = accelerator.state.fsdp_plugin
    # accelerate resolves the plugin's auto-wrap policy against the first model it wraps and keeps
    # the result; restore it so the student's layers are found in the student, not the teacher.
    saved_policy = (plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap)
    try:
        if sharding == "fsdp2":
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            teacher = fsdp2_prepare_model(accelerator, teacher)
        else:
            teacher = accelerator.prepare_model(teacher)
            # prepare_model registers the model for save_state; a frozen teacher needs no
            # checkpoint (it would double the size of every one).
            if teacher in accelerator._models:
                accelerator._models.remove(teacher)
    finally:
        plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap = saved_policy
    return teacher.eval()


def _deepspeed_teacher(accelerator, teacher):
    """The teacher as its own DeepSpeed engine with the run's settings minus the optimizer.

    ZeRO-3 partitions it like the student. ZeRO-1/2 only partition optimizer state and gradients,
    which a frozen teacher has none of, so it runs at stage 0: a whole copy per device, in the
    run's precision.
    """
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if zero.get("stage") == 3:
        hidden = getattr(teacher.config, "hidden_size", None)
        if hidden:  # the values transformers' own DeepSpeed integration fills in for "auto"
            for key, value in [("reduce_bucket_size", hidden * hidden),
                               ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                               ("stage3_param_persistence_threshold", 10 * hidden)]:
                if zero.get(key, "auto") == "auto":
                    zero[key] = value
    else:
        zero["stage"] = 0
    engine, *_ = deepspeed.initialize(model=teacher, config=_without_auto(config))
    engine.eval()
    return engine


def _without_auto(config):
    """Drop fields still set to "auto" (DeepSpeed then uses its defaults); accelerate resolves
    them only for the models it prepares itself."""
    if isinstance(config, dict):
        return {key: _without_auto(value) for key, value in config.items() if value != "auto"}
    return config


@contextmanager
def full_params_for_generation(accelerator, model):
    """`with full_params_for_generation(accelerator, model) as (module, synced_gpus):` then
    `module.generate(..., synced_gpus=synced_gpus)`.

    `model` is the prepared (possibly wrapped) model. Every process must enter this and generate
    the same number of times (on-policy steps are drawn identically on all processes).
    """
    sharding = sharding_of(accelerator)
    synced_gpus = sharding in ("fsdp", "fsdp2", "zero3") and accelerator.num_processes > 1
    if sharding == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel

        # Only the root's own weights: nested units (the decoder layers) gather theirs in their
        # own forward, so the whole model is never materialised at once.
        gathered = FullyShardedDataParallel.summon_full_params(model, writeback=False,
                                                               recurse=False)
    elif sharding == "zero3":
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(model.parameters()))
    else:  # FSDP2 gathers in every module's forward hooks; DDP and ZeRO-1/2 hold whole weights
        gathered = nullcontext()
    with gathered:
        yield accelerator.unwrap_model(model), synced_gpus


@contextmanager
def unsharded_loading(accelerator):
    """Load and run models whole on this process, even under ZeRO-3, for work only the main process
    does (sequence-level teacher generation).

    Under ZeRO-3, transformers loads every model through `deepspeed.zero.Init` (partitioned at load
    time) and generates with `synced_gpus`; both are collectives the other processes, waiting at a
    barrier, would never join. transformers decides by the DeepSpeed config accelerate registers
    with it, so that registration is lifted here and restored after.
    """
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is None:
        yield
        return
    from transformers.integrations.deepspeed import (is_deepspeed_zero3_enabled,
                                                     unset_hf_deepspeed_config)

    if not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()
