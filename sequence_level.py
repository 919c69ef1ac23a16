"""Sequence-level knowledge distillation: the teacher writes completions, the student is fine-tuned
on them with next-token cross-entropy on the assistant tokens (Kim & Rush 2016; how the
DeepSeek-R1-Distill models were made). Works with any teacher, including one behind an API.

Two phases, each usable alone:
  1. generate: every prompt (the conversation up to its last assistant turn) gets a teacher
     completion, appended at once to OUTPUT_DIR/teacher_completions.jsonl (or --completions FILE).
     A rerun skips prompts already there, so a killed run never asks the teacher twice; Ctrl-C
     or SIGTERM stops at once and keeps every finished row. An empty reply is not kept: a rerun
     asks for it again.
  2. train: supervised fine-tuning of the student on those completions (the shared loop).

Examples:
    # local teacher
    python sequence_level.py --teacher Qwen/Qwen2.5-7B-Instruct --student Qwen/Qwen2.5-0.5B \
        --dataset prompts.jsonl --output-dir runs/seqkd --max-new-tokens 512 --num-epochs 2

    # any OpenAI-compatible server (vLLM, SGLang, TGI, hosted); the key comes from $OPENAI_API_KEY
    python sequence_level.py --teacher-api-base http://localhost:8000/v1 \
        --teacher-api-model meta-llama/Llama-3.1-70B-Instruct --student Qwen/Qwen2.5-0.5B \
        --dataset prompts.jsonl --output-dir runs/seqkd --api-concurrency 32

    # one teacher pass, many students
    python sequence_level.py --teacher-api-base ... --teacher-api-model ... --dataset prompts.jsonl \
        --completions teacher.jsonl --generate-only --output-dir runs/gen
    accelerate launch sequence_level.py --student S --completions teacher.jsonl \
        --dataset prompts.jsonl --output-dir runs/s1

    # offline, tiny local models (examples/tiny_setup.py)
    python sequence_level.py --teacher runs/tiny/teacher --student runs/tiny/student \
        --dataset runs/tiny/train.jsonl --max-new-tokens 12 --max-steps 4 --output-dir runs/tiny/seq
"""

import hashlib
import json
import math
import os
import signal
import sys
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from common.api_client import (TeacherApiArguments, api_error, make_client, redacted_args,
                               redacted_command)
from common.args import (DataArguments, ModelArguments, TrainingArguments, parse_args,
                         shared_checks, shared_field)
from common.lora import LoraArguments, load_trainable_student
from common.errors import UserError, run_cli

COMPLETIONS_FILE = "teacher_completions.jsonl"


@dataclass
class SequenceLevelArguments(TeacherApiArguments):
    RENAMED_FLAGS = {"temperature": "sampling_temperature"}  # old spelling, hidden, one release
    # The API options (--teacher-api-base, --api-key-env, ...) come first, from common/api_client.
    max_new_tokens: int = shared_field("max_new_tokens", default=512)
    sampling_temperature: float = shared_field("sampling_temperature", default=0.0)
    top_p: float = shared_field("top_p", default=1.0)
    num_completions_per_prompt: int = field(default=1, metadata={
        "help": "Completions per prompt (> 1 needs --sampling-temperature > 0)."})
    generation_batch_size: int = field(default=8, metadata={
        "help": "Prompts per batch for a local teacher."})
    completions: Optional[str] = shared_field("completions", default=None)
    generate_only: bool = field(default=False, metadata={
        "help": "Stop after the generation phase."})
    drop_truncated: bool = field(default=False, metadata={
        "help": "Leave out of training the completions cut off by --max-new-tokens (kept by "
                "default; they teach the student to end its turn where the cut fell)."})
    loss_chunk_size: int = shared_field("loss_chunk_size", default=0)

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"),
            (math.isfinite(self.sampling_temperature) and self.sampling_temperature >= 0,
             f"--sampling-temperature must be >= 0 and finite (0 = greedy), got "
             f"{self.sampling_temperature}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}"),
            (self.num_completions_per_prompt >= 1, "--num-completions-per-prompt must be >= 1"),
            (self.num_completions_per_prompt == 1 or self.sampling_temperature > 0,
             "--num-completions-per-prompt > 1 needs --sampling-temperature > 0 (greedy "
             "decoding gives the same completion every time)"),
            (self.generation_batch_size >= 1, "--generation-batch-size must be >= 1"),
            *shared_checks(self),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


