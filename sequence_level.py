"""Sequence-level knowledge distillation: the teacher writes completions, the student is fine-tuned
on them with next-token cross-entropy on the assistant tokens (Kim & Rush 2016; how the
DeepSeek-R1-Distill models were made). Works with any teacher, including one behind an API.

Two phases, each usable alone:
  1. generate: every prompt (the conversation up to its last assistant turn) gets a teacher
     completion, appended at once to OUTPUT_DIR/teacher_completions.jsonl (or --completions FILE).
     A rerun skips prompts already there, so a killed run never asks the teacher twice.
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

import dataclasses
import hashlib
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from common.args import DataArguments, ModelArguments, TrainingArguments, parse_args
from common.errors import UserError, run_cli

COMPLETIONS_FILE = "teacher_completions.jsonl"


@dataclass
class SequenceLevelArguments:
    teacher_api_base: Optional[str] = field(default=None, metadata={
        "help": "Base URL of an OpenAI-compatible chat-completions API (e.g. "
                "http://localhost:8000/v1); used instead of a local --teacher. Logs and saved "
                "configs show it with user:password@ and query values as ***."})
    teacher_api_model: Optional[str] = field(default=None, metadata={
        "help": "Model name to request from --teacher-api-base."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "Environment variable holding the API key (never logged or written to disk)."})
    api_concurrency: int = field(default=8, metadata={"help": "Requests in flight at once."})
    api_timeout: float = field(default=120.0, metadata={"help": "Seconds per API request."})
    api_max_retries: int = field(default=6, metadata={
        "help": "Retries per request on 429 / 5xx / connection errors, with exponential backoff."})
    max_new_tokens: int = field(default=512, metadata={"help": "Longest teacher completion."})
    temperature: float = field(default=0.0, metadata={
        "help": "Teacher sampling temperature (0 = greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    num_completions_per_prompt: int = field(default=1, metadata={
        "help": "Completions per prompt (> 1 needs --temperature > 0)."})
    generation_batch_size: int = field(default=8, metadata={
        "help": "Prompts per batch for a local teacher."})
    completions: Optional[str] = field(default=None, metadata={
        "help": "Completions cache (JSON Lines) to fill and/or train from "
                "(default: OUTPUT_DIR/teacher_completions.jsonl)."})
    generate_only: bool = field(default=False, metadata={
        "help": "Stop after the generation phase."})
    drop_truncated: bool = field(default=False, metadata={
        "help": "Leave out of training the completions cut off by --max-new-tokens (kept by "
                "default; they teach the student to end its turn where the cut fell)."})
    loss_chunk_size: int = field(default=0, metadata={
        "help": "Supervised positions per chunk of the memory-bounded cross-entropy: the output "
                "layer runs on this many positions at a time (recomputed in backward). 0 = "
                "automatic, ~128 MiB of float32 logits per chunk; -1 = full logits."})

    def __post_init__(self):
        if (self.teacher_api_base is None) != (self.teacher_api_model is None):
            raise UserError("--teacher-api-base and --teacher-api-model go together; pass both")
        checks = [
            (self.api_concurrency >= 1, f"--api-concurrency must be >= 1, got {self.api_concurrency}"),
            (self.api_timeout > 0, f"--api-timeout must be > 0, got {self.api_timeout}"),
            (self.api_max_retries >= 0, f"--api-max-retries must be >= 0, got {self.api_max_retries}"),
            (self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"),
            (math.isfinite(self.temperature) and self.temperature >= 0,
             f"--temperature must be >= 0 and finite (0 = greedy), got {self.temperature}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}"),
            (self.num_completions_per_prompt >= 1, "--num-completions-per-prompt must be >= 1"),
            (self.num_completions_per_prompt == 1 or self.temperature > 0,
             "--num-completions-per-prompt > 1 needs --temperature > 0 (greedy decoding gives "
             "the same completion every time)"),
            (self.generation_batch_size >= 1, "--generation-batch-size must be >= 1"),
            (self.loss_chunk_size >= -1, f"--loss-chunk-size must be >= 1, 0 (automatic) or -1 "
                                         f"(full logits), got {self.loss_chunk_size}"),
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
            f"distinct prompt once (use --num-completions-per-prompt N with --temperature > 0 "
            f"for several completions per prompt)")
    if not jobs:
        raise UserError(f"no usable prompt in {data_args.dataset}; rows need a user turn")
    return jobs


def read_cache(path, log=print):
    """ids already in the cache. A last line cut short by a kill is removed from the file."""
    path = Path(path)
    if not path.is_file():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        log(f"warning: {path}: removed an incomplete last line (a run was killed mid-write)")
        data = data[:cut]
    ids = set()
    for line_number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        try:
            ids.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}: line {line_number} is not a completion row; fix or delete "
                            f"that line (the other rows are kept)") from None
    return ids


class CacheWriter:
    """Appends one finished completion per line, flushed at once (a kill loses nothing written)."""

    def __init__(self, path, teacher_name, settings):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")
        self.teacher_name = teacher_name
        self.settings = settings
        self.finish_reasons = Counter()

    def write(self, key, prompt, sample_index, text, finish_reason):
        row = {"id": key, "messages": prompt + [{"role": "assistant", "content": text}],
               "teacher": self.teacher_name, "finish_reason": finish_reason,
               "sample_index": sample_index, "generation": self.settings}
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()
        self.finish_reasons[finish_reason] += 1

    def close(self):
        self.file.close()


# --- generation: local teacher --------------------------------------------------------------------

def generate_local(model_args, data_args, seq_args, jobs, writer, device):
    from tqdm.auto import tqdm

    from common.chat import ChatEncoder, SkipRow, ensure_chat_template, render
    from common.generation import generate
    from common.models import freeze, load_model, load_tokenizer

    tokenizer = ensure_chat_template(load_tokenizer(model_args.teacher,
                                                    model_args.trust_remote_code, "teacher"))
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
    for start in range(0, len(encoded), chunk):
        batch = encoded[start:start + chunk]
        completions = generate(teacher, tokenizer, [job[3] for job in batch],
                               seq_args.max_new_tokens, stop_ids, seq_args.temperature,
                               seq_args.top_p, batch_size=chunk, progress=False)
        for (key, prompt, sample_index, _), completion in zip(batch, completions):
            text = tokenizer.decode(completion.token_ids, skip_special_tokens=True).strip()
            writer.write(key, prompt, sample_index, text, completion.finish_reason)
            new_tokens += completion.num_generated
        progress.update(len(batch))
        progress.set_postfix(tok_per_s=f"{new_tokens / max(progress.format_dict['elapsed'], 1e-9):.0f}")
    progress.close()


# --- generation: OpenAI-compatible API ------------------------------------------------------------

def redact_url(url):
    """`url` fit for logs and saved configs: user:password@ and every query value become ***.

    The request itself uses the URL as given; only what is printed or written is redacted.
    """
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:  # malformed (e.g. an unclosed IPv6 bracket): show nothing of it
        return "<the --teacher-api-base URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(f"{name}=***" if sep else "***"
                     for name, sep, _ in (item.partition("=")
                                          for item in parts.query.split("&") if item))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_urls_in(text):
    """Any user:password@ and query value of any URL in `text` (an exception's message may show
    the client's own normalised form of the URL, or a request URL) becomes ***."""
    import re

    text = re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)
    return re.sub(r"([?&][^=&\s/]+=)[^&\s'\"]+", r"\1***", text)


