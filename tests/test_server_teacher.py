"""The teacher behind a server (common/server_teacher.py), against a loopback stand-in for
`vllm serve` that wraps the tiny teacher and answers in vLLM's JSON shapes (tests/vllm_loopback.py).
Nothing here was run against a real vLLM server."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import run_script
from float32_error import UNIT_ROUNDOFF, decoder_roundings, log_prob_scale
from vllm_loopback import API_KEY, MODEL_NAME, LoopbackVllm

KEY_ENV = "TEST_SERVED_TEACHER_KEY"


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)


def server_teacher(url, top_k, vocab_size, **options):
    from common.api_client import TeacherApiArguments
    from common.server_teacher import ServerTeacher

    return ServerTeacher(TeacherApiArguments(url, MODEL_NAME, KEY_ENV, **options), top_k,
                         vocab_size)


def tiny_batch(tiny, tokenizer, num_rows=4):
    from common.chat import ChatEncoder, collate

    rows = [json.loads(line) for line in (tiny / "train.jsonl").read_text().splitlines()]
    encoder = ChatEncoder(tokenizer, 256)
    return collate([encoder.encode(row["messages"]) for row in rows[:num_rows]],
                   tokenizer.pad_token_id)


@pytest.mark.slow
def test_rows_equal_the_local_teachers_log_probs(tiny, api_key):
    """With K >= the teacher's output rows, the server's rows (its JSON floats, padded-row mass
    dropped and renormalised) are the local teacher's log-softmax over the real vocabulary, at
    the supervised positions in the loss's order. Off by one position, or a missed
    renormalisation, is O(1) away; the budget is float32 error: the two forward passes (one
    padded batch here, one unpadded sequence per request there) and the log-softmax over the
    rows, at the size of the log-probs. JSON carries each float32 exactly (shortest repr)."""
    from transformers import AutoModelForCausalLM

    from common.losses import shift_for_next_token
    from common.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny / "student"), False, "student")
    vocab_size = len(tokenizer)
    teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher", dtype=torch.float32)
    rows = teacher.config.vocab_size
    assert rows > vocab_size  # the fixture's teacher has padded output rows
    batch = tiny_batch(tiny, tokenizer)
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits
    selected, _ = shift_for_next_token(logits, batch["labels"])
    reference = torch.log_softmax(selected[:, :vocab_size].double(), dim=-1)
    with LoopbackVllm(tiny / "teacher", tiny / "student", max_logprobs=rows) as server:
        teacher_ids, teacher_logprobs, teacher_tail = server_teacher(
            server.url, rows, vocab_size).top_k_rows(batch)
    assert teacher_ids.shape == (len(reference), vocab_size)
    assert torch.isneginf(teacher_tail).all()  # every token listed: no tail
    dense = torch.full_like(reference, float("-inf")).scatter(1, teacher_ids,
                                                             teacher_logprobs.double())
    roundings = decoder_roundings(teacher.config, batch["input_ids"].shape[1]) + 2 * rows + 8
    budget = roundings * UNIT_ROUNDOFF * log_prob_scale(selected)
    error = (dense - reference).abs().max().item()
    assert error <= budget, f"{error:.3g} > float32 budget {budget:.3g}"


def test_top_k_rows_keep_k_tokens_and_the_tail_mass(tiny, api_key):
    """At K < V each row holds the K most probable tokens and a tail of the rest of the mass;
    with the prompt token outside the top K the server lists K + 1 entries: one is dropped."""
    from common.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny / "student"), False, "student")
    batch = tiny_batch(tiny, tokenizer, num_rows=2)
    with LoopbackVllm(tiny / "teacher", tiny / "student") as server:
        ids, logprobs, tail = server_teacher(server.url, 5, len(tokenizer)).top_k_rows(batch)
    assert ids.shape == logprobs.shape == (len(tail), 5)
    assert (ids < len(tokenizer)).all()
    assert (logprobs[:, :-1] >= logprobs[:, 1:]).all()  # most probable first
    total = torch.logsumexp(torch.cat([logprobs, tail[:, None]], dim=1), dim=1)
    assert torch.allclose(total, torch.zeros_like(total), atol=1e-5)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


@pytest.mark.slow
def test_a_run_against_the_server_takes_the_local_teachers_losses(tiny, tmp_path, api_key):
    """token_level.py with --teacher-api-base and K >= the teacher's rows takes, step for step, the
    losses of the run with the local teacher. Tolerance 3e-6 absolute: metrics.jsonl rounds to
    1e-6 (±5e-7 on each side), and the teacher's log-probs of the two paths differ by ~1e-6
    (float32; test above), which moves a KD of Σ p (log p − log q) by about that much. A top-K of
    20 (sparse loss with a tail) or rows shifted by one position are off by far more."""
    common = ["--student", tiny / "student", "--dataset", tiny / "train.jsonl",
              "--max-steps", "3", "--batch-size", "4", "--log-steps", "1", "--api-key-env",
              KEY_ENV]
    run_script("token_level.py", "--teacher", tiny / "teacher", "--output-dir",
               tmp_path / "local", *common)
    with LoopbackVllm(tiny / "teacher", tiny / "student", max_logprobs=1000) as server:
        run_script("token_level.py", "--teacher-api-base", server.url, "--teacher-api-model",
                   MODEL_NAME, "--teacher-top-k", "1000", "--output-dir", tmp_path / "served",
                   *common)
    local, served = read_metrics(tmp_path / "local"), read_metrics(tmp_path / "served")
    assert [row["step"] for row in served] == [1, 2, 3]
    for local_row, served_row in zip(local, served):
        for name in ("loss", "kd", "ce"):
            assert served_row[name] == pytest.approx(local_row[name], abs=3e-6), name
    run_config = json.loads((tmp_path / "served" / "run_config.json").read_text())
    assert run_config["token_level"]["teacher_api_base"] == server.url
    assert run_config["token_level"]["teacher_api_model"] == MODEL_NAME
    for path in (tmp_path / "served").rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_429_and_500_are_retried(tiny, api_key):
    from common.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny / "student"), False, "student")
    with LoopbackVllm(tiny / "teacher", tiny / "student", failures=[429, 500, 429]) as server:
        teacher = server_teacher(server.url, 20, len(tokenizer))
        teacher.check(tokenizer)
        teacher.top_k_rows(tiny_batch(tiny, tokenizer, num_rows=2))
    assert server.statuses[429] == 2 and server.statuses[500] == 1 and server.statuses[200] >= 3


@pytest.mark.slow
def test_k_above_the_servers_maximum_is_a_one_line_error(tiny, tmp_path, api_key):
    with LoopbackVllm(tiny / "teacher", tiny / "student", max_logprobs=20) as server:
        result = run_script("token_level.py", "--teacher-api-base", server.url,
                            "--teacher-api-model", MODEL_NAME, "--teacher-top-k", "21",
                            "--student", tiny / "student", "--dataset", tiny / "train.jsonl",
                            "--output-dir", tmp_path / "out", "--api-key-env", KEY_ENV,
                            check=False)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: --teacher-top-k 21 is more than the server") \
        and "at most 20" in error and "--max-logprobs 21" in error, result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("has_tokenize", [True, False], ids=["tokenize", "echo"])
def test_another_tokenizer_on_the_server_is_refused(tiny, api_key, has_tokenize):
    """vLLM's /tokenize where the server has it, else the ids an echoed text prompt comes back as."""
    from common.errors import UserError
    from common.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny / "student"), False, "student")
    with LoopbackVllm(tiny / "teacher", tiny / "student_sp", has_tokenize=has_tokenize) as server:
        with pytest.raises(UserError, match="the server's tokenizer is not the student's") as info:
            server_teacher(server.url, 20, len(tokenizer)).check(tokenizer)
    assert "\n" not in str(info.value)
    with LoopbackVllm(tiny / "teacher", tiny / "student", has_tokenize=has_tokenize) as server:
        server_teacher(server.url, 20, len(tokenizer)).check(tokenizer)  # the same one passes


