"""sequence_level.py: local teacher, a flaky OpenAI-compatible server, kill-and-rerun, bad input."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import REPO, run_script

API_KEY = "sk-test-secret-0123456789"


def cache_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


class FakeTeacherServer:
    """An OpenAI-compatible chat-completions endpoint on 127.0.0.1 that fails some requests."""

    def __init__(self, fail_every=3, delay=0.0, answer=lambda question: f"A: {question}",
                 finish_reason="stop", hold_after=None):
        """`answer(question)` is the reply's content (None sends null). After `hold_after`
        answered requests, every further request is held open until the server closes."""
        self.fail_every, self.delay, self.answer = fail_every, delay, answer
        self.finish_reason, self.hold_after = finish_reason, hold_after
        self.requests, self.answered, self.paths = 0, Counter(), []
        self.asked = Counter()  # questions of the requests that got past authentication
        self.admitted, self.held = 0, 0  # requests answered (or being answered), and held
        self.release = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, body, headers=()):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.paths.append(self.path)
                if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                    return self.reply(401, {"error": {"message": "bad key"}})
                if not self.path.split("?")[0].endswith("/chat/completions") \
                        or body["model"] != "teacher-x":
                    return self.reply(404, {"error": {"message": "no such model"}})
                with server.lock:
                    server.requests += 1
                    number = server.requests
                if server.fail_every and number % server.fail_every == 0:
                    status = 429 if number % 2 else 500
                    return self.reply(status, {"error": {"message": "try again"}},
                                      [("retry-after-ms", "10")])
                question = body["messages"][-1]["content"]
                with server.lock:
                    server.asked[question] += 1
                    hold = server.hold_after is not None and server.admitted >= server.hold_after
                    server.held += hold
                    server.admitted += not hold
                if hold:
                    server.release.wait()
                    return
                time.sleep(server.delay)
                with server.lock:
                    server.answered[question] += 1
                self.reply(200, {
                    "id": f"c{number}", "object": "chat.completion", "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": server.finish_reason,
                                 "message": {"role": "assistant",
                                             "content": server.answer(question)}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def api_args(tiny, server, out, *extra):
    return ["sequence_level.py", "--teacher-api-base", server.url, "--teacher-api-model",
            "teacher-x", "--student", tiny / "student", "--dataset", tiny / "train.jsonl",
            "--output-dir", out, "--api-key-env", "TEST_TEACHER_KEY", "--max-steps", "2",
            "--batch-size", "4", *extra]


def run_with_key(*args, check=True):
    os.environ["TEST_TEACHER_KEY"] = API_KEY
    try:
        return run_script(*args, check=check)
    finally:
        del os.environ["TEST_TEACHER_KEY"]


@pytest.mark.slow
def test_local_teacher(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run_script("sequence_level.py", "--teacher", tiny / "teacher", "--student", tiny / "student",
               "--dataset", tiny / "train.jsonl", "--max-samples", "24", "--max-new-tokens", "12",
               "--max-steps", "4", "--output-dir", out, "--eval-dataset", tiny / "test.jsonl")
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [4]  # --eval-steps 0: at the end
    assert metrics[-1]["eval_ce"] == metrics[-1]["eval_loss"] > 0
    rows = cache_rows(out / "teacher_completions.jsonl")
    assert len(rows) == 24 and len({row["id"] for row in rows}) == 24
    assert all(row["messages"][-1]["role"] == "assistant" for row in rows)
    assert all(row["generation"]["max_new_tokens"] == 12 for row in rows)
    AutoModelForCausalLM.from_pretrained(out)
    # a rerun asks the teacher for nothing and the cache is unchanged
    result = run_script("sequence_level.py", "--teacher", tiny / "teacher", "--student",
                        tiny / "student", "--dataset", tiny / "train.jsonl", "--max-samples", "24",
                        "--max-new-tokens", "12", "--max-steps", "4", "--output-dir", out,
                        "--overwrite")
    assert "24 already in" in result.stdout and "0 to generate" in result.stdout
    assert cache_rows(out / "teacher_completions.jsonl") == rows  # --overwrite keeps the cache


@pytest.mark.slow
def test_api_teacher_with_failing_requests(tiny, tmp_path):
    out = tmp_path / "out"
    with FakeTeacherServer(fail_every=3) as server:
        run_with_key(*api_args(tiny, server, out, "--api-concurrency", "4"))
    rows = cache_rows(out / "teacher_completions.jsonl")
    prompts = [json.loads(l)["messages"][0]["content"]
               for l in (tiny / "train.jsonl").read_text().splitlines()]
    unique_prompts = set(prompts)
    assert sorted(row["messages"][0]["content"] for row in rows) == sorted(unique_prompts)
    assert all(row["messages"][-1]["content"] == "A: " + row["messages"][0]["content"]
               for row in rows)
    assert server.requests > len(unique_prompts)  # some failed and were retried
    for path in out.rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path


def generation_args(tiny, server, out, *extra):
    return ["sequence_level.py", "--teacher-api-base", server.url, "--teacher-api-model",
            "teacher-x", "--dataset", tiny / "train.jsonl", "--output-dir", out,
            "--api-key-env", "TEST_TEACHER_KEY", "--generate-only", *extra]


def start_script(*args):
    env = {**os.environ, "TEST_TEACHER_KEY": API_KEY, "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, process, what):
    deadline = time.monotonic() + 120  # a hang guard only
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {process.stderr.read()}"
        assert time.monotonic() < deadline, f"hang guard: still waiting for {what}"
        time.sleep(0.01)


def rows_on_disk(cache):
    return cache.read_bytes().count(b"\n") if cache.exists() else 0


def unique_prompts(tiny):
    return {json.loads(line)["messages"][0]["content"]
            for line in (tiny / "train.jsonl").read_text().splitlines()}


@pytest.mark.slow
def test_killed_generation_keeps_finished_rows_and_asks_only_for_the_rest(tiny, tmp_path):
    out = tmp_path / "out"
    cache = out / "teacher_completions.jsonl"
    prompts = unique_prompts(tiny)
    with FakeTeacherServer(fail_every=0, delay=0.5) as server:
        process = start_script(*generation_args(tiny, server, out, "--api-concurrency", "2"))
        wait_until(lambda: rows_on_disk(cache) >= 3, process, "3 rows were written")
        process.kill()
        process.communicate()
        finished = {row["messages"][0]["content"] for row in cache_rows(cache)}
        assert 3 <= len(finished) < len(prompts)  # killed while generating
        asked_before = Counter(server.asked)
        run_with_key(*generation_args(tiny, server, out, "--api-concurrency", "8"))
    asked_by_rerun = server.asked - asked_before
    assert set(asked_by_rerun) == prompts - finished and set(asked_by_rerun.values()) == {1}
    rows = cache_rows(cache)
    assert sorted(row["messages"][0]["content"] for row in rows) == sorted(prompts)


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_signal_keeps_finished_rows_and_says_how_to_resume(tiny, tmp_path, signum, status):
    out = tmp_path / "out"
    cache = out / "teacher_completions.jsonl"
    prompts = unique_prompts(tiny)
    # 4 answers, then every request stays open: the run can only stop by not waiting for them.
    with FakeTeacherServer(fail_every=0, hold_after=4) as server:
        process = start_script(*generation_args(tiny, server, out, "--api-concurrency", "3",
                                                "--api-timeout", "100000"))
        wait_until(lambda: rows_on_disk(cache) == 4 and server.held == 3, process,
                   "4 rows were written and 3 requests were in flight")
        process.send_signal(signum)
        try:
            _, stderr = process.communicate(timeout=120)  # a hang guard only
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("the run kept waiting for the requests in flight")
    assert process.returncode == status
    last_line = stderr.strip().splitlines()[-1]
    assert f"4 of {len(prompts)} completions are saved in {cache}" in last_line
    assert "rerun the same command" in last_line and "Traceback" not in stderr
    data = cache.read_bytes()
    assert data.endswith(b"\n") and len(cache_rows(cache)) == 4 < len(prompts)


@pytest.mark.slow
def test_sigterm_during_local_generation_keeps_finished_rows(tiny, tmp_path):
    out = tmp_path / "out"
    cache = out / "teacher_completions.jsonl"
    prompts = unique_prompts(tiny)
    process = start_script("sequence_level.py", "--teacher", tiny / "teacher", "--dataset",
                           tiny / "train.jsonl", "--output-dir", out, "--generate-only",
                           "--generation-batch-size", "1", "--max-new-tokens", "64")
    wait_until(lambda: rows_on_disk(cache) >= 1, process, "a row was written")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)  # a hang guard only
    kept = len(cache_rows(cache))
    assert process.returncode == 143 and 1 <= kept < len(prompts)
    assert cache.read_bytes().endswith(b"\n")
    assert stderr.strip().splitlines()[-1].startswith(
        f"stopped by SIGTERM: {kept} of {len(prompts)} completions are saved in {cache}")


@pytest.mark.slow
@pytest.mark.parametrize("content, finish_reason, hint", [
    (None, "stop", "empty content"), ("", "length", "raise --max-new-tokens")])
def test_empty_api_answers_are_not_cached(tiny, tmp_path, content, finish_reason, hint):
    out = tmp_path / "out"
    cache = out / "teacher_completions.jsonl"
    prompts = unique_prompts(tiny)
    sums = {question for question in prompts if "+" in question}
    assert 0 < len(sums) < len(prompts)
    with FakeTeacherServer(fail_every=0, finish_reason=finish_reason,
                           answer=lambda q: content if q in sums else f"A: {q}") as server:
        first = run_with_key(*generation_args(tiny, server, out))
        assert {row["messages"][0]["content"] for row in cache_rows(cache)} == prompts - sums
        warning = [line for line in first.stdout.splitlines() if "replies were empty" in line]
        assert len(warning) == 1 and f"{len(sums)} of {len(prompts)}" in warning[0]
        assert hint in warning[0] and "asks for them again" in warning[0]
        if finish_reason == "stop":
            assert "--max-new-tokens" not in warning[0]
        asked_before = Counter(server.asked)
        run_with_key(*generation_args(tiny, server, out))
        assert server.asked - asked_before == Counter(sums)  # asked again, nothing else
        # Nothing usable at all: the error says why, with the hint that fits.
        server.answer = lambda q: content
        trained = run_with_key(*api_args(tiny, server, tmp_path / "all_empty"), check=False)
    assert trained.returncode == 2 and "Traceback" not in trained.stderr
    error = trained.stderr.strip().splitlines()[-1]
    assert "no completion to train on" in error and hint in error
    if finish_reason == "stop":
        assert "--max-new-tokens" not in error


def test_api_timeout_is_reported_as_a_timeout(tiny, tmp_path):
    with FakeTeacherServer(fail_every=0, hold_after=0) as server:
        result = run_with_key(*generation_args(tiny, server, tmp_path / "out", "--max-samples",
                                               "2", "--api-timeout", "0.5",
                                               "--api-max-retries", "0"), check=False)
    error = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "gave no answer within --api-timeout 0.5 s" in error and "cannot reach" not in error


@pytest.mark.slow
def test_bad_key_is_a_one_line_error_and_keeps_the_cache(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cache = out / "teacher_completions.jsonl"
    cache.write_text('{"id": "kept", "messages": [], "finish_reason": "stop"}\n')
    with FakeTeacherServer() as server:
        os.environ["TEST_TEACHER_KEY"] = "wrong"
        try:
            result = run_script(*api_args(tiny, server, out), check=False)
        finally:
            del os.environ["TEST_TEACHER_KEY"]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "rejected the key" in result.stderr.strip().splitlines()[-1]
    assert "TEST_TEACHER_KEY" in result.stderr and "wrong" not in result.stderr
    assert cache.read_text() == '{"id": "kept", "messages": [], "finish_reason": "stop"}\n'


@pytest.mark.slow
@pytest.mark.parametrize("extra, expected", [
    (["--teacher-api-model", "other"], "404"),
    (["--teacher-api-base", "http://127.0.0.1:9/v1", "--api-max-retries", "0"], "cannot reach"),
])
def test_api_errors(tiny, tmp_path, extra, expected):
    with FakeTeacherServer() as server:
        result = run_with_key(*api_args(tiny, server, tmp_path / "out", *extra), check=False)
    assert result.returncode == 2 and expected in result.stderr.strip().splitlines()[-1]


def test_no_teacher_at_all(tiny, tmp_path):
    result = run_script("sequence_level.py", "--student", tiny / "student", "--dataset",
                        tiny / "train.jsonl", "--output-dir", tmp_path / "out", check=False)
    assert result.returncode == 2
    assert "no teacher given" in result.stderr and not (tmp_path / "out").exists()


def test_repeated_prompts_are_counted_in_one_warning(tmp_path):
    from common.args import DataArguments
    from sequence_level import load_prompts

    rows = [{"prompt": question, "response": "x"} for question in ["a?", "b?", "a?", "a?", "c?"]]
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    logged = []
    jobs = load_prompts(DataArguments(dataset=str(dataset)), num_samples=2, log=logged.append)
    assert len(jobs) == 3 * 2  # one job per distinct prompt and sample index
    assert logged == ["warning: 2 rows repeat an earlier prompt; the teacher answers each distinct "
                      "prompt once (use --num-completions-per-prompt N with "
                      "--sampling-temperature > 0 for several completions per prompt)"]


@pytest.mark.slow
def test_credentials_in_the_api_url_are_never_saved_or_printed(tiny, tmp_path):
    from common.args import DataArguments
    from sequence_level import load_prompts

    # A filled cache: the run trains without sending a request, and writes run_config.json.
    cache = tmp_path / "cache.jsonl"
    jobs = load_prompts(DataArguments(dataset=str(tiny / "train.jsonl")), 1, log=lambda _: None)
    cache.write_text("".join(json.dumps({"id": key, "messages": prompt + [
        {"role": "assistant", "content": "ok"}], "finish_reason": "stop"}) + "\n"
        for key, prompt, _ in jobs))
    url = "http://user:secret@127.0.0.1:9/v1?api-key=secret&api-version=2024"
    out = tmp_path / "out"
    trained = run_script("sequence_level.py", "--teacher-api-base", url, "--teacher-api-model",
                         "teacher-x", "--student", tiny / "student", "--dataset",
                         tiny / "train.jsonl", "--completions", cache, "--output-dir", out,
                         "--max-steps", "1", "--batch-size", "4")
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["sequence_level"]["teacher_api_base"] == \
        "http://***@127.0.0.1:9/v1?api-key=***&api-version=***"
    # unreachable, so the error message names the URL
    failed = run_script("sequence_level.py", "--teacher-api-base", url, "--teacher-api-model",
                        "teacher-x", "--dataset", tiny / "train.jsonl", "--output-dir",
                        tmp_path / "gen", "--generate-only", "--api-max-retries", "0", check=False)
    assert failed.returncode == 2 and "cannot reach the API at http://***@" in failed.stderr
    for result in (trained, failed):
        assert "secret" not in result.stdout + result.stderr
    for path in [*out.rglob("*"), *(tmp_path / "gen").rglob("*")]:
        if path.is_file():
            assert b"secret" not in path.read_bytes(), path


def test_query_in_the_api_url_is_sent_as_a_query(tiny, tmp_path):
    """Azure-style endpoints need ?api-version=...: it must reach the server as a query, not be
    glued into the path by the client."""
    with FakeTeacherServer(fail_every=0) as server:
        server.url += "?api-version=2024-06-01"
        run_with_key(*api_args(tiny, server, tmp_path / "out", "--max-samples", "3",
                               "--generate-only"))
    assert server.paths and all(p == "/v1/chat/completions?api-version=2024-06-01"
                                for p in server.paths), server.paths[:3]


def test_urls_inside_error_text_are_redacted():
    from common.api_client import redact_url, redact_urls_in

    text = ("Connection error: https://u:pw@host/v1/?key=secret1&v=2 and "
            "'http://x:secret2@h:8/v1/chat/completions?api-key=secret3'")
    redacted = redact_urls_in(text)
    assert not any(f"secret{k}" in redacted for k in (1, 2, 3)) and "pw" not in redacted
    assert "https://***@host/v1/?key=***&v=***" in redacted
    assert redact_url("http://[::1/v1?key=secret") == "<the --teacher-api-base URL>"


# --- reading a completions file ------------------------------------------------------------------

def reply_row(question, answer, **extra):
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}], **extra}


def test_completions_file_accepts_what_the_dataset_loader_accepts(tmp_path):
    from common.data import row_to_messages
    from sequence_level import completion_id, completion_rows, read_cache

    odd_rows = [
        reply_row("q1", "a1", id="id-1", finish_reason="stop"),
        {"prompt": "q2", "response": "a2"},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "q3"}]},
                      {"role": "assistant", "content": "a3"}]},
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]},
        reply_row("q5", None),
        reply_row("q6", ""),  # an empty reply is not a finished completion
        {"prompt": "q7"},  # no reply at all
        [1, 2],
        reply_row("q9", "line\u2028separator\x85and next line"),
    ]
    lines = [json.dumps(row, ensure_ascii=False).encode() for row in odd_rows]
    path = tmp_path / "teacher.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + lines[0] + b"\r\n" + b"\n".join(lines[1:]) + b"\n\n")
    expected = []
    for row in odd_rows:
        messages, _ = row_to_messages(row)
        if messages and messages[-1]["role"] == "assistant" and messages[-1]["content"].strip():
            expected.append(messages)
    assert len(expected) >= 3  # a1, a2, a9, and a3 where the loader reads lists of parts
    logged = []
    rows, truncated = completion_rows(path, drop_truncated=False, log=logged.append)
    assert [row["messages"] for row in rows] == expected and truncated == 0
    skipped = len(odd_rows) - len(expected)
    assert logged == [f"warning: {path}: skipped {skipped} of {len(odd_rows)} rows: "
                      + logged[0].split(" rows: ", 1)[1]]
    ids = read_cache(path, log=lambda _: None)
    assert "id-1" in ids and completion_id([{"role": "user", "content": "q2"}], 0) in ids
    assert len(ids) == len(expected)


@pytest.mark.parametrize("bad_line, expected", [
    (b'{"messages": [', "line 2 is not valid JSON"),
    (b'{"messages": "\xff\xfe"}', "line 2 is not valid UTF-8"),
])
def test_bad_line_in_a_completions_file_is_a_one_line_error(tmp_path, bad_line, expected):
    from common.errors import UserError
    from sequence_level import completion_rows, read_cache

    good = json.dumps(reply_row("q", "a")).encode()
    path = tmp_path / "teacher.jsonl"
    path.write_bytes(good + b"\n" + bad_line + b"\n" + good + b"\n")
    before = path.read_bytes()
    for read in (read_cache, lambda p: completion_rows(p, drop_truncated=False)):
        with pytest.raises(UserError) as error:
            read(path)
        assert str(error.value).startswith(f"{path}: {expected}") and "\n" not in str(error.value)
    assert path.read_bytes() == before


def test_a_last_line_cut_by_a_kill_is_skipped_and_counted(tmp_path):
    from sequence_level import CacheWriter, completion_rows, read_cache

    good = json.dumps(reply_row("q", "a", id="a")).encode()
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(good + b"\n" + json.dumps(reply_row("r", "b", id="b")).encode()[:25])
    logged = []
    rows, _ = completion_rows(cut, drop_truncated=False, log=logged.append)
    assert len(rows) == 1 and len(logged) == 1 and "last line was cut short" in logged[0]
    assert read_cache(cut, log=lambda _: None) == {"a"}
    assert cut.read_bytes() == good + b"\n"  # removed, so that the next row starts a line

    # A complete last line without its newline (a hand-made file) is a row, and kept.
    whole = tmp_path / "whole.jsonl"
    whole.write_bytes(good + b"\n" + json.dumps(reply_row("r", "b", id="b")).encode())
    assert read_cache(whole, log=pytest.fail) == {"a", "b"}
    writer = CacheWriter(whole, "teacher", {})
    writer.write("c", [{"role": "user", "content": "s"}], 0, "c", "stop")
    writer.close()
    assert read_cache(whole, log=pytest.fail) == {"a", "b", "c"}


def test_bad_completions_file_in_a_training_run_is_a_one_line_error(tiny, tmp_path):
    completions = tmp_path / "teacher.jsonl"
    completions.write_text(json.dumps(reply_row("q", "a")) + "\n{not json\n")
    result = run_script("sequence_level.py", "--student", tiny / "student", "--completions",
                        completions, "--output-dir", tmp_path / "out", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {completions}: line 2 is not valid JSON " \
                                    f"(Expecting property name enclosed in double quotes); fix " \
                                    f"or delete that line"


def test_a_reply_with_a_lone_surrogate_is_written_as_valid_utf8(tmp_path):
    from sequence_level import CacheWriter

    path = tmp_path / "cache.jsonl"
    writer = CacheWriter(path, "teacher", {})
    writer.write("k", [{"role": "user", "content": "q"}], 0, "half a pair: \ud800", "stop")
    writer.close()
    row = json.loads(path.read_bytes().decode("utf-8"))
    assert row["messages"][-1]["content"] == "half a pair: \ud800"


def test_an_unwritable_completions_path_is_a_one_line_error(tmp_path):
    from common.errors import UserError
    from sequence_level import CacheWriter

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt is a file, not a folder"):
        CacheWriter(tmp_path / "notes.txt" / "cache.jsonl", "teacher", {})
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_folder_as_completions_cache_is_a_one_line_error(tiny, tmp_path):
    result = run_script("sequence_level.py", "--teacher-api-base", "http://127.0.0.1:9/v1",
                        "--teacher-api-model", "teacher-x", "--dataset", tiny / "train.jsonl",
                        "--completions", tmp_path, "--output-dir", tmp_path / "out",
                        "--generate-only", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: the completions cache {tmp_path} is not a file; " \
                                    f"pass a JSON Lines file to --completions"
