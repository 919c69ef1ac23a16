"""Offline teacher: the teacher's top-K next-token distributions at every supervised position,
computed once and read lazily while training, so later runs never load the teacher.

Layout of a cache directory:
    meta.json                  what the cache was made from (teacher and a fingerprint of its
                               weights, tokenizer, data, K, T, ...); "complete": true once every
                               example is written; a sha256 checksum of every file below
    index.npy                  int64 (num_examples, 3): shard, first row, number of rows per example
    shard_00000.ids.npy        int32   (rows, K)  teacher top-K token ids
    shard_00000.logprobs.npy   float16 (rows, K)  their log-probabilities at temperature T
    shard_00000.tail.npy       float32 (rows,)    log of the teacher's remaining mass
A row is one supervised position (a position whose next token is supervised), in the order
`common.losses.shift_for_next_token` selects them, and rows are found by EXAMPLE INDEX, never by
step: shuffling, accumulation, resume and several processes cannot misalign them. Shards are
memory-mapped, never loaded whole. At K = 32 a position costs 32·4 + 32·2 + 4 = 196 bytes.

Building is resumable: each finished shard is renamed into place and listed in `progress.json`;
a rerun continues after the last listed shard.

Opening a cache checks every file against its checksum (one sequential read, about 1 GB/s), so a
damaged or edited cache is refused before training starts rather than teaching garbage.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from common.chat import supervised_positions
from common.checkpoint import examples_digest, write_json_atomic
from common.errors import UserError
from common.losses import log_probs, shift_for_next_token
from common.models import weights_fingerprint

# 2: shard checksums and the teacher's weights fingerprint. Older caches are refused (see
# read_meta): nothing could tell whether they match the teacher or were damaged since.
FORMAT_VERSION = 2
EXAMPLES_PER_SHARD = 2048
DEFAULT_TOP_K = 32  # teacher tokens per position of a new cache when --cache-top-k is unset


def fingerprint(data):
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer):
    return fingerprint({"vocab": sorted(tokenizer.get_vocab().items()),
                        "special": sorted(map(str, tokenizer.all_special_tokens))})[:16]


def cache_identity(teacher_name, tokenizer, examples, dataset, max_length, top_k, temperature):
    """What a cache must agree on to be reused (shown side by side when it does not)."""
    return {"format": FORMAT_VERSION, "teacher": str(teacher_name),
            "teacher_weights": weights_fingerprint(teacher_name) if teacher_name else None,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "chat_template": fingerprint(tokenizer.chat_template or "")[:16],
            "dataset": str(dataset), "examples": examples_digest(examples),
            "num_examples": len(examples), "max_length": max_length, "top_k": top_k,
            "temperature": temperature}


# Recorded in the identity but never compared: where a served teacher was reached. The same
# model served from another host or port (a restarted server) fills or reuses the same cache.
RECORDED_ONLY = ("teacher_server",)


def served_identity(identity, server):
    """The identity of a cache filled from a teacher on a server: the served model's name and the
    server's redacted URL stand where a local teacher's name and weights fingerprint would."""
    from common.api_client import redact_url

    return {**identity, "teacher": server.api_args.teacher_api_model, "teacher_weights": None,
            "teacher_server": redact_url(server.api_args.teacher_api_base)}


def _compared(identity):
    return {k: v for k, v in identity.items() if k not in RECORDED_ONLY}


def _rebuild_hint(cache_dir):
    return f"delete {cache_dir} and rerun with --teacher to rebuild it"


def read_meta(cache_dir):
    """The cache's meta.json (None when there is none yet); a UserError when it cannot be a cache
    this version can check: a file instead of a directory, no identity, an older format."""
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UserError(f"--teacher-cache {cache_dir} is a file, not a directory; pass a directory "
                        f"(it is created when the cache is built)")
    path = cache_dir / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; {_rebuild_hint(cache_dir)}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("identity"), dict):
        raise UserError(f"{path} does not say what the cache was made from (no identity); "
                        f"{_rebuild_hint(cache_dir)}")
    cache_format = meta["identity"].get("format")
    if cache_format != FORMAT_VERSION:
        raise UserError(f"--teacher-cache {cache_dir} has format {cache_format!r}, this version "
                        f"reads format {FORMAT_VERSION} (which checks shard checksums and the "
                        f"teacher's weights); {_rebuild_hint(cache_dir)}")
    return meta


def top_k_to_keep(cache_top_k, cache_dir):
    """--cache-top-k, or where it is unset the K of the cache already in cache_dir, else 32."""
    if cache_top_k is not None:
        return cache_top_k
    meta = read_meta(cache_dir)
    return (meta or {}).get("identity", {}).get("top_k", DEFAULT_TOP_K)


def check_identity(cache_dir, meta, identity, teacher_given=True):
    """Refuse a cache made from something else, naming what differs. Without a teacher (a run
    from the cache alone) the teacher's name and weights cannot be compared and are not; nor are
    weights that have no local files to fingerprint (a Hub teacher not downloaded here)."""
    keys = [k for k in _compared(identity) if k not in ("teacher", "teacher_weights")
            or teacher_given]
    if identity.get("teacher_weights") is None:
        keys = [k for k in keys if k != "teacher_weights"]
    differing = [k for k in keys if meta["identity"].get(k) != identity[k]]
    if differing:
        details = ", ".join(f"{k}: cache {meta['identity'].get(k)!r} vs run {identity[k]!r}"
                            for k in differing)
        raise UserError(f"--teacher-cache {cache_dir} was made from different inputs ({details}); "
                        f"use another cache directory or delete this one to rebuild it")


def file_checksum(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_files(cache_dir, meta):
    """Every file the cache lists is there and holds what was written (a UserError if not)."""
    cache_dir = Path(cache_dir)
    checksums = meta.get("checksums")
    if not isinstance(checksums, dict) or "index.npy" not in checksums:
        raise UserError(f"--teacher-cache {cache_dir}: meta.json lists no file checksums; "
                        f"{_rebuild_hint(cache_dir)}")
    for name, expected in checksums.items():
        path = cache_dir / name
        if Path(name).name != name or not path.is_file():
            raise UserError(f"--teacher-cache {cache_dir} is damaged: {name} is missing; "
                            f"{_rebuild_hint(cache_dir)}")
        if file_checksum(path) != expected:
            raise UserError(f"--teacher-cache {cache_dir} is damaged: {name} does not match the "
                            f"checksum written when the cache was built; "
                            f"{_rebuild_hint(cache_dir)}")


def _supervised_rows(teacher_logits, labels, vocab_size, top_k, temperature):
    """Top-K (ids, log-probs) and the log tail mass at a batch's supervised positions."""
    selected, _ = shift_for_next_token(teacher_logits, labels)
    teacher_log_probs = log_probs(selected[:, :vocab_size], temperature)
    k = min(top_k, vocab_size)
    top_log_probs, top_ids = teacher_log_probs.topk(k, dim=-1)
    # Remaining mass, as a log, from the entries outside the top K (stable: no 1 - Σ).
    outside = teacher_log_probs.scatter(-1, top_ids, float("-inf"))
    tail = torch.logsumexp(outside, dim=-1)
    return top_ids.int(), top_log_probs, tail