def test_wrong_key_and_unreachable_server_are_one_line_errors(tiny, monkeypatch):
    from common.errors import UserError
    from common.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny / "student"), False, "student")
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    with LoopbackVllm(tiny / "teacher", tiny / "student") as server:
        with pytest.raises(UserError, match=f"rejected the key .*\\${KEY_ENV}"):
            server_teacher(server.url, 20, len(tokenizer)).check(tokenizer)
    with pytest.raises(UserError, match="cannot reach the API at http://127.0.0.1:9/v1"):
        server_teacher("http://127.0.0.1:9/v1", 20, len(tokenizer),
                       api_max_retries=0).check(tokenizer)


def test_sampled_reverse_kl_has_the_reverse_kl_gradient_in_expectation():
    """Monte Carlo over x ~ p_s on a 6-token vocabulary: the mean gradient of the sampled
    estimator is the exact gradient of KL(p_s ‖ p_t) within 5 standard errors per logit (the
    per-sample gradient's standard deviation is computed exactly by enumerating the vocabulary;
    seeded, so not flaky). Negative control: without detaching the advantage the mean gradient
    is off by many standard errors."""
    from common.losses import reverse_kl, sampled_reverse_kl

    generator = torch.Generator().manual_seed(0)
    vocab, num_samples = 6, 400_000
    student = (torch.randn(vocab, generator=generator, dtype=torch.float64) * 1.5)
    teacher = torch.randn(vocab, generator=generator, dtype=torch.float64) * 1.5
    log_p_s, log_p_t = student.log_softmax(-1), teacher.log_softmax(-1)
    exact = torch.func.grad(lambda s: reverse_kl(s[None], teacher[None]).sum())(student)

    samples = torch.multinomial(log_p_s.exp(), num_samples, replacement=True,
                                generator=generator)

    def mean_gradient(estimator):
        logits = student.clone().requires_grad_()
        estimator(logits.expand(num_samples, vocab), samples, log_p_t[samples]).mean().backward()
        return logits.grad

    estimated = mean_gradient(sampled_reverse_kl)
    # per-sample gradient of -A(x) log p_s(x) w.r.t. the logits: -A(x) (onehot(x) - p_s)
    advantage = log_p_t - log_p_s
    per_sample = -advantage[:, None] * (torch.eye(vocab, dtype=torch.float64) - log_p_s.exp())
    variance = (log_p_s.exp()[:, None] * per_sample ** 2).sum(0) - exact ** 2
    standard_error = (variance / num_samples).sqrt()
    assert torch.allclose((log_p_s.exp()[:, None] * per_sample).sum(0), exact)  # the identity
    assert ((estimated - exact).abs() <= 5 * standard_error).all(), (estimated, exact)

    def not_detached(logits, ids, teacher_log_probs):
        student_log_prob = logits.log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1)
        return -(teacher_log_probs - student_log_prob) * student_log_prob

    assert ((mean_gradient(not_detached) - exact).abs() > 5 * standard_error).any()


