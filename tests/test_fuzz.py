"""Property-based (hypothesis) tests of the data and masking layers on arbitrary input.

Whatever a dataset holds (any JSON, a byte-order mark, OpenAI content parts, lone UTF-16
surrogates, roles in any order), each row is normalized to messages, skipped with a counted
reason, or the whole file is refused with a one-line UserError naming the file and row; no other
exception escapes. Encoded conversations always have aligned, in-range labels, and the supervised
tokens are the assistant's replies (plus their end of turn), never the template's own text.

The adversarial end of the file runs the scripts themselves, as a user would, on each bad input
found in the field: exit status 2, one line on stderr, no traceback.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from common.chat import IGNORE_INDEX, ChatEncoder, SkipRow, encode_dataset
from common.data import ROLES, load_conversation_rows, row_to_messages
from common.errors import UserError
from conftest import REPO, run_script

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
                | st.text(max_size=30))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
odd_roles = st.sampled_from(sorted(ROLES)) | st.sampled_from(
    ["", "User", "bot", "function", None, 3, ["user"], {"role": "user"}])
# Half of a UTF-16 pair ("\ud800"), which JSON can spell and no tokenizer can encode.
surrogate_texts = st.text(alphabet=st.characters(categories=["Cs", "Ll", "Zs"]), min_size=1,
                          max_size=8)
text_parts = st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                             "text": st.text(max_size=8) | surrogate_texts})
                      | st.fixed_dictionaries({"type": st.just("image_url"),
                                               "image_url": st.just({"url": "x.png"})}),
                      max_size=3)
odd_contents = (st.text(max_size=40) | st.just("") | st.just("   \n ") | st.none() | st.integers()
                | st.lists(st.text(max_size=5), max_size=2) | surrogate_texts | text_parts
                | st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=5)}))
odd_messages = st.lists(st.fixed_dictionaries({"role": odd_roles, "content": odd_contents})
                        | st.dictionaries(st.sampled_from(["role", "content", "name"]),
                                          json_values, max_size=3)
                        | json_scalars, max_size=6)
odd_rows = (st.fixed_dictionaries({"messages": odd_messages | json_values})
            | st.fixed_dictionaries({"prompt": json_values | odd_messages | st.text(max_size=20)
                                     | surrogate_texts,
                                     "response": json_values | st.text(max_size=20)
                                     | surrogate_texts | text_parts})
            | st.dictionaries(st.sampled_from(["messages", "prompt", "response", "text"]),
                              json_values, max_size=3)
            | json_values)


def data_args(path, **overrides):
    return SimpleNamespace(dataset=str(path), dataset_split="train", dataset_config=None,
                           messages_field="messages", prompt_field="prompt",
                           response_field="response", max_samples=-1, max_length=64,
                           **overrides)


def assert_one_line_user_error(exc, path):
    message = str(exc)
    assert "\n" not in message and message.strip(), message
    assert str(path) in message or "dataset" in message, message


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny / "student")


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return ChatEncoder(tokenizer, 96)


@SETTINGS
@given(row=odd_rows)
@example(row={"messages": [{"role": ["user"], "content": "unhashable role"}]})
@example(row={"messages": [{"role": {"r": 1}, "content": "x"}, {"role": "assistant"}]})
@example(row={"prompt": [{"role": "user", "content": 3}], "response": "x"})
@example(row={"messages": None, "prompt": None, "response": "x"})
@example(row={"prompt": "q\ud800", "response": "x"})
@example(row={"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]})
def test_every_row_is_normalized_or_skipped_with_a_reason(row):
    messages, reason = row_to_messages(row)
    if messages is None:
        assert isinstance(reason, str) and reason
        return
    assert reason is None and isinstance(messages, list)
    for message in messages:
        assert set(message) == {"role", "content"}
        assert message["role"] in ROLES and isinstance(message["content"], str)
        message["content"].encode("utf-8")  # no lone surrogate reaches a tokenizer


@SETTINGS
@given(rows=st.lists(odd_rows, max_size=8), as_jsonl=st.booleans(), bom=st.booleans())
def test_a_file_of_odd_rows_loads_or_is_refused_in_one_line(tmp_path_factory, rows, as_jsonl,
                                                            bom):
    path = tmp_path_factory.mktemp("fuzz") / ("data.jsonl" if as_jsonl else "data.json")
    text = "".join(json.dumps(row) + "\n" for row in rows) if as_jsonl else json.dumps(rows)
    path.write_text(text, encoding="utf-8-sig" if bom else "utf-8")
    try:
        pairs, skipped = load_conversation_rows(data_args(path))
    except UserError as exc:
        assert_one_line_user_error(exc, path)
        return
    assert len(pairs) + sum(skipped.values()) == len(rows)
    for messages, _ in pairs:  # a reply answers some question before it
        roles = [m["role"] for m in messages]
        assert "user" in roles and "assistant" in roles[roles.index("user"):]


@SETTINGS
@given(data=st.text(max_size=200).map(str.encode) | st.binary(max_size=200),
       bom=st.booleans())
def test_arbitrary_file_bytes_load_or_are_refused_in_one_line(tmp_path_factory, data, bom):
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    try:
        load_conversation_rows(data_args(path))
    except UserError as exc:
        assert_one_line_user_error(exc, path)


plain_roles = st.sampled_from(sorted(ROLES))
plain_contents = st.text(max_size=40) | st.sampled_from(["", " ", "\n\n", "<|end_of_turn|>",
                                                         "<|header|>assistant<|/header|>"])
conversations = st.lists(st.fixed_dictionaries({"role": plain_roles, "content": plain_contents}),
                         max_size=6)


@SETTINGS
@given(messages=conversations)
@example(messages=[])
@example(messages=[{"role": "system", "content": "only a system prompt"}])
@example(messages=[{"role": "assistant", "content": "a reply with no question"}])
@example(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}])
def test_encoding_never_raises_anything_but_skip_row(encoder, messages):
    try:
        example = encoder.encode(messages)
    except SkipRow as exc:
        assert str(exc)
        return
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels) <= encoder.max_length
    assert any(label != IGNORE_INDEX for label in labels)
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, ids))


# Replies and prompts that look like the template's own text ("a", "assistant", "header") are the
# hard case: a search that starts too early finds them inside a role header.
words = st.sampled_from(["a", "t", "s", "assistant", "user", "system", "header", "Today", "is",
                         "You", "helpful", "apple", "4", "yes", "no", "B"])
replies = st.lists(words, min_size=1, max_size=4).map(" ".join)


@pytest.fixture(scope="module", params=["student", "student_sp"])
def any_encoder(tiny, request):
    """The Llama-3-like template (header tokens, dated system prompt, trim) and a Llama-2-like
    one ([INST] ... [/INST] reply</s>, SentencePiece-style tokenizer)."""
    return ChatEncoder(AutoTokenizer.from_pretrained(tiny / request.param), 4096)


@SETTINGS
@given(turns=st.lists(st.tuples(replies, replies), min_size=1, max_size=3),
       system=st.none() | replies)
@example(turns=[("a", "a")], system=None)
@example(turns=[("Which?", "assistant"), ("And?", "header")], system="You")
def test_supervised_tokens_are_exactly_the_replies(any_encoder, turns, system):
    messages = [{"role": "system", "content": system}] if system else []
    for prompt, reply in turns:
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    example = any_encoder.encode(messages)
    supervised = [token for token, label in zip(example["input_ids"], example["labels"])
                  if label != IGNORE_INDEX]
    expected = "".join(reply.strip() + any_encoder.end_of_turn for _, reply in turns)
    decoded = any_encoder.tokenizer.decode(supervised)
    assert decoded.replace(" ", "") == expected.replace(" ", "")


@SETTINGS
@given(rows=st.lists(odd_rows, min_size=1, max_size=6))
def test_dataset_encoding_gives_examples_or_one_line_error(tmp_path_factory, encoder, rows):
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    warnings = []
    try:
        examples = encode_dataset(data_args(path), encoder, log=warnings.append)
    except UserError as exc:
        assert_one_line_user_error(exc, path)
        return
    assert examples and len(warnings) <= 1
    assert all("\n" not in warning for warning in warnings)


def test_huge_row_is_cut_or_skipped_not_fatal(tmp_path, encoder):
    huge = "word " * 200_000  # ~1 MB of text in one reply
    rows = [{"messages": [{"role": "user", "content": "Long?"},
                          {"role": "assistant", "content": huge}]},
            {"messages": [{"role": "user", "content": huge},
                          {"role": "assistant", "content": "short"}]},
            {"messages": [{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}]}]
    path = tmp_path / "huge.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    warnings = []
    examples = encode_dataset(data_args(path), encoder, log=warnings.append)
    # the long reply is cut at --max-length and still trains; the reply after a huge prompt falls
    # beyond it and is skipped with a counted reason
    assert len(examples) == 2 and all(len(e["input_ids"]) <= encoder.max_length for e in examples)
    assert warnings == ["warning: skipped 1 of 3 rows: 1 too long for --max-length"]


@pytest.mark.parametrize("content, reason", [
    ('{"messages": []}', "messages is not a non-empty list"),
    ('{"messages": [{"role": "system", "content": "Only a system prompt."}]}',
     "no non-empty assistant reply"),
    ('{"messages": [{"role": "user", "content": "No reply."}]}', "no non-empty assistant reply"),
    ('{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "unknown role"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]}',
     "non-string content"),
    ('[1, 2, 3]', "neither 'messages' nor 'prompt'"),
])
def test_files_with_no_usable_row_are_refused_with_the_reasons(tmp_path, encoder, content, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text(content + "\n")
    with pytest.raises(UserError) as error:
        encode_dataset(data_args(path), encoder, log=lambda message: None)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and reason in message, message


# ---------------------------------------------------------------------------------------------
# Adversarial runs of the scripts: every bad input is one line on stderr, never a traceback.

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def run_refused(*args, **env):
    """Run a repo script (as conftest.run_script) with extra environment variables."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                               **env})