def _save_array(path, array):
    """Write atomically; returns the file's checksum."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    checksum = file_checksum(tmp)
    os.replace(tmp, path)
    return checksum


def _read_progress(progress_path, identity):
    """The partial build to continue, or None to start afresh: no progress file, another
    identity, or shards that no longer hold what was written."""
    try:
        progress = json.loads(progress_path.read_text(encoding="utf-8"))
        if _compared(progress.get("identity")) != _compared(identity):
            return None
        for shard in progress["shards"]:
            for name, checksum in shard["checksums"].items():
                if file_checksum(progress_path.parent / name) != checksum:
                    return None
        return progress
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def local_teacher_rows(teacher, vocab_size, top_k, temperature, device, autocast=None):
    """A row source for build_cache: the local teacher's forward pass over a batch."""

    @torch.no_grad()
    def rows(batch):
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            logits = teacher(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).logits
        top_ids, top_log_probs, tail = _supervised_rows(logits, batch["labels"], vocab_size,
                                                        top_k, temperature)
        del logits
        return top_ids, top_log_probs, tail

    return rows


@torch.no_grad()
def build_cache(cache_dir, teacher, examples, identity, vocab_size, batch_size, pad_token_id,
                device, autocast=None, log=print, chat_template=None, rows=None):
    """Run the teacher once over `examples` (in order) and write the cache; resumes a killed build.

    `rows(batch)` -> (top ids (N, K), their log-probs (N, K), log tail mass (N,)) at the batch's
    N supervised positions is where the rows come from: by default the local `teacher`'s forward
    pass (local_teacher_rows), or a teacher on a server (ServerTeacher.cache_rows)."""
    from tqdm.auto import tqdm

    from common.chat import collate

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    progress_path = cache_dir / "progress.json"
    progress = _read_progress(progress_path, identity)
    if progress is None:
        progress = {"identity": identity, "shards": []}  # fresh (or a stale partial build)
    done_examples = sum(shard["num_examples"] for shard in progress["shards"])
    if done_examples:
        log(f"resuming the teacher cache build at example {done_examples}/{len(examples)}")
    if rows is None:
        rows = local_teacher_rows(teacher, vocab_size, identity["top_k"], identity["temperature"],
                                  device, autocast)
    bar = tqdm(total=len(examples), initial=done_examples, desc="caching teacher", unit="ex")
    for shard_start in range(done_examples, len(examples), EXAMPLES_PER_SHARD):
        shard_examples = examples[shard_start:shard_start + EXAMPLES_PER_SHARD]
        ids, logprobs, tails, counts = [], [], [], []
        for start in range(0, len(shard_examples), batch_size):
            batch = collate(shard_examples[start:start + batch_size], pad_token_id)
            top_ids, top_log_probs, tail = rows(batch)
            ids.append(top_ids.cpu().numpy().astype(np.int32))  # a server's rows come as int64
            logprobs.append(top_log_probs.cpu().numpy().astype(np.float16))
            tails.append(tail.cpu().numpy().astype(np.float32))
            counts.extend(supervised_positions(batch["labels"]).sum(dim=1).tolist())
            bar.update(len(batch["input_ids"]))
        number = len(progress["shards"])
        checksums = {}
        for part, arrays in (("ids", ids), ("logprobs", logprobs), ("tail", tails)):
            name = f"shard_{number:05d}.{part}.npy"
            checksums[name] = _save_array(cache_dir / name, np.concatenate(arrays))
        progress["shards"].append({"num_examples": len(shard_examples), "counts": counts,
                                   "checksums": checksums})
        write_json_atomic(progress_path, progress)
    bar.close()
    # The index: example i's rows live in shard s from row r, n rows.
    index = []
    for number, shard in enumerate(progress["shards"]):
        row = 0
        for count in shard["counts"]:
            index.append((number, row, count))
            row += count
    checksums = {name: checksum for shard in progress["shards"]
                 for name, checksum in shard["checksums"].items()}
    checksums["index.npy"] = _save_array(cache_dir / "index.npy", np.asarray(index, dtype=np.int64))
    rows = sum(count for _, _, count in index)
    total_bytes = sum(p.stat().st_size for p in cache_dir.glob("shard_*.npy"))
    # The template travels with the cache: a later run without the teacher renders the same text.
    meta = {"identity": identity, "complete": True, "num_rows": rows,
            "chat_template_text": chat_template, "checksums": checksums,
            "bytes": total_bytes, "bytes_per_supervised_token": round(total_bytes / max(rows, 1), 1)}
    write_json_atomic(cache_dir / "meta.json", meta)
    progress_path.unlink()
    log(f"teacher cache: {rows} supervised positions, {total_bytes / 2**20:.1f} MiB, "
        f"{meta['bytes_per_supervised_token']} bytes per supervised token")
    return meta