def test_sampled_reverse_needs_a_served_teacher():
    from common.errors import UserError
    from on_policy import OnPolicyArguments

    with pytest.raises(UserError, match="--kl sampled_reverse is for a teacher on a server"):
        OnPolicyArguments(kl="sampled_reverse")
    with pytest.raises(UserError, match="--teacher-api-base supports --kl forward"):
        OnPolicyArguments(teacher_api_base="http://x/v1", teacher_api_model="m", kl="reverse")


@pytest.mark.slow
def test_on_policy_trains_from_the_served_teacher(tiny, tmp_path, api_key):
    """on_policy.py end to end against the server: on-policy steps ask for the sampled tokens'
    log-probs (logprobs 1), off-policy steps for the top K; every loss is finite."""
    from on_policy import is_on_policy_step

    draws = [is_on_policy_step(42, step, 0.5) for step in range(4)]
    assert any(draws) and not all(draws)  # both kinds of step in this run (seed 42 default)
    with LoopbackVllm(tiny / "teacher", tiny / "student") as server:
        run_script("on_policy.py", "--teacher-api-base", server.url, "--teacher-api-model",
                   MODEL_NAME, "--kl", "sampled_reverse", "--lmbda", "0.5", "--student",
                   tiny / "student", "--dataset", tiny / "train.jsonl", "--output-dir",
                   tmp_path / "out", "--max-steps", "4", "--batch-size", "2",
                   "--max-new-tokens", "6", "--log-steps", "1", "--api-key-env", KEY_ENV)
    rows = read_metrics(tmp_path / "out")
    assert {row["on_policy"] for row in rows} == {True, False}
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["kd"]) for row in rows)
    assert set(server.logprobs_asked) == {1, 20}