def split_query(url):
    """(URL without its query, {name: value}): the openai client appends paths to base_url, so a
    query left in it would end up inside the path; it is sent as default_query instead."""
    from urllib.parse import parse_qsl, urlsplit, urlunsplit

    parts = urlsplit(url)
    return (urlunsplit((parts.scheme, parts.netloc, parts.path, "", parts.fragment)),
            dict(parse_qsl(parts.query)))


def _api_error(exc, seq_args):
    import openai

    api_base = redact_url(seq_args.teacher_api_base)
    where = f"{api_base} (model {seq_args.teacher_api_model})"
    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return UserError(f"the API at {where} rejected the key ({exc.status_code}); put a valid "
                         f"key in ${seq_args.api_key_env}")
    if isinstance(exc, openai.NotFoundError):
        return UserError(f"the API at {where} answered 404: check --teacher-api-base (it usually "
                         f"ends in /v1) and --teacher-api-model")
    if isinstance(exc, openai.APIConnectionError):
        return UserError(f"cannot reach the API at {api_base} after "
                         f"{seq_args.api_max_retries} retries; check the URL and that the server "
                         f"is up")
    if isinstance(exc, openai.APIStatusError):
        return UserError(f"the API at {where} kept failing ({exc.status_code}) after "
                         f"{seq_args.api_max_retries} retries; rerun later to continue")
    detail = redact_urls_in(str(exc).replace(seq_args.teacher_api_base, api_base))
    return UserError(f"the API at {where} failed: {type(exc).__name__}: {detail}")


