"""on_policy.py: the on/off-policy draw, what on-policy steps supervise, and end-to-end runs."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.chat import IGNORE_INDEX, ChatEncoder, collate
from common.generation import Completion
from conftest import run_script
from on_policy import OnPolicyArguments, OnPolicySampler, is_on_policy_step, last_reply_start


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def args(tiny, out, *extra):
    return ["--teacher", tiny / "teacher", "--student", tiny / "student", "--dataset",
            tiny / "train.jsonl", "--output-dir", out, "--batch-size", "4", "--log-steps", "1",
            "--max-new-tokens", "12", *extra]


def test_draw_depends_only_on_seed_and_step():
    draws = [is_on_policy_step(7, step, 0.5) for step in range(400)]
    assert draws == [is_on_policy_step(7, step, 0.5) for step in range(400)]  # any process
    assert 0.4 < sum(draws) / len(draws) < 0.6
    assert draws != [is_on_policy_step(8, step, 0.5) for step in range(400)]
    assert not any(is_on_policy_step(7, s, 0.0) for s in range(100))
    assert all(is_on_policy_step(7, s, 1.0) for s in range(100))


def test_last_reply_start():
    assert last_reply_start([-100, 5, 6, -100, -100, 7, 8]) == 5
    assert last_reply_start([-100, -100, 3]) == 2


@pytest.fixture(scope="module")
def sampler_setup(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny / "student")
    encoder = ChatEncoder(tokenizer, 512)
    student = AutoModelForCausalLM.from_pretrained(tiny / "student")
    conversation = [{"role": "user", "content": "What is 1 + 1?"},
                    {"role": "assistant", "content": "1 + 1 = 2."}]
    example = encoder.encode(conversation)
    batch = collate([example, example], tokenizer.pad_token_id)
    return tokenizer, encoder, student, example, batch


def make_sampler(tokenizer, encoder, **overrides):
    accelerator = SimpleNamespace(unwrap_model=lambda model: model)
    gkd_args = OnPolicyArguments(lmbda=1.0, max_new_tokens=6, **overrides)
    return OnPolicySampler(accelerator, tokenizer, {encoder.end_of_turn_token_id},
                           encoder.end_of_turn_token_id, gkd_args, seed=0)


def test_on_policy_batch_supervises_exactly_the_samples(sampler_setup):
    tokenizer, encoder, student, example, batch = sampler_setup
    torch.manual_seed(0)
    new = make_sampler(tokenizer, encoder)(student, batch, step=0)
    prompt_length = last_reply_start(example["labels"])
    prompt = example["input_ids"][:prompt_length]
    for row in range(2):
        length = int(new["attention_mask"][row].sum())
        ids, labels = new["input_ids"][row, :length].tolist(), new["labels"][row].tolist()
        assert ids[:prompt_length] == prompt  # the dataset's reply is gone, the prompt stays
        assert all(label == IGNORE_INDEX for label in labels[:prompt_length])
        assert labels[prompt_length:length] == ids[prompt_length:]  # every sampled token
        assert all(label == IGNORE_INDEX for label in labels[length:])  # padding
        assert 1 <= length - prompt_length <= 6


def test_nothing_after_the_end_of_turn_is_supervised(sampler_setup, monkeypatch):
    tokenizer, encoder, student, example, batch = sampler_setup
    import common.generation

    # one row stops after two tokens, the other runs to the limit
    monkeypatch.setattr(common.generation, "generate", lambda *a, **k: [
        Completion([11, 12], "stop"), Completion([13, 14, 15, 16, 17, 18], "length")])
    sampler = make_sampler(tokenizer, encoder)
    new = sampler(student, batch, step=0)
    prompt_length = last_reply_start(example["labels"])
    supervised = [[l for l in row if l != IGNORE_INDEX] for row in new["labels"].tolist()]
    assert supervised == [[11, 12, encoder.end_of_turn_token_id], [13, 14, 15, 16, 17, 18]]
    assert int(new["attention_mask"][0].sum()) == prompt_length + 3
    assert sampler.step_metrics(0) == {"on_policy": True, "sampled_length": 4.5,
                                       "reached_end_of_turn": 0.5}


def test_off_policy_step_leaves_the_batch_alone(sampler_setup):
    tokenizer, encoder, student, example, batch = sampler_setup
    sampler = make_sampler(tokenizer, encoder)
    sampler.args.lmbda = 0.0
    assert sampler(student, batch, step=3) is batch
    assert sampler.step_metrics(3) == {"on_policy": False}


@pytest.mark.slow
def test_lmbda_zero_step_equals_token_level(tiny, tmp_path):
    common = ["--max-steps", "2", "--kl", "reverse", "--seed", "3"]
    run_script("on_policy.py", *args(tiny, tmp_path / "gkd", "--lmbda", "0", *common))
    run_script("token_level.py", "--teacher", tiny / "teacher", "--student", tiny / "student",
               "--dataset", tiny / "train.jsonl", "--output-dir", tmp_path / "kd",
               "--batch-size", "4", "--log-steps", "1", *common)
    on_policy_rows, token_level_rows = metrics(tmp_path / "gkd"), metrics(tmp_path / "kd")
    assert [r["on_policy"] for r in on_policy_rows] == [False, False]
    for a, b in zip(on_policy_rows, token_level_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["supervised_tokens"] == b["supervised_tokens"]


@pytest.mark.slow
def test_end_to_end_lmbda_one_and_half(tiny, tmp_path):
    run_script("on_policy.py", *args(tiny, tmp_path / "a", "--lmbda", "1.0", "--max-steps", "8",
                                     "--kl", "skew_reverse"))
    rows = metrics(tmp_path / "a")
    assert len(rows) == 8 and all(row["on_policy"] is True for row in rows)
    assert all(0 <= row["kd"] <= math.log(1 / 0.1) + 1e-4 for row in rows)  # skew bounds it
    assert all(0 < row["sampled_length"] <= 12 for row in rows)
    AutoModelForCausalLM.from_pretrained(tmp_path / "a")

    run_script("on_policy.py", *args(tiny, tmp_path / "b", "--lmbda", "0.5", "--max-steps", "8"))
    rows = metrics(tmp_path / "b")
    assert [row["on_policy"] for row in rows] == [is_on_policy_step(42, s, 0.5) for s in range(8)]
    # without a cache the run records the default K, as every earlier version did: a resume of
    # an older run compares it
    run_config = json.loads((tmp_path / "b" / "run_config.json").read_text())
    assert run_config["on_policy"]["cache_top_k"] == 32
    # same seed, same run (sampling included), and held-out scoring does not perturb it
    run_script("on_policy.py", *args(tiny, tmp_path / "c", "--lmbda", "0.5", "--max-steps", "8",
                                     "--eval-dataset", tiny / "test.jsonl", "--eval-steps", "4"))
    evals = [row for row in metrics(tmp_path / "c") if "eval_loss" in row]
    assert [row["step"] for row in evals] == [4, 8] and all(row["eval_kd"] > 0 for row in evals)
    first, second = load_file(tmp_path / "b" / "model.safetensors"), \
        load_file(tmp_path / "c" / "model.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.slow
@pytest.mark.parametrize("extra, expected", [
    (["--lmbda", "1.5"], "--lmbda"),
    (["--kl", "jsd", "--beta", "0"], "--beta"),
    (["--kl", "skew_reverse", "--skew", "1"], "--skew"),
    (["--student", "STUDENT_SP"], "cross_tokenizer.py"),
])
def test_bad_input(tiny, tmp_path, extra, expected):
    extra = [str(tiny / "student_sp") if e == "STUDENT_SP" else e for e in extra]
    result = run_script("on_policy.py", *args(tiny, tmp_path / "out", "--max-steps", "2"), *extra,
                        check=False)
    assert result.returncode == 2 and expected in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_off_policy_steps_read_the_teacher_cache(tiny, tmp_path):
    """One cache serves token_level.py and on_policy.py; with K = the whole vocabulary the cached
    off-policy steps equal live-teacher ones, so the rows line up with the examples."""
    cache = tmp_path / "cache"
    vocab = len(AutoTokenizer.from_pretrained(tiny / "student"))
    common = ["--max-steps", "4", "--kl", "forward", "--seed", "5"]
    run_script("token_level.py", "--teacher", tiny / "teacher", "--student", tiny / "student",
               "--dataset", tiny / "train.jsonl", "--output-dir", tmp_path / "kd",
               "--batch-size", "4", "--log-steps", "1", "--teacher-cache", cache,
               "--cache-top-k", vocab, *common)
    # on_policy.py is not told the K: unset, --cache-top-k is the existing cache's, as there
    # --lmbda 0: every step off-policy from the cache token_level.py built = token_level.py
    result = run_script("on_policy.py", *args(tiny, tmp_path / "off", "--lmbda", "0",
                                              "--teacher-cache", cache, *common))
    assert "using the teacher cache" in result.stdout
    # what ran is recorded: the existing cache's K, not "unset"
    assert json.loads((tmp_path / "off" / "run_config.json").read_text())[
        "on_policy"]["cache_top_k"] == vocab
    kd, off = load_file(tmp_path / "kd" / "model.safetensors"), \
        load_file(tmp_path / "off" / "model.safetensors")
    assert all(torch.equal(kd[name], off[name]) for name in kd)
    # mixed steps: cached off-policy steps follow a live-teacher run of the same seed
    mixed = ["--lmbda", "0.5", "--seed", "1", "--max-steps", "6"]
    run_script("on_policy.py", *args(tiny, tmp_path / "cached", "--teacher-cache", cache,
                                     *common, *mixed))
    run_script("on_policy.py", *args(tiny, tmp_path / "live", *common, *mixed))
    cached, live = metrics(tmp_path / "cached"), metrics(tmp_path / "live")
    assert {row["on_policy"] for row in cached} == {True, False}
    for a, b in zip(cached, live):
        assert a["on_policy"] == b["on_policy"]
        # the cache stores fp16 log-probs: about three significant digits of the KL; a row
        # misaligned with its example would be off by far more
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3, abs=1e-5)


@pytest.mark.slow
def test_teacher_cache_needs_forward_kl(tiny, tmp_path):
    result = run_script("on_policy.py", *args(tiny, tmp_path / "out", "--max-steps", "2",
                                              "--teacher-cache", tmp_path / "cache",
                                              "--kl", "reverse"), check=False)
    assert result.returncode == 2 and "--kl forward" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