class TeacherCache:
    """Lazy, memory-mapped reader: rows of one example by its index. Opening it checks every file
    of the cache against the checksums in meta.json (a UserError names a damaged one)."""

    def __init__(self, cache_dir):
        self.cache_dir = Path(cache_dir)
        meta = read_meta(self.cache_dir)
        if meta is None or not meta.get("complete"):
            raise UserError(f"--teacher-cache {cache_dir} holds no complete cache; rerun with "
                            f"--teacher (or --teacher-api-base) to build it")
        verify_files(self.cache_dir, meta)
        self.index = np.load(self.cache_dir / "index.npy")
        if self.index.ndim != 2 or self.index.shape != (meta["identity"].get("num_examples"), 3):
            raise UserError(f"--teacher-cache {cache_dir} is damaged: index.npy does not list "
                            f"one entry per example; {_rebuild_hint(cache_dir)}")
        self._shards = {}

    def _shard(self, number):
        if number not in self._shards:
            stem = self.cache_dir / f"shard_{number:05d}"
            self._shards[number] = tuple(np.load(f"{stem}.{part}.npy", mmap_mode="r")
                                         for part in ("ids", "logprobs", "tail"))
        return self._shards[number]

    def rows(self, example_index):
        number, start, count = self.index[example_index]
        ids, logprobs, tail = self._shard(int(number))
        return ids[start:start + count], logprobs[start:start + count], tail[start:start + count]

    def collate_fn(self, base_collate):
        """A collate for the shared loop: the usual batch plus the teacher rows, in the order
        `shift_for_next_token` selects supervised positions (row-major over the batch)."""

        def collate(examples, pad_token_id):
            batch = base_collate(examples, pad_token_id)
            parts = [self.rows(example["example_index"]) for example in examples]
            batch["teacher_ids"] = torch.from_numpy(np.concatenate([p[0] for p in parts])).long()
            batch["teacher_logprobs"] = torch.from_numpy(
                np.concatenate([p[1] for p in parts]).astype(np.float32))
            batch["teacher_tail"] = torch.from_numpy(np.concatenate([p[2] for p in parts]))
            return batch

        return collate


