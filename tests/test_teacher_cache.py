"""Offline teacher cache: sparse loss, alignment under shuffling/accumulation, reuse, refusal."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import common.teacher_cache as teacher_cache
from common.args import DataArguments
from common.chat import ChatEncoder, collate, encode_dataset
from common.errors import UserError
from common.losses import forward_kl, shift_for_next_token, sparse_forward_kl
from common.train import BatchOrder
from conftest import run_script


def test_sparse_kl_with_full_k_equals_dense_forward_kl():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(5, 13, generator=generator, requires_grad=True)
    teacher = torch.randn(5, 13, generator=generator) * 2
    teacher_log_probs = (teacher / 2.0).log_softmax(-1)
    top_log_probs, top_ids = teacher_log_probs.topk(13, dim=-1)
    tail = torch.full((5,), float("-inf"))
    sparse = sparse_forward_kl(student, top_ids, top_log_probs, tail, temperature=2.0)
    dense = forward_kl(student, teacher, temperature=2.0)
    assert torch.allclose(sparse, dense, atol=1e-5)
    (grad_sparse,) = torch.autograd.grad(sparse.sum(), student)
    (grad_dense,) = torch.autograd.grad(dense.sum(), student)
    assert torch.isfinite(grad_sparse).all()
    assert torch.allclose(grad_sparse, grad_dense, atol=1e-5)


def test_sparse_kl_with_a_tail_is_a_coarser_kl():
    """Merging tokens into one tail bucket can only lower the KL (data processing), never below 0."""
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(6, 50, generator=generator)
    teacher = torch.randn(6, 50, generator=generator) * 3
    teacher_log_probs = teacher.log_softmax(-1)
    for k in (1, 5, 20):
        top_log_probs, top_ids = teacher_log_probs.topk(k, dim=-1)
        tail = torch.logsumexp(teacher_log_probs.scatter(-1, top_ids, float("-inf")), dim=-1)
        sparse = sparse_forward_kl(student, top_ids, top_log_probs, tail)
        assert (sparse >= -1e-6).all() and (sparse <= forward_kl(student, teacher) + 1e-5).all()
    identical = sparse_forward_kl(teacher, top_ids, top_log_probs, tail)
    assert torch.allclose(identical, torch.zeros(6), atol=1e-5)


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(tiny / "student")
    data_args = DataArguments(dataset=str(tiny / "train.jsonl"))
    examples = encode_dataset(data_args, ChatEncoder(tokenizer, 512), log=lambda *_: None)
    for index, example in enumerate(examples):
        example["example_index"] = index
    teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher").eval().requires_grad_(False)
    cache_dir = tmp_path_factory.mktemp("cache")
    identity = teacher_cache.cache_identity("t", tokenizer, examples, data_args.dataset, 512, 8, 1.0)
    teacher_cache.build_cache(cache_dir, teacher, examples, identity, len(tokenizer), 5,
                              tokenizer.pad_token_id, "cpu", log=lambda *_: None)
    return tokenizer, examples, teacher, cache_dir, identity


def test_rows_line_up_under_shuffling_and_accumulation(built):
    tokenizer, examples, teacher, cache_dir, _ = built
    cache = teacher_cache.TeacherCache(cache_dir)
    collate_fn = cache.collate_fn(collate)
    order = BatchOrder(len(examples), batch_size=3, num_processes=2, process_index=1, seed=9)
    for position in range(0, 40, 7):  # shuffled, a second process's slice, across epochs
        batch = collate_fn([examples[i] for i in order.indices(position)], tokenizer.pad_token_id)
        with torch.no_grad():
            logits = teacher(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).logits
        selected, _ = shift_for_next_token(logits, batch["labels"])
        expected_log_probs, expected_ids = selected[:, :len(tokenizer)].float().log_softmax(-1).topk(8)
        assert torch.equal(batch["teacher_ids"], expected_ids)
        assert torch.allclose(batch["teacher_logprobs"], expected_log_probs, atol=2e-2)  # fp16


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_chunked_cached_loss_equals_full_logits(tiny, built, alpha):
    """The memory-bounded path (output layer on supervised positions, a few at a time, recomputed
    in backward) and the full-logits path, both in float32, give the loss and gradients of the
    full-logits path on a float64 copy of the student, within float32 error."""
    import copy

    from accelerate import Accelerator
    from float32_error import assert_close, decoder_roundings, loss_roundings, stat_scales

    tokenizer, examples, _, cache_dir, _ = built
    batch = teacher_cache.TeacherCache(cache_dir).collate_fn(collate)(examples[:5],
                                                                      tokenizer.pad_token_id)
    student = AutoModelForCausalLM.from_pretrained(tiny / "student")
    temperature, vocab = 1.5, len(tokenizer)

    def run(model, chunk_size):
        model.zero_grad()
        loss_fn = teacher_cache.make_cached_loss_fn(Accelerator(cpu=True), vocab, temperature,
                                                    alpha, chunk_size)
        loss, stats = loss_fn(model, batch)
        loss.backward()
        return loss.detach(), stats, {n: p.grad.clone() for n, p in model.named_parameters()}

    reference = copy.deepcopy(student).double()
    expected_loss, expected_stats, expected_grads = run(reference, -1)
    with torch.no_grad():
        logits, targets = shift_for_next_token(
            reference(input_ids=batch["input_ids"],
                      attention_mask=batch["attention_mask"]).logits, batch["labels"])
    positions = targets.shape[0]
    # The cached teacher is a distribution over its top K and a tail bucket; as logits at T:
    cached = torch.cat([batch["teacher_logprobs"], batch["teacher_tail"][:, None]], -1).double()
    scales = stat_scales(logits[:, :vocab], temperature * cached, positions, temperature, alpha)
    path = decoder_roundings(student.config, batch["input_ids"].shape[1])
    forward = path + loss_roundings(vocab, positions)
    backward = 2 * forward + batch["input_ids"].numel()
    for chunk_size in (-1, 3):
        loss, stats, grads = run(student, chunk_size)
        assert_close(loss, expected_loss, forward, scales["loss"], f"loss, chunks {chunk_size}")
        for name in ("kd", "ce"):
            assert_close(stats[name], expected_stats[name], forward, scales[name], name)
        for name, grad in expected_grads.items():
            assert_close(grads[name], grad, backward, what=f"gradient of {name}")


def test_interrupted_build_resumes_to_the_same_cache(built, tmp_path, monkeypatch):
    tokenizer, examples, teacher, cache_dir, identity = built
    monkeypatch.setattr(teacher_cache, "EXAMPLES_PER_SHARD", 16)
    calls = {"n": 0}

    class Dies(torch.nn.Module):
        def forward(self, **kwargs):
            calls["n"] += 1
            if calls["n"] > 5:  # dies inside the second shard (16 examples = 4 batches of 5)
                raise KeyboardInterrupt
            return teacher(**kwargs)

    with pytest.raises(KeyboardInterrupt):
        teacher_cache.build_cache(tmp_path, Dies(), examples, identity, len(tokenizer), 5,
                                  tokenizer.pad_token_id, "cpu", log=lambda *_: None)
    assert teacher_cache.read_meta(tmp_path) is None  # not complete
    assert len(json.loads((tmp_path / "progress.json").read_text())["shards"]) == 1
    teacher_cache.build_cache(tmp_path, teacher, examples, identity, len(tokenizer), 5,
                              tokenizer.pad_token_id, "cpu", log=lambda *_: None)
    # the same shard size uninterrupted (shards change batch composition, hence padding)
    teacher_cache.build_cache(tmp_path / "reference", teacher, examples, identity, len(tokenizer),
                              5, tokenizer.pad_token_id, "cpu", log=lambda *_: None)
    reference = teacher_cache.TeacherCache(tmp_path / "reference")
    resumed = teacher_cache.TeacherCache(tmp_path)
    for index in range(len(examples)):
        for a, b in zip(reference.rows(index), resumed.rows(index)):
            assert np.array_equal(a, b)


def cli_args(tiny, out, cache, *extra):
    return ["token_level.py", "--student", tiny / "student", "--dataset", tiny / "train.jsonl",
            "--output-dir", out, "--teacher-cache", cache, "--max-steps", "6", "--batch-size", "4",
            "--grad-accum", "2", "--learning-rate", "1e-3", "--log-steps", "2", *extra]


@pytest.mark.slow
def test_second_run_trains_without_the_teacher(tiny, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny / "teacher", teacher)
    cache = tmp_path / "cache"
    run_script(*cli_args(tiny, tmp_path / "first", cache, "--teacher", teacher))
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["complete"] and meta["bytes_per_supervised_token"] <= 200
    shutil.rmtree(teacher)  # proof that the second run never loads it
    # held-out scoring (cross-entropy: the cache has no rows for it) leaves training untouched
    result = run_script(*cli_args(tiny, tmp_path / "second", cache, "--eval-dataset",
                                  tiny / "test.jsonl", "--eval-steps", "3"))
    assert "the teacher is not loaded" in result.stdout
    evals = [json.loads(l) for l in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in l]
    assert [r["step"] for r in evals] == [3, 6] and all(r["eval_ce"] > 0 for r in evals)
    first, second = load_file(tmp_path / "first" / "model.safetensors"), \
        load_file(tmp_path / "second" / "model.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)
    # a cache made from other inputs is refused, naming what differs
    for extra, what in [(["--max-length", "64"], "max_length"), (["--cache-top-k", "4"], "top_k")]:
        result = run_script(*cli_args(tiny, tmp_path / "third", cache, *extra), check=False)
        assert result.returncode == 2 and what in result.stderr and "different inputs" in result.stderr
        assert not (tmp_path / "third").exists()


def test_reverse_kl_with_a_cache_is_refused(tiny, tmp_path):
    result = run_script(*cli_args(tiny, tmp_path / "o", tmp_path / "c", "--teacher",
                                  tiny / "teacher", "--kl", "reverse"), check=False)
    assert result.returncode == 2 and "forward only" in result.stderr


@pytest.mark.slow
def test_two_processes_read_the_same_rows_as_one(tiny, tmp_path):
    """2 processes x batch 2 from the cache follow 1 process x batch 4: rows by example, not rank."""
    cache = tmp_path / "cache"
    common = ["--teacher", tiny / "teacher", "--grad-accum", "1"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    refused = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         *cli_args(tiny, tmp_path / "early", cache, *common), check=False)
    assert refused.returncode != 0 and "single-process run first" in refused.stderr
    run_script(*cli_args(tiny, single, cache, *common))
    args = cli_args(tiny, multi, cache, *common, "--batch-size", "2")
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args)
    expected, got = load_file(single / "model.safetensors"), load_file(multi / "model.safetensors")
    assert all(torch.allclose(expected[n], got[n], atol=1e-6) for n in expected)


def damaged_copy(cache_dir, tmp_path, damage):
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    damage(copy)
    return copy


def overwrite_log_probs(cache):
    path = cache / "shard_00000.logprobs.npy"
    garbage = np.random.default_rng(0).normal(size=np.load(path).shape).astype(np.float16)
    np.save(path, garbage)  # a valid .npy of the right shape: only the checksum can tell


def edit_meta(change):
    def damage(cache):
        meta = json.loads((cache / "meta.json").read_text())
        (cache / "meta.json").write_text(json.dumps(change(meta)))
    return damage


@pytest.mark.parametrize("damage, problem", [
    (lambda c: (c / "index.npy").unlink(), "index.npy is missing"),
    (lambda c: (c / "shard_00000.tail.npy").unlink(), "shard_00000.tail.npy is missing"),
    (overwrite_log_probs, "shard_00000.logprobs.npy does not match the checksum"),
    (lambda c: (c / "shard_00000.ids.npy").write_bytes(b"\x93NUMPY"), "shard_00000.ids.npy does"),
    (edit_meta(lambda m: {k: v for k, v in m.items() if k != "identity"}), "no identity"),
    (edit_meta(lambda m: [m]), "no identity"),
    (edit_meta(lambda m: {k: v for k, v in m.items() if k != "checksums"}), "no file checksums"),
    # a cache written before checksums existed: nothing can vouch for it
    (edit_meta(lambda m: {**m, "identity": {**m["identity"], "format": 1}}), "has format 1"),
    (lambda c: (c / "meta.json").write_text("{"), "not valid JSON"),
])
def test_damaged_cache_is_refused_in_one_line(built, tmp_path, damage, problem):
    _, _, _, cache_dir, _ = built
    cache = damaged_copy(cache_dir, tmp_path, damage)
    with pytest.raises(UserError) as error:
        teacher_cache.TeacherCache(cache)
    message = str(error.value)
    assert problem in message and "\n" not in message, message
    assert f"delete {cache} and rerun with --teacher to rebuild it" in message
    teacher_cache.TeacherCache(cache_dir)  # the undamaged original still opens


def test_cache_path_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "cache.npy"
    path.write_text("not a directory")
    with pytest.raises(UserError, match="is a file, not a directory"):
        teacher_cache.read_meta(path)
    assert teacher_cache.read_meta(tmp_path / "not-yet") is None  # a new cache is fine


def test_changed_teacher_weights_are_refused_and_a_copy_is_not(tiny, built, tmp_path):
    """Same path, new weights of the same shapes (the file size does not change): the cache made
    from the old weights is refused. A byte-identical copy elsewhere keeps its fingerprint."""
    from common.models import weights_fingerprint
    from examples.tiny_setup import build_model

    tokenizer, examples, teacher, cache_dir, _ = built
    path = tmp_path / "teacher"
    shutil.copytree(tiny / "teacher", path)
    assert weights_fingerprint(path) == weights_fingerprint(tiny / "teacher")
    args = (tokenizer, examples, "data", 512, 8, 1.0)
    before = teacher_cache.cache_identity(str(path), *args)
    size = (path / "model.safetensors").stat().st_size
    retrained = build_model(tokenizer, hidden_size=teacher.config.hidden_size,
                            num_layers=teacher.config.num_hidden_layers,
                            vocab_padding=teacher.config.vocab_size - len(tokenizer), seed=99)
    retrained.save_pretrained(path)
    assert (path / "model.safetensors").stat().st_size == size
    after = teacher_cache.cache_identity(str(path), *args)
    assert before["teacher"] == after["teacher"]
    with pytest.raises(UserError, match="teacher_weights: cache"):
        teacher_cache.check_identity(cache_dir, {"identity": before}, after)
    # a run from the cache alone has no teacher to compare with
    teacher_cache.check_identity(cache_dir, {"identity": before}, after, teacher_given=False)


def test_build_starts_over_when_a_finished_shard_was_damaged(built, tmp_path, monkeypatch):
    """A killed build continues after its finished shards only while they still hold what was
    written; a damaged one is not sealed into the cache: the build starts over."""
    tokenizer, examples, teacher, _, identity = built
    identity = {**identity, "num_examples": 20}
    monkeypatch.setattr(teacher_cache, "EXAMPLES_PER_SHARD", 10)
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, limit):
            super().__init__()
            self.limit = limit

        def forward(self, **kwargs):
            calls.append(len(kwargs["input_ids"]))
            if len(calls) > self.limit:
                raise KeyboardInterrupt
            return teacher(**kwargs)

    def build(model):
        teacher_cache.build_cache(tmp_path, model, examples[:20], identity, len(tokenizer), 5,
                                  tokenizer.pad_token_id, "cpu", log=lambda *_: None)

    with pytest.raises(KeyboardInterrupt):
        build(Counting(limit=3))  # shard 0 (two batches of 5) is written, shard 1 is not
    assert len(json.loads((tmp_path / "progress.json").read_text())["shards"]) == 1
    overwrite_log_probs(tmp_path)
    calls.clear()
    build(Counting(limit=100))
    assert sum(calls) == 20  # every example again, not only the second shard's 10
    teacher_cache.TeacherCache(tmp_path)


def test_weights_first_downloaded_while_building_are_fingerprinted(tiny, built, tmp_path):
    """A Hub teacher's weights arrive when it is loaded, after the identity is first computed:
    the cache must record the weights it was built from, or the next run (weights now on disk)
    would be refused for a difference that is not there."""
    from accelerate import Accelerator

    from common.models import weights_fingerprint

    tokenizer, examples, teacher, _, _ = built
    teacher_dir = tmp_path / "hub_snapshot"
    teacher_dir.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / "teacher" / name, teacher_dir)
    assert weights_fingerprint(teacher_dir) is None  # no weight file yet

    def load_teacher():  # what from_pretrained does for a Hub id: download, then load
        shutil.copy(tiny / "teacher" / "model.safetensors", teacher_dir)
        return teacher

    data_args = DataArguments(dataset="data", max_length=512)
    arguments = (examples[:6], tokenizer, str(teacher_dir), data_args, 4, 1.0,
                 Accelerator(cpu=True))
    teacher_cache.prepare(tmp_path / "cache", *arguments, load_teacher, 3)
    meta = teacher_cache.read_meta(tmp_path / "cache")
    assert meta["identity"]["teacher_weights"] == weights_fingerprint(teacher_dir) is not None
    teacher_cache.prepare(tmp_path / "cache", *arguments, None, 3)  # reused, not refused
    # and a teacher that cannot be fingerprinted here is not compared by its weights
    unknown = {**meta["identity"], "teacher_weights": None}
    teacher_cache.check_identity(tmp_path / "cache", meta, unknown)