def generate_api(seq_args, jobs, writer):
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    import openai
    from tqdm.auto import tqdm

    api_key = os.environ.get(seq_args.api_key_env)
    if not api_key:
        print(f"warning: ${seq_args.api_key_env} is not set; sending requests without a key")
    base_url, query = split_query(seq_args.teacher_api_base)  # e.g. Azure's ?api-version=...
    client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", default_query=query,
                           max_retries=seq_args.api_max_retries, timeout=seq_args.api_timeout)

    def ask(job):
        _, prompt, sample_index = job
        response = client.chat.completions.create(
            model=seq_args.teacher_api_model, messages=prompt,
            max_tokens=seq_args.max_new_tokens, temperature=seq_args.temperature,
            top_p=seq_args.top_p)
        choice = response.choices[0]
        return choice.message.content or "", choice.finish_reason or "stop"

    progress = tqdm(total=len(jobs), desc="teacher API", unit="prompt")
    with ThreadPoolExecutor(max_workers=seq_args.api_concurrency) as pool:
        pending = {pool.submit(ask, job): job for job in jobs}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    job = pending.pop(future)
                    error = future.exception()
                    if error is not None:
                        raise _api_error(error, seq_args) from None
                    text, finish_reason = future.result()
                    writer.write(job[0], job[1], job[2], text.strip(), finish_reason)
                    progress.update(1)
        finally:
            for future in pending:
                future.cancel()
            progress.close()


def run_generation(model_args, data_args, seq_args, cache_path, device):
    jobs = load_prompts(data_args, seq_args.num_completions_per_prompt)
    done = read_cache(cache_path)
    todo = [job for job in jobs if job[0] not in done]
    print(f"{len(jobs)} prompts x samples: {len(jobs) - len(todo)} already in {cache_path}, "
          f"{len(todo)} to generate")
    if not todo:
        return
    teacher_name = seq_args.teacher_api_model or model_args.teacher
    settings = {"max_new_tokens": seq_args.max_new_tokens, "temperature": seq_args.temperature,
                "top_p": seq_args.top_p}
    writer = CacheWriter(cache_path, teacher_name, settings)
    try:
        if seq_args.teacher_api_base:
            generate_api(seq_args, todo, writer)
        else:
            generate_local(model_args, data_args, seq_args, todo, writer, device)
    finally:
        writer.close()
    if writer.finish_reasons["length"]:
        print(f"note: {writer.finish_reasons['length']} of {len(todo)} completions hit "
              f"--max-new-tokens (--drop-truncated leaves them out of training)")


# --- training ------------------------------------------------------------------------------------