# --- the offline teacher cache filled from the server ---------------------------------------------

def cache_inputs(tiny):
    """(tokenizer, examples, data_args, accelerator) as token_level.py builds a cache from them."""
    from accelerate import Accelerator

    from common.args import DataArguments
    from common.chat import ChatEncoder, encode_dataset
    from common.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny / "student"), False, "student")
    data_args = DataArguments(dataset=str(tiny / "train.jsonl"), max_length=256)
    examples = encode_dataset(data_args, ChatEncoder(tokenizer, 256), log=lambda *_: None)
    for index, example in enumerate(examples):
        example["example_index"] = index
    return tokenizer, examples, data_args, Accelerator(cpu=True)


def fill_from_server(cache_dir, url, top_k, tokenizer, examples, data_args, accelerator):
    from common import teacher_cache
    from common.models import real_vocab_size

    server = server_teacher(url, top_k, real_vocab_size(tokenizer))
    return teacher_cache.prepare(cache_dir, examples, tokenizer, None, data_args, top_k, 1.0,
                                 accelerator, None, 2, server=server)


@pytest.mark.slow
def test_cache_filled_from_the_server_equals_the_local_teachers(tiny, tmp_path, api_key):
    """Row for row, the cache filled from the server holds the local teacher's cache for the same
    K: the same top-K ids in the same order, log-probs within one float16 step (each side's
    float32 value, ~1e-6 apart, is rounded to float16 on its own, so they may land one step
    apart), and the tail (float32 on disk) within 1e-5: the log of the mass outside the top K
    (far from 0 and 1 here) from float32 log-probs on both sides, ~1e-6. Rows off by one
    position differ by O(1). The identity records the served model and the redacted URL.

    The teacher here is the tiny student, which has no padded output rows: a server ranks its
    top K over all its rows and can only drop the padded ones it lists, so with the fixture's
    padded teacher (random padded rows, ~8% of the mass) a row holds fewer real tokens and its
    log-probs are off by the unlisted padded mass (docs/token_level.md)."""
    from transformers import AutoModelForCausalLM

    from common import teacher_cache
    from common.api_client import redact_url
    from common.models import freeze

    teacher_dir = tiny / "student"
    tokenizer, examples, data_args, accelerator = cache_inputs(tiny)
    top_k = 5
    local = teacher_cache.prepare(
        tmp_path / "local", examples, tokenizer, str(teacher_dir), data_args, top_k, 1.0,
        accelerator, lambda: freeze(AutoModelForCausalLM.from_pretrained(
            teacher_dir, dtype=torch.float32)), 2)
    with LoopbackVllm(teacher_dir, tiny / "student") as server:
        url_with_secret = server.url + "?token=s3cret"
        served = fill_from_server(tmp_path / "served", url_with_secret, top_k, *cache_inputs(tiny))
        assert server.scored == len(examples)  # one request per conversation
    identity = teacher_cache.read_meta(tmp_path / "served")["identity"]
    assert identity["teacher"] == MODEL_NAME and identity["teacher_weights"] is None
    assert identity["teacher_server"] == redact_url(url_with_secret) and "s3cret" not in \
        (tmp_path / "served" / "meta.json").read_text()
    worst_log_prob, worst_tail, rows = 0.0, 0.0, 0
    for index in range(len(examples)):
        (local_ids, local_logprobs, local_tail), (ids, logprobs, tail) = \
            local.rows(index), served.rows(index)
        assert local_ids.shape == ids.shape == (len(tail), top_k)
        assert ids.dtype == local_ids.dtype == np.int32 and logprobs.dtype == np.float16
        assert np.array_equal(local_ids, ids), index
        step = np.spacing(np.maximum(np.abs(local_logprobs), np.abs(logprobs)))
        assert (np.abs(local_logprobs.astype(np.float32) - logprobs) <= step).all(), index
        worst_log_prob = max(worst_log_prob, float(np.abs(local_logprobs - logprobs).max()))
        worst_tail = max(worst_tail, float(np.abs(local_tail - tail).max()))
        rows += len(tail)
    assert rows > 100 and worst_tail <= 1e-5, (rows, worst_tail)
    print(f"{rows} rows; largest log-prob difference {worst_log_prob:.3g} (float16 storage), "
          f"tail {worst_tail:.3g}")