# --- prompts and the cache ---------------------------------------------------------------------

def prompt_of(messages):
    """The conversation up to (not including) its last assistant turn; None if nothing to answer."""
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"),
                         default=None)
    prompt = messages[:last_assistant] if last_assistant is not None else messages
    if not prompt or prompt[-1]["role"] not in ("user", "tool"):
        return None
    return prompt


def completion_id(prompt, sample_index):
    """Stable id of (prompt messages, sample index): the cache key."""
    payload = json.dumps({"messages": prompt, "sample": sample_index}, sort_keys=True,
                         ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def load_prompts(data_args, num_samples, log=print):
    """[(id, prompt messages, sample index)] in dataset order, duplicates removed."""
    from common.data import describe_skips, load_conversations

    conversations, skipped = load_conversations(data_args, require_reply=False)
    jobs, seen, repeated_rows = [], set(), 0
    for messages in conversations:
        prompt = prompt_of(messages)
        if prompt is None:
            skipped["no user turn to answer"] += 1
            continue
        if completion_id(prompt, 0) in seen:  # all of its samples are already listed
            repeated_rows += 1
            continue
        for sample_index in range(num_samples):
            key = completion_id(prompt, sample_index)
            seen.add(key)
            jobs.append((key, prompt, sample_index))
    if skipped:
        log(f"warning: {describe_skips(skipped, len(conversations) + sum(skipped.values()))}")
    if repeated_rows:
        # The cache key is (prompt, sample index), so a repeated row would get the same answer.
        log(f"warning: {repeated_rows} rows repeat an earlier prompt; the teacher answers each "
            f"distinct prompt once (use --num-completions-per-prompt N with "
            f"--sampling-temperature > 0 for several completions per prompt)")
    if not jobs:
        raise UserError(f"no usable prompt in {data_args.dataset}; rows need a user turn")
    return jobs


def parse_completions_file(path):
    """([(line number, row as read)], whether the last line was cut short by a kill).

    Lines are split on newlines only (a completion may hold U+2028 or U+0085, which str.splitlines
    would split on); a UTF-8 BOM and blank lines are ignored. A last line without its newline that
    is not whole JSON (or UTF-8) is what a kill mid-write leaves: it is left out and reported. Any
    other line that is not JSON or not UTF-8 is a UserError naming it.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the completions file {path} "
                        f"({exc.strerror or exc})") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    unterminated = lines.pop()  # b"" when the file ends with a newline
    rows = []
    for line_number, line in enumerate(lines + [unterminated], start=1):
        is_cut_candidate = line_number == len(lines) + 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            if is_cut_candidate:
                return rows, True
            raise UserError(f"{path}: line {line_number} is not valid UTF-8 (byte "
                            f"{exc.start + 1}); save the file as UTF-8, or delete that "
                            f"line") from None
        if not text.strip():
            continue
        try:
            rows.append((line_number, json.loads(text)))
        except json.JSONDecodeError as exc:
            if is_cut_candidate:
                return rows, True
            raise UserError(f"{path}: line {line_number} is not valid JSON ({exc.msg}); fix or "
                            f"delete that line") from None
    return rows, False


def completion_of(row):
    """(cache id, messages, finish_reason) of one completions row, or (None, reason, None).

    A row is read as the dataset loader reads a row (`messages`, or `prompt`/`response`
    columns); it is a finished completion when its last turn is a non-empty assistant reply to a
    user (or tool) turn. Rows without an `id` (written by hand or by another tool) get the id the
    prompt would get here, so generation does not ask for them again.
    """
    from common.data import row_to_messages

    messages, reason = row_to_messages(row)
    if messages is None:
        return None, reason, None
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        return None, "no non-empty teacher reply", None
    prompt = prompt_of(messages)
    if prompt is None:
        return None, "no user turn before the reply", None
    key = row.get("id")
    if not isinstance(key, str):
        sample_index = row.get("sample_index", 0)
        key = completion_id(prompt, sample_index if isinstance(sample_index, int) else 0)
    return key, messages, row.get("finish_reason")


def load_completions(path, log=print, skipped_note=""):
    """[(id, messages, finish_reason)] of the finished completions in the file at `path`.

    Unusable rows are skipped and counted in one warning; returns (completions, cut) where `cut`
    says the last line was cut short by a kill (left out, and reported).
    """
    from common.data import describe_skips

    rows, cut = parse_completions_file(path)
    completions, skipped = [], Counter()
    for _, row in rows:
        key, messages_or_reason, finish_reason = completion_of(row)
        if key is None:
            skipped[messages_or_reason] += 1
        else:
            completions.append((key, messages_or_reason, finish_reason))
    if skipped:
        log(f"warning: {path}: {describe_skips(skipped, len(rows))}{skipped_note}")
    return completions, cut


def read_cache(path, log=print):
    """ids of the finished completions in the cache. A last line cut short by a kill is removed
    from the file, so that the next row starts on a line of its own."""
    path = Path(path)
    if not path.is_file():
        return set()
    completions, cut = load_completions(path, log, skipped_note="; their prompts are asked again")
    if cut:
        data = path.read_bytes()
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        log(f"warning: {path}: removed its last line, cut short (a run was killed while writing "
            f"it); that prompt is asked again")
    return {key for key, _, _ in completions}


class CacheWriter:
    """Appends one finished completion per line, flushed at once (a kill loses nothing written).

    An empty reply is not written (a rerun asks for it again) but counted by finish reason.
    """

    def __init__(self, path, teacher_name, settings):
        self.path = Path(path)
        self.file = None
        self.teacher_name = teacher_name
        self.settings = settings
        self.finish_reasons, self.empty = Counter(), Counter()
        self.written = 0
        if self.path.exists():
            self._open()
            return
        # Checked now, created at the first row: a teacher that fails to load, or an API that
        # never answers, leaves no empty cache (nor an output dir) behind.
        existing = next(p for p in (self.path.absolute(), *self.path.absolute().parents)
                        if p.exists())
        if not existing.is_dir():
            self._refuse(f"{existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            self._refuse(f"{existing} is read-only")

    def _refuse(self, why):
        raise UserError(f"cannot write the completions cache {self.path} ({why}); pass a "
                        f"writable --completions path or --output-dir")

    def _open(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # A hand-made file may end without a newline; the next row must start a line of its own.
            needs_newline = False
            if self.path.is_file() and self.path.stat().st_size > 0:
                with open(self.path, "rb") as existing:
                    existing.seek(-1, os.SEEK_END)
                    needs_newline = existing.read(1) != b"\n"
            self.file = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            blocker = next((p for p in self.path.parents if p.exists() and not p.is_dir()), None)
            self._refuse(f"{blocker} is a file, not a folder" if blocker else exc.strerror or exc)
        if needs_newline:
            self.file.write("\n")

    def write(self, key, prompt, sample_index, text, finish_reason):
        if not text.strip():
            self.empty[finish_reason] += 1
            return
        row = {"id": key, "messages": prompt + [{"role": "assistant", "content": text}],
               "teacher": self.teacher_name, "finish_reason": finish_reason,
               "sample_index": sample_index, "generation": self.settings}
        try:
            line = json.dumps(row, ensure_ascii=False)
            line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: \u escapes keep the file valid UTF-8
            line = json.dumps(row)
        if self.file is None:
            self._open()
        self.file.write(line + "\n")
        self.file.flush()
        self.finish_reasons[finish_reason] += 1
        self.written += 1

    def close(self):
        if self.file is not None:
            self.file.close()


def empty_replies_hint(empty):
    """Why teacher replies came back empty and what to do, from their finish reasons."""
    if empty["length"] == sum(empty.values()):
        return ("they hit --max-new-tokens before any visible text (a reasoning model thinks "
                "first); raise --max-new-tokens")
    reasons = ", ".join(f"{n} {reason}" for reason, n in empty.most_common())
    return (f"the teacher returned empty content (finish reasons: {reasons}); check that it is "
            f"a chat model and, for a reasoning model, that the server returns the answer in "
            f"`content`")


class GenerationStopped(KeyboardInterrupt):
    """SIGINT or SIGTERM during generation."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """Catches SIGINT and SIGTERM during generation; `signum` is the signal once one came.

    The handler runs between two bytecodes of the main thread, so it only sets an attribute (no
    lock); threads and polling loops read it. With raise_at_once it also raises GenerationStopped
    where the main thread is (a local teacher may be inside a long forward pass).
    """

    def __init__(self):
        self.signum = None

    @contextmanager
    def catching(self, raise_at_once):
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return

        def handler(signum, frame):
            self.signum = signum
            if raise_at_once:
                raise GenerationStopped(signum)

        previous = {number: signal.signal(number, handler)
                    for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for number, old_handler in previous.items():
                if old_handler is not None:  # None: set outside Python, cannot be restored
                    signal.signal(number, old_handler)


# --- generation: local teacher --------------------------------------------------------------------

def generate_local(model_args, data_args, seq_args, jobs, writer, device):
    from tqdm.auto import tqdm

    from common.chat import ChatEncoder, SkipRow, ensure_chat_template, render
    from common.generation import generate
    from common.models import freeze, load_model, load_tokenizer

    tokenizer = ensure_chat_template(load_tokenizer(model_args.teacher,
                                                    model_args.trust_remote_code, "teacher"),
                                     "teacher", model_args.chat_template)
    stop_ids = {ChatEncoder(tokenizer, data_args.max_length).end_of_turn_token_id,
                tokenizer.eos_token_id}
    encoded, too_long = [], 0
    for key, prompt, sample_index in jobs:
        try:
            text = render(tokenizer, prompt, add_generation_prompt=True)
        except SkipRow:
            too_long += 1
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > data_args.max_length:
            too_long += 1
            continue
        encoded.append((key, prompt, sample_index, ids))
    if too_long:
        print(f"warning: skipped {too_long} prompts longer than --max-length "
              f"{data_args.max_length} or refused by the chat template")
    teacher = freeze(load_model(model_args.teacher, model_args.dtype,
                                model_args.trust_remote_code, "teacher")).to(device)
    # Similar lengths together limit padding; each chunk is written as soon as it is done.
    encoded.sort(key=lambda job: len(job[3]))
    chunk = seq_args.generation_batch_size
    progress = tqdm(total=len(encoded), desc="teacher generating", unit="prompt")
    new_tokens = 0
    try:
        for start in range(0, len(encoded), chunk):
            batch = encoded[start:start + chunk]
            completions = generate(teacher, tokenizer, [job[3] for job in batch],
                                   seq_args.max_new_tokens, stop_ids, seq_args.sampling_temperature,
                                   seq_args.top_p, batch_size=chunk, progress=False)
            for (key, prompt, sample_index, _), completion in zip(batch, completions):
                text = tokenizer.decode(completion.token_ids, skip_special_tokens=True).strip()
                writer.write(key, prompt, sample_index, text, completion.finish_reason)
                new_tokens += completion.num_generated
            progress.update(len(batch))
            elapsed = max(progress.format_dict["elapsed"], 1e-9)
            progress.set_postfix(tok_per_s=f"{new_tokens / elapsed:.0f}")
    finally:
        progress.close()  # a message that follows starts on a line of its own


# --- generation: OpenAI-compatible API ------------------------------------------------------------

def generate_api(seq_args, jobs, writer, stop):
    """Ask the API for every job, `api_concurrency` requests at a time; each answer is written
    as soon as it comes. Stops (GenerationStopped) soon after `stop.signum` is set, without
    waiting for the requests in flight."""
    import queue

    from tqdm.auto import tqdm

    client = make_client(seq_args)

    def ask(prompt):
        response = client.chat.completions.create(
            model=seq_args.teacher_api_model, messages=prompt,
            max_tokens=seq_args.max_new_tokens, temperature=seq_args.sampling_temperature,
            top_p=seq_args.top_p)
        if not response.choices:
            return "", "no choices"
        choice = response.choices[0]
        return (choice.message.content or "").strip(), choice.finish_reason or "stop"

    answers = queue.SimpleQueue()  # (job, (text, finish_reason) or None, exception or None)
    unasked, take_lock, halt = iter(jobs), threading.Lock(), threading.Event()

    def work():
        while stop.signum is None and not halt.is_set():
            with take_lock:
                job = next(unasked, None)
            if job is None:
                return
            try:
                answers.put((job, ask(job[1]), None))
            except BaseException as exc:  # reported by the main thread, which waits for an
                answers.put((job, None, exc))  # answer to every job it handed out

    def next_answer():
        while True:
            if stop.signum is not None:  # write what has come in, then stop
                try:
                    return answers.get_nowait()
                except queue.Empty:
                    raise GenerationStopped(stop.signum) from None
            try:
                return answers.get(timeout=0.1)  # short: a stop request is seen at once
            except queue.Empty:
                pass

    # Daemon threads: a request in flight when the run ends must not hold the process until it
    # times out. Its prompt is not in the cache, so a rerun asks for it again.
    for _ in range(min(seq_args.api_concurrency, len(jobs))):
        threading.Thread(target=work, daemon=True).start()
    progress = tqdm(total=len(jobs), desc="teacher API", unit="prompt")
    try:
        for _ in range(len(jobs)):
            job, answer, error = next_answer()
            if error is not None:
                if stop.signum is not None:
                    continue  # stopping anyway: keep the answers that did come
                raise api_error(error, seq_args) from None
            writer.write(job[0], job[1], job[2], *answer)
            progress.update(1)
    finally:
        halt.set()
        progress.close()


def run_generation(model_args, data_args, seq_args, cache_path, device):
    """Fill the cache; returns the Counter of empty replies (not cached) by finish reason."""
    jobs = load_prompts(data_args, seq_args.num_completions_per_prompt)
    done = read_cache(cache_path)
    todo = [job for job in jobs if job[0] not in done]
    print(f"{len(jobs)} prompts x samples: {len(jobs) - len(todo)} already in {cache_path}, "
          f"{len(todo)} to generate")
    if not todo:
        return Counter()
    teacher_name = seq_args.teacher_api_model or model_args.teacher
    # "temperature": the key caches written before --sampling-temperature have.
    settings = {"max_new_tokens": seq_args.max_new_tokens,
                "temperature": seq_args.sampling_temperature, "top_p": seq_args.top_p}
    writer = CacheWriter(cache_path, teacher_name, settings)
    stop = StopRequest()
    try:
        # The API loop polls `stop` and writes the answers already in before it stops.
        with stop.catching(raise_at_once=not seq_args.teacher_api_base):
            if seq_args.teacher_api_base:
                generate_api(seq_args, todo, writer, stop)
            else:
                generate_local(model_args, data_args, seq_args, todo, writer, device)
            if stop.signum is not None:  # it came as the last answer was written
                raise GenerationStopped(stop.signum)
    except GenerationStopped as stopped:
        writer.close()
        kept = len(jobs) - len(todo) + writer.written
        print(f"stopped by {signal.Signals(stopped.signum).name}: {kept} of {len(jobs)} "
              f"completions are saved in {cache_path}; rerun the same command to generate the "
              f"other {len(jobs) - kept} (saved ones are not asked for again)", file=sys.stderr)
        sys.exit(128 + stopped.signum)
    finally:
        writer.close()
    if writer.empty:
        print(f"warning: {sum(writer.empty.values())} of {len(todo)} teacher replies were empty "
              f"and are not cached (a rerun asks for them again): "
              f"{empty_replies_hint(writer.empty)}")
    if writer.finish_reasons["length"]:
        print(f"note: {writer.finish_reasons['length']} of {len(todo)} completions hit "
              f"--max-new-tokens (--drop-truncated leaves them out of training)")
    return writer.empty


# --- training ------------------------------------------------------------------------------------

def completion_rows(cache_path, drop_truncated, log=print):
    """Finished completions of the cache to train on ({"id", "messages", "finish_reason"}), and
    how many truncated ones --drop-truncated left out."""
    completions, cut = load_completions(cache_path, log)
    if cut:
        log(f"warning: {cache_path}: its last line was cut short (a run was killed while writing "
            f"it) and is left out")
    rows, truncated = [], 0
    for key, messages, finish_reason in completions:
        if finish_reason == "length" and drop_truncated:
            truncated += 1
            continue
        rows.append({"id": key, "messages": messages, "finish_reason": finish_reason})
    return rows, truncated


def encode_rows(rows, encoder, cache_path, truncated=0, empty=None, log=print):
    """Encode cache rows for SFT; a few unusable ones are skipped and counted. With none left,
    the error names the causes it knows of, each with its own fix."""
    from common.data import describe_skips

    examples, skipped = encoder.encode_all([row["messages"] for row in rows])
    if skipped:
        log(f"warning: {describe_skips(skipped, len(rows))}")
    if examples:
        return examples
    causes = []
    if empty:
        causes.append(f"{sum(empty.values())} teacher replies were empty and are not cached (a "
                      f"rerun asks for them again): {empty_replies_hint(empty)}")
    if truncated:
        causes.append(f"--drop-truncated left out {truncated} completions cut by "
                      f"--max-new-tokens: raise --max-new-tokens or leave out --drop-truncated")
    if skipped["too long for --max-length"]:
        causes.append(f"{skipped['too long for --max-length']} completions are too long for "
                      f"--max-length {encoder.max_length}: raise --max-length")
    other = Counter({reason: n for reason, n in skipped.items()
                     if reason != "too long for --max-length"})
    if other:
        causes.append(describe_skips(other, len(rows)))
    if not causes:
        causes.append("it holds no finished completion; pass a teacher (--teacher or "
                      "--teacher-api-base) to generate them")
    raise UserError(f"no completion to train on in {cache_path}: {'; '.join(causes)}")


# What the command line parses into, in main's order (tests/test_flags.py builds every
# script's parser from these).
ARGUMENT_GROUPS = (ModelArguments, DataArguments, TrainingArguments, SequenceLevelArguments,
                   LoraArguments)


def main(argv=None):
    from accelerate.utils import set_seed

    from common.args import eval_data_args, teacher_is_served
    from common.chat import ChatEncoder, encode_dataset, ensure_chat_template
    from common.distill import make_ce_loss_fn
    from common.checkpoint import (check_output_dir, finish_run, make_run_config,
                                   prepare_output_dir)
    from common.models import load_tokenizer, real_vocab_size
    from common.sharding import unsharded_loading
    from common.train import Method, make_accelerator, train

    model_args, data_args, train_args, seq_args, lora_args = parse_args(
        ARGUMENT_GROUPS, argv, description=__doc__.split("\n\n")[0])
    if not data_args.dataset and not seq_args.completions:
        raise UserError("--dataset is required (or --completions with a filled cache)")
    if not seq_args.generate_only and not model_args.student:
        raise UserError("--student is required unless --generate-only is given")
    teacher_is_served(model_args, seq_args)  # refuses a local teacher and a served one at once
    output_dir = Path(train_args.output_dir)
    cache_path = Path(seq_args.completions) if seq_args.completions else output_dir / COMPLETIONS_FILE
    if cache_path.exists() and not cache_path.is_file():
        raise UserError(f"the completions cache {cache_path} is not a file; pass a JSON Lines "
                        f"file to --completions")
    if not seq_args.generate_only:
        check_output_dir(output_dir, train_args.resume, train_args.overwrite)
    student_tokenizer = None
    if model_args.student:  # load early: a bad student path should fail before any generation
        student_tokenizer = ensure_chat_template(load_tokenizer(
            model_args.student, model_args.trust_remote_code, "student"), "student",
            model_args.chat_template)

    accelerator = make_accelerator(train_args)
    set_seed(train_args.seed)
    empty_replies = Counter()  # known on the main process only; it sees the teacher
    if data_args.dataset and (model_args.teacher or seq_args.teacher_api_base):
        if accelerator.is_main_process:  # one process asks the teacher; the others wait
            with unsharded_loading(accelerator):  # ZeRO-3 init would wait for the others
                empty_replies = run_generation(model_args, data_args, seq_args, cache_path,
                                               accelerator.device)
        accelerator.wait_for_everyone()
    elif not cache_path.is_file():
        raise UserError(f"no teacher given (--teacher or --teacher-api-base) and no completions "
                        f"cache at {cache_path}; pass a teacher or --completions FILE")
    if seq_args.generate_only:
        accelerator.print(f"completions in {cache_path}")
        return

    # No file after generation: every reply was empty (not cached); encode_rows says so.
    rows, truncated = (completion_rows(cache_path, seq_args.drop_truncated, accelerator.print)
                       if cache_path.exists() else ([], 0))
    if truncated:
        accelerator.print(f"--drop-truncated: left out {truncated} completions cut by "
                          f"--max-new-tokens")
    # Only the last turn is the teacher's; earlier assistant turns came with the dataset.
    encoder = ChatEncoder(student_tokenizer, data_args.max_length, supervise="last")
    examples = encode_rows(rows, encoder, cache_path, truncated, empty_replies,
                           accelerator.print)
    eval_examples = None
    if train_args.eval_dataset:  # held-out conversations with their own (reference) replies
        with accelerator.main_process_first():
            eval_examples = encode_dataset(eval_data_args(data_args, train_args), encoder,
                                           log=accelerator.print)
    student = load_trainable_student(accelerator, model_args, train_args, lora_args,
                                     student_tokenizer)
    prepare_output_dir(accelerator, output_dir, train_args.overwrite, keep=(COMPLETIONS_FILE,))
    # run_config is saved in every checkpoint and the output: no credentials from the API URL.
    run_config = {**make_run_config("sequence_level", redacted_command(sys.argv, seq_args),
                                    model=model_args, data=data_args, training=train_args,
                                    sequence_level=redacted_args(seq_args),
                                    lora=lora_args),
                  "completions": str(cache_path)}
    loss_fn = make_ce_loss_fn(accelerator, real_vocab_size(student_tokenizer),
                              seq_args.loss_chunk_size)
    student, state = train(accelerator, student, examples, train_args, Method(loss_fn),
                           student_tokenizer.pad_token_id, run_config, eval_examples=eval_examples)
    finish_run(accelerator, student, student_tokenizer, output_dir, run_config, state,
               end_of_turn_id=encoder.end_of_turn_token_id)


if __name__ == "__main__":
    run_cli(main)