def completion_rows(cache_path, drop_truncated):
    """Rows of the cache to train on, and how many truncated ones were left out."""
    rows, truncated = [], 0
    for line in Path(cache_path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("finish_reason") == "length" and drop_truncated:
            truncated += 1
            continue
        rows.append(row)
    return rows, truncated


def encode_rows(rows, encoder, log=print):
    """Encode cache rows for SFT; a few unusable ones are skipped and counted."""
    from common.data import describe_skips

    examples, skipped = encoder.encode_all([row["messages"] for row in rows])
    if skipped:
        log(f"warning: {describe_skips(skipped, len(rows))}")
    if not examples:
        raise UserError("no usable completion to train on; raise --max-new-tokens or "
                        "--max-length, or leave out --drop-truncated")
    return examples


def main(argv=None):
    from accelerate.utils import set_seed

    from common.args import eval_data_args
    from common.chat import ChatEncoder, encode_dataset, ensure_chat_template
    from common.distill import make_ce_loss_fn
    from common.checkpoint import (check_output_dir, finish_run, make_run_config,
                                   prepare_output_dir)
    from common.models import check_vocab_fits, load_model, load_tokenizer, real_vocab_size
    from common.sharding import unsharded_loading
    from common.train import make_accelerator, train

    model_args, data_args, train_args, seq_args = parse_args(
        (ModelArguments, DataArguments, TrainingArguments, SequenceLevelArguments), argv,
        description=__doc__.split("\n\n")[0])
    if not data_args.dataset and not seq_args.completions:
        raise UserError("--dataset is required (or --completions with a filled cache)")
    if not seq_args.generate_only and not model_args.student:
        raise UserError("--student is required unless --generate-only is given")
    if model_args.teacher and seq_args.teacher_api_base:
        raise UserError("pass either --teacher (a local model) or --teacher-api-base, not both")
    output_dir = Path(train_args.output_dir)
    cache_path = Path(seq_args.completions) if seq_args.completions else output_dir / COMPLETIONS_FILE
    if not seq_args.generate_only:
        check_output_dir(output_dir, train_args.resume, train_args.overwrite)
    student_tokenizer = None
    if model_args.student:  # load early: a bad student path should fail before any generation
        student_tokenizer = ensure_chat_template(load_tokenizer(
            model_args.student, model_args.trust_remote_code, "student"))

    accelerator = make_accelerator(train_args)
    set_seed(train_args.seed)
    if data_args.dataset and (model_args.teacher or seq_args.teacher_api_base):
        if accelerator.is_main_process:  # one process asks the teacher; the others wait
            with unsharded_loading(accelerator):  # ZeRO-3 init would wait for the others
                run_generation(model_args, data_args, seq_args, cache_path, accelerator.device)
        accelerator.wait_for_everyone()
    elif not cache_path.is_file():
        raise UserError(f"no teacher given (--teacher or --teacher-api-base) and no completions "
                        f"cache at {cache_path}; pass a teacher or --completions FILE")
    if seq_args.generate_only:
        accelerator.print(f"completions in {cache_path}")
        return

    rows, truncated = completion_rows(cache_path, seq_args.drop_truncated)
    if truncated:
        accelerator.print(f"--drop-truncated: left out {truncated} completions cut by "
                          f"--max-new-tokens")
    # Only the last turn is the teacher's; earlier assistant turns came with the dataset.
    encoder = ChatEncoder(student_tokenizer, data_args.max_length, supervise="last")
    examples = encode_rows(rows, encoder, accelerator.print)
    eval_examples = None
    if train_args.eval_dataset:  # held-out conversations with their own (reference) replies
        with accelerator.main_process_first():
            eval_examples = encode_dataset(eval_data_args(data_args, train_args), encoder,
                                           log=accelerator.print)
    student = load_model(model_args.student, model_args.student_dtype,
                         model_args.trust_remote_code, "student")
    check_vocab_fits(student, student_tokenizer, "student")
    if train_args.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    prepare_output_dir(accelerator, output_dir, train_args.overwrite, keep=(COMPLETIONS_FILE,))
    # run_config is saved in every checkpoint and the output: no credentials from the API URL.
    command, logged_seq_args = " ".join(sys.argv), seq_args
    if seq_args.teacher_api_base:
        api_base = redact_url(seq_args.teacher_api_base)
        command = command.replace(seq_args.teacher_api_base, api_base)
        logged_seq_args = dataclasses.replace(seq_args, teacher_api_base=api_base)
    run_config = {**make_run_config("sequence_level", command, model=model_args, data=data_args,
                                    training=train_args, sequence_level=logged_seq_args),
                  "completions": str(cache_path)}
    loss_fn = make_ce_loss_fn(accelerator, real_vocab_size(student_tokenizer),
                              seq_args.loss_chunk_size)
    student, state = train(accelerator, student, examples, train_args, loss_fn,
                           student_tokenizer.pad_token_id, run_config, eval_examples=eval_examples)
    finish_run(accelerator, student, student_tokenizer, output_dir, run_config, state,
               end_of_turn_id=encoder.end_of_turn_token_id)


if __name__ == "__main__":
    run_cli(main)