@pytest.mark.slow
def test_a_killed_server_filled_build_resumes_without_asking_again(tiny, tmp_path, api_key,
                                                                   monkeypatch):
    """Shards of 2 conversations, batches of 2: the server answers 5 prompts, then fails hard
    (a 400, not retried) in the third shard. Two shards are kept, the cache is not complete; the
    rerun, against a restarted server on another port, asks only for the conversations after
    them, and the cache equals an uninterrupted build's."""
    from common import teacher_cache
    from common.errors import UserError

    monkeypatch.setattr(teacher_cache, "EXAMPLES_PER_SHARD", 2)
    inputs = cache_inputs(tiny)
    examples = inputs[1]
    with LoopbackVllm(tiny / "teacher", tiny / "student", stop_after=5) as server:
        with pytest.raises(UserError, match="the loopback server has stopped"):
            fill_from_server(tmp_path / "cache", server.url, 5, *inputs)
    assert teacher_cache.read_meta(tmp_path / "cache") is None  # not complete
    progress = json.loads((tmp_path / "cache" / "progress.json").read_text())
    assert [shard["num_examples"] for shard in progress["shards"]] == [2, 2]
    with LoopbackVllm(tiny / "teacher", tiny / "student") as server:
        resumed = fill_from_server(tmp_path / "cache", server.url, 5, *inputs)
        assert server.scored == len(examples) - 4
    with LoopbackVllm(tiny / "teacher", tiny / "student") as server:
        reference = fill_from_server(tmp_path / "reference", server.url, 5, *inputs)
    for index in range(len(examples)):
        for a, b in zip(reference.rows(index), resumed.rows(index)):
            assert np.array_equal(a, b), index


def test_cache_top_k_and_teacher_top_k_must_agree_for_a_served_cache():
    from common.errors import UserError
    from token_level import TokenLevelArguments

    served = dict(teacher_api_base="http://x/v1", teacher_api_model="m", teacher_cache="c")
    with pytest.raises(UserError, match="--cache-top-k 32 and --teacher-top-k 20 differ"):
        TokenLevelArguments(**served, cache_top_k=32, teacher_top_k=20)
    TokenLevelArguments(**served, cache_top_k=20, teacher_top_k=20)  # the same K is fine
    TokenLevelArguments(**served, teacher_top_k=8)


@pytest.mark.slow
def test_a_cache_filled_from_the_server_trains_later_runs_without_it(tiny, tmp_path, api_key):
    """token_level.py --teacher-cache --teacher-api-base fills the cache and trains from it; the
    next run has only --teacher-cache (no teacher, the server gone) and takes the same losses."""
    common = ["--student", tiny / "student", "--dataset", tiny / "train.jsonl",
              "--teacher-cache", tmp_path / "cache", "--max-steps", "3", "--batch-size", "4",
              "--log-steps", "1"]
    with LoopbackVllm(tiny / "teacher", tiny / "student") as server:
        run_script("token_level.py", "--teacher-api-base", server.url, "--teacher-api-model",
                   MODEL_NAME, "--teacher-top-k", "8", "--api-key-env", KEY_ENV,
                   "--output-dir", tmp_path / "filled", *common)
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["complete"] and meta["identity"]["top_k"] == 8
    assert meta["identity"]["teacher"] == MODEL_NAME
    result = run_script("token_level.py", "--output-dir", tmp_path / "cached", *common)
    assert "using the teacher cache" in result.stdout + result.stderr
    filled, cached = read_metrics(tmp_path / "filled"), read_metrics(tmp_path / "cached")
    assert [row["step"] for row in cached] == [1, 2, 3]
    for filled_row, cached_row in zip(filled, cached):
        for name in ("loss", "kd", "ce"):
            assert cached_row[name] == filled_row[name], name