def assert_refused(result, fragment):
    """Exit status 2 with `error: ...` naming the problem, alone on its line (a progress bar
    before it may end in a carriage return), and nothing else said about it."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in re.split(r"[\r\n]+", result.stderr) if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr[-2000:]
    assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def bad_inputs(tiny, tmp_path_factory):
    """A teacher cache built by token_level.py itself (so every identity field matches a later
    run), damaged copies of it, and data files no row of which can be used."""
    from examples.tiny_setup import build_model

    root = tmp_path_factory.mktemp("adversarial")
    teacher = root / "teacher"
    shutil.copytree(tiny / "teacher", teacher)
    cache = root / "cache"
    run_script("token_level.py", "--teacher", teacher, "--student", tiny / "student",
               "--dataset", tiny / "train.jsonl", "--output-dir", root / "built", "--max-steps",
               1, "--teacher-cache", cache)
    damaged = {}
    for name, damage in [
            ("no_index", lambda c: (c / "index.npy").unlink()),
            ("garbage", lambda c: np.save(c / "shard_00000.logprobs.npy", np.random.default_rng(
                0).normal(size=np.load(c / "shard_00000.logprobs.npy").shape).astype(np.float16))),
            ("no_identity", lambda c: (c / "meta.json").write_text(json.dumps(
                {k: v for k, v in json.loads((c / "meta.json").read_text()).items()
                 if k != "identity"})))]:
        damaged[name] = root / f"cache_{name}"
        shutil.copytree(cache, damaged[name])
        damage(damaged[name])
    (root / "file_cache").write_text("not a directory")
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    config = json.loads((teacher / "config.json").read_text())
    # retrained in place: same path, same file size, other weights
    build_model(tokenizer, config["hidden_size"], config["num_hidden_layers"],
                config["vocab_size"] - len(tokenizer), seed=7).save_pretrained(teacher)
    data = {"out_of_order": root / "out_of_order.jsonl", "surrogates": root / "surrogates.jsonl",
            "not_utf8": root / "not_utf8.jsonl"}
    data["out_of_order"].write_text(json.dumps({"messages": CHAT[::-1]}) + "\n")
    data["surrogates"].write_text('{"prompt": "hi \\ud800", "response": "hello"}\n' * 2)
    data["not_utf8"].write_bytes(json.dumps({"messages": CHAT}).encode() + b"\n"
                                 + b'{"prompt": "caf\xe9", "response": "x"}\n')
    return {"root": root, "teacher": teacher, "cache": cache, **damaged, **data,
            "file_cache": root / "file_cache"}


TOKEN_LEVEL_CASES = [
    (["--learnig-rate", "1e-3"], "unknown flag --learnig-rate; did you mean --learning-rate?"),
    (["--loss-temperature", "inf"], "--loss-temperature must be > 0 and finite, got inf"),
    (["--dtype", "float16"], "turns NaN on a machine without a GPU"),
    (["--teacher-cache", "{file_cache}"], "is a file, not a directory"),
    (["--teacher", None, "--teacher-cache", "{no_index}"], "index.npy is missing"),
    (["--teacher", None, "--teacher-cache", "{garbage}"],
     "shard_00000.logprobs.npy does not match the checksum"),
    (["--teacher", None, "--teacher-cache", "{no_identity}"], "no identity"),
    (["--teacher-cache", "{cache}"], "teacher_weights: cache"),
    (["--dataset", "{out_of_order}"], "no user turn before any assistant reply"),
    (["--dataset", "{surrogates}"], "2 lone UTF-16 surrogate in the text"),
    (["--dataset", "{not_utf8}"], "line 2 is not valid UTF-8"),
]


@pytest.mark.slow
def test_token_level_and_eval_refuse_bad_inputs_in_one_line(tiny, bad_inputs):
    options = {"--teacher": str(bad_inputs["teacher"]), "--student": str(tiny / "student"),
               "--dataset": str(tiny / "train.jsonl"), "--max-steps": "1"}
    # ACCELERATE_USE_CPU: the float16 case is about CPU-only runs, on a GPU machine too.
    env = {"ACCELERATE_USE_CPU": "true"}
    for number, (extra, fragment) in enumerate(TOKEN_LEVEL_CASES):
        run_options = dict(options)
        for flag, value in zip(extra[::2], extra[1::2]):
            run_options[flag] = None if value is None else value.format(**bad_inputs)
        output_dir = bad_inputs["root"] / f"out_{number}"
        argv = [item for flag, value in run_options.items() if value is not None
                for item in (flag, value)]
        result = run_refused("token_level.py", *argv, "--output-dir", output_dir, **env)
        assert_refused(result, fragment)
        assert not output_dir.exists()  # refused before anything was written
    for dataset, fragment in [("surrogates", "lone UTF-16 surrogate"),
                              ("out_of_order", "no user turn before any assistant reply")]:
        result = run_refused("eval.py", "--models", tiny / "student", "--dataset",
                             bad_inputs[dataset], "--no-progress")
        assert_refused(result, fragment)
    result = run_refused("eval.py", "--models", tiny / "student", "--dataset",
                         tiny / "test.jsonl", "--max-new-tokenz", "4")
    assert_refused(result, "did you mean --max-new-tokens?")


@pytest.fixture(scope="module")
def odd_paths(tiny, tmp_path_factory):
    """Things users pass where a model, a data file or an output dir goes, and an unfinished
    on_policy.py run (checkpoint at step 1 of 2) with damaged copies of its checkpoint."""
    root = tmp_path_factory.mktemp("odd")
    (root / "gguf").mkdir()
    (root / "gguf" / "model-Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    (root / "empty").mkdir()
    shutil.copytree(tiny / "teacher", root / "no_weights")
    (root / "no_weights" / "model.safetensors").unlink()
    (root / "notes.txt").write_text("not a directory")
    (root / "garbage.jsonl").write_text("garbage{\n")
    (root / "bad.parquet").write_bytes(bytes(range(256)) * 2)
    (root / "bad.csv").write_bytes(b"\xb3\xff" + bytes(range(128, 256)) + b"\n")
    run_script("on_policy.py", *ON_POLICY_ARGS, "--teacher", tiny / "teacher", "--student",
               tiny / "student", "--dataset", tiny / "train.jsonl", "--output-dir", root / "run")
    paths = {"root": root, "tiny": tiny, "gguf": root / "gguf", "empty": root / "empty",
             "no_weights": root / "no_weights",
             "file": root / "notes.txt", "garbage": root / "garbage.jsonl",
             "bad_parquet": root / "bad.parquet", "bad_csv": root / "bad.csv"}

    def same_size_garbage(path):
        path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))

    def sizes_as_text(checkpoint):
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        state["files"] = {name: str(size) for name, size in state["files"].items()}
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))

    for name, damage in [
            ("garbled_optimizer", lambda c: same_size_garbage(c / "optimizer.bin")),
            ("sizes_as_text", sizes_as_text),
            ("truncated_model", lambda c: os.truncate(c / "model.safetensors", 1000))]:
        unfinished = root / name  # what a killed run leaves: checkpoints and metrics only
        shutil.copytree(root / "run" / "checkpoints", unfinished / "checkpoints")
        shutil.copy(root / "run" / "metrics.jsonl", unfinished)
        (checkpoint,) = (unfinished / "checkpoints").iterdir()
        damage(checkpoint)
        paths[name] = unfinished
    return paths


# The run in odd_paths uses these: a resumed run must ask for the same settings.
ON_POLICY_ARGS = ["--max-steps", "2", "--save-steps", "1", "--max-new-tokens", "4", "--lmbda",
                  "1"]
SCRIPT_ARGS = {
    "on_policy.py": ["--teacher", "{tiny}/teacher", "--student", "{tiny}/student", "--dataset",
                     "{tiny}/train.jsonl", *ON_POLICY_ARGS],
    "cross_tokenizer.py": ["--teacher", "{tiny}/teacher", "--student", "{tiny}/student_sp",
                           "--dataset", "{tiny}/train.jsonl", "--max-steps", "1", "--top-k", "8"],
    "sequence_level.py": ["--teacher", "{tiny}/teacher", "--student", "{tiny}/student",
                          "--dataset", "{tiny}/train.jsonl", "--max-steps", "1",
                          "--max-new-tokens", "4", "--max-samples", "4"],
    "eval.py": ["--models", "{tiny}/student", "--dataset", "{tiny}/test.jsonl", "--max-samples",
                "2", "--max-new-tokens", "2", "--no-progress"],
}
ODD_CASES = [
    ("on_policy.py", ["--kl", "bogus"], "invalid choice: 'bogus'"),
    ("on_policy.py", ["--lmbda", "2"], "--lmbda must be in [0, 1], got 2.0"),
    ("on_policy.py", ["--teacher", "{gguf}"], "holds GGUF files, llama.cpp's format"),
    ("on_policy.py", ["--student", "{empty}"], "could not be loaded (it is empty)"),
    ("on_policy.py", ["--student", "{tiny}/student_sp"], "have different vocabularies"),
    ("on_policy.py", ["--completions", "{garbage}"], "line 1 is not valid JSON"),
    ("on_policy.py", ["--output-dir", "{file}"], "is a file; pass a directory"),
    ("on_policy.py", ["--resume", "true", "--output-dir", "{garbled_optimizer}"],
     "could not load checkpoint"),
    ("on_policy.py", ["--resume", "true", "--output-dir", "{sizes_as_text}"],
     "holds no byte size for"),
    ("cross_tokenizer.py", ["--top-k", "-1"], "--top-k must be >= 0"),
    ("cross_tokenizer.py", ["--teacher", "{file}"], "is a file; pass the model's directory"),
    ("cross_tokenizer.py", ["--dataset", "{bad_parquet}"], "could not be read as parquet"),
    ("cross_tokenizer.py", ["--student", "{root}/missing"], "does not exist"),
    ("sequence_level.py", ["--teacher", "{gguf}"], "holds GGUF files"),
    ("sequence_level.py", ["--teacher", "{no_weights}"], "could not be loaded"),
    ("sequence_level.py", ["--dataset", "{bad_csv}"],
     "could not be read as csv (UnicodeDecodeError"),
    ("sequence_level.py", ["--resume", "true", "--output-dir", "{truncated_model}"],
     "model.safetensors is damaged"),
    ("sequence_level.py", ["--output-dir", "{file}"], "is a file; pass a directory"),
    ("eval.py", ["--output", "{file}/results.json"], "inside {file}, a file"),
]


def snapshot(path):
    """Every file under `path` with its size and modification time (None: nothing there)."""
    if not path.exists():
        return None
    return {str(f.relative_to(path)): (f.stat().st_size, f.stat().st_mtime_ns)
            for f in sorted(path.rglob("*"))} if path.is_dir() else path.read_bytes()


@pytest.mark.slow
def test_on_policy_cross_tokenizer_sequence_level_refuse_bad_inputs_in_one_line(odd_paths):
    """One test, so the tiny run with its checkpoint is made once; each case runs alone."""
    failures = []
    for number, (script, extra, fragment) in enumerate(ODD_CASES):
        options = {}
        base = SCRIPT_ARGS[script]
        for flag, value in [*zip(base[::2], base[1::2]), *zip(extra[::2], extra[1::2])]:
            options[flag] = value.format(**odd_paths)
        if script != "eval.py":
            options.setdefault("--output-dir", str(odd_paths["root"] / f"out_{number}"))
        output = Path(options.get("--output-dir") or options["--output"])
        before = snapshot(output)
        argv = [item for flag, value in options.items() for item in (flag, value)]
        result = run_refused(script, *argv, ACCELERATE_USE_CPU="true")
        try:
            assert_refused(result, fragment.format(**odd_paths))
            # and nothing else said about it (a library's own log line of the same failure)
            said = [line for line in re.split(r"[\r\n]+", result.stderr) if "error" in line.lower()]
            assert len(said) == 1, said
            assert "weights_only" not in result.stderr  # torch's advice would run the pickle
            assert snapshot(output) == before, "left outputs behind or changed them"
        except AssertionError as exc:
            failures.append(f"{script} {extra}: {exc}")
    assert not failures, "\n".join(failures)