def make_cached_loss_fn(accelerator, vocab_size, temperature=1.0, alpha=0.0, loss_chunk_size=0):
    """loss_fn(student, batch) for the shared loop, reading the teacher from the batch's cache rows:
    (1 - alpha) * T² * sparse forward KL + alpha * CE, summed over supervised positions. Memory-
    bounded like the live-teacher loss (see common.distill.make_head_loss_fn, loss_chunk_size)."""
    from common.distill import make_head_loss_fn
    from common.losses import KDObjective, cross_entropy

    objective = KDObjective("forward", temperature, alpha=alpha)

    def terms(logits, targets, teacher_ids, teacher_logprobs, teacher_tail):
        kd = objective.sparse_divergence(logits, teacher_ids, teacher_logprobs,
                                         teacher_tail).sum()
        ce = cross_entropy(logits, targets).sum()
        return objective.combine(kd, ce), {"kd": kd.detach(), "ce": ce.detach()}

    return make_head_loss_fn(accelerator, vocab_size, terms, loss_chunk_size,
                             row_keys=("teacher_ids", "teacher_logprobs", "teacher_tail"))


def prepare(cache_dir, examples, tokenizer, teacher_name, data_args, top_k, temperature,
            accelerator, load_teacher, batch_size, reuse_note="the teacher is not loaded",
            server=None):
    """Reuse a matching complete cache, or build it with the teacher (main process); returns the
    reader. `load_teacher()` is only called when the cache has to be built; `reuse_note` ends the
    line printed when a cache is reused. With `server` (a ServerTeacher asking for `top_k` rows
    per position; `teacher_name` None) the rows are asked of the teacher on the server instead.
    Each example gets its "example_index", which the reader's collate_fn looks its rows up by."""
    for index, example in enumerate(examples):
        example["example_index"] = index  # cache rows are found by example, never by step
    identity = cache_identity(teacher_name, tokenizer, examples, data_args.dataset,
                              data_args.max_length, top_k, temperature)
    if server is not None:
        identity = served_identity(identity, server)
    teacher_given = teacher_name is not None or server is not None
    meta = read_meta(cache_dir)
    if meta is not None and meta.get("complete"):
        check_identity(cache_dir, meta, identity, teacher_given=teacher_given)
        accelerator.print(f"using the teacher cache in {cache_dir} "
                          f"({meta['bytes_per_supervised_token']} bytes per supervised token); "
                          f"{reuse_note}")
    else:
        if not teacher_given:
            raise UserError(f"--teacher-cache {cache_dir} holds no complete cache; pass --teacher "
                            f"(or --teacher-api-base) to build it")
        if accelerator.num_processes > 1:
            # One process builds it, and a sharded (FSDP / ZeRO-3) teacher cannot run alone.
            raise UserError(f"--teacher-cache {cache_dir} holds no complete cache; build it with a "
                            f"single-process run first (e.g. the same command with plain python "
                            f"and --max-steps 1), then launch the multi-process run")
        if accelerator.is_main_process and server is not None:
            # Each finished shard is kept: a killed build resumes without asking again for it.
            build_cache(cache_dir, None, examples, identity, len(tokenizer), batch_size,
                        tokenizer.pad_token_id, accelerator.device, log=accelerator.print,
                        chat_template=tokenizer.chat_template, rows=server.cache_rows)
        elif accelerator.is_main_process:
            teacher = load_teacher()
            # A Hub teacher's weight files may only now be downloaded: fingerprint what was loaded.
            identity = {**identity, "teacher_weights": weights_fingerprint(teacher_name)}
            build_cache(cache_dir, teacher, examples, identity, len(tokenizer), batch_size,
                        tokenizer.pad_token_id, accelerator.device, accelerator.autocast,
                        log=accelerator.print, chat_template=tokenizer.chat_template)
            del teacher
        accelerator.wait_for_everyone()
    return TeacherCache(cache_dir)
