"""Loading datasets from a local file or the Hub and normalizing every row to a `messages` list.

A row becomes `[{"role": ..., "content": ...}, ...]`; content may be a string or an OpenAI-style
list of text parts (`[{"type": "text", "text": ...}]`, joined with newlines). Rows that cannot be
used (no assistant turn, empty assistant reply, no user turn before any reply, content that is not
text, a lone UTF-16 surrogate, unknown role) are skipped and counted, so one bad row in a million
does not stop a run; a dataset with no usable row, or without the needed columns, is a UserError.
Files are read as UTF-8, with or without a byte-order mark.
"""

import json
import os
from collections import Counter
from pathlib import Path

from common.errors import UserError

ROLES = {"system", "user", "assistant", "developer", "tool"}
LOCAL_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv"}


def _decode(path):
    """The file's text; a UserError naming the first line that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # spreadsheet and Windows exports start with a BOM
    except UnicodeDecodeError as exc:
        line_number = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line_number} is not valid UTF-8 (byte {exc.start}); save "
                        f"the file as UTF-8 or delete that line") from None


def _read_json_file(path):
    text = _decode(path)
    if path.suffix == ".jsonl":
        rows = []
        # JSON Lines ends a row at "\n" only: str.splitlines would also cut at U+2028, U+0085 and
        # other separators that are valid, unescaped, inside a JSON string.
        for line_number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: line {line_number} is not valid JSON ({exc.msg}); fix "
                                f"or delete that line") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # Some ".json" files are really JSON Lines; accept them.
        try:
            return [json.loads(line) for line in text.split("\n") if line.strip()]
        except json.JSONDecodeError:
            raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}); expected a "
                            f"list of rows or JSON Lines") from None
    if isinstance(data, dict):
        # {"data": [...]} or a single-split dict of lists are both common exports.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):
            return lists[0]
        if lists and all(isinstance(v, list) for v in data.values()) \
                and len({len(v) for v in data.values()}) == 1:
            keys = list(data)
            return [dict(zip(keys, values)) for values in zip(*data.values())]
        raise UserError(f"{path}: expected a JSON list of row objects (or JSON Lines)")
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of row objects (or JSON Lines)")
    return data


def _read_with_datasets(path):
    import datasets

    builder = "parquet" if path.suffix == ".parquet" else "csv"
    # datasets logs a failed read itself; the UserError below is the one message about it.
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # pyarrow and csv errors come in many types
        while exc.__cause__ is not None:  # "An error occurred while generating the dataset"
            exc = exc.__cause__
        raise UserError(f"{path}: could not be read as {builder} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    return table.to_list()


def _looks_local(name):
    return (Path(name).suffix.lower() in LOCAL_SUFFIXES or name.startswith((".", "/", "~"))
            or os.sep in name.strip("/") and name.count("/") > 1)


def load_raw_rows(dataset, split="train", config=None):
    """Rows of a local file (by suffix) or a Hub dataset, as a list of dicts."""
    path = Path(dataset).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in LOCAL_SUFFIXES)
        if len(files) != 1:
            raise UserError(f"dataset directory {path} must hold exactly one .jsonl/.json/"
                            f".parquet/.csv file, found {len(files)}; pass the file itself")
        path = files[0]
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in LOCAL_SUFFIXES:
            raise UserError(f"{path}: unsupported file type '{suffix}'; use .jsonl, .json, "
                            f".parquet or .csv")
        try:
            if suffix in (".jsonl", ".json"):
                rows = _read_json_file(path)
            else:
                rows = _read_with_datasets(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot read the dataset file ({exc})") from None
        return rows
    if _looks_local(dataset):
        raise UserError(f"dataset file {dataset} does not exist; check the path")
    return _load_hub_dataset(dataset, split, config)


def _load_hub_dataset(name, split, config):
    import datasets

    try:
        table = datasets.load_dataset(name, config, split=split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise UserError(f"dataset {name} has no split '{split}'; pass --dataset-split with "
                            f"one of its splits") from None
        raise UserError(f"dataset {name} could not be loaded: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"dataset '{name}' is neither a local file nor reachable on the Hugging "
                        f"Face Hub ({first_line}); pass a local .jsonl/.json/.parquet/.csv file, "
                        f"or check the name and your network/HF_TOKEN") from None
    return table.to_list()


def _text(content):
    """(text, None) for a string or a list of OpenAI-style text parts, else (None, reason)."""
    if isinstance(content, list) and all(
            isinstance(part, dict) and part.get("type", "text") == "text"
            and isinstance(part.get("text"), str) for part in content):
        # Newlines between parts, as vLLM's OpenAI server joins them for text-only models.
        content = "\n".join(part["text"] for part in content)
    if not isinstance(content, str):
        return None, "non-string content"
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:
        # JSON can spell a lone surrogate ("\ud800"); no tokenizer can encode it, and replacing
        # it would train on text the row's author never wrote.
        return None, "lone UTF-16 surrogate in the text"
    return content, None


def _normalize_messages(raw):
    """A list of {role, content} dicts, or the reason the row is unusable."""
    if not isinstance(raw, list) or not raw:
        return None, "messages is not a non-empty list"
    messages = []
    for message in raw:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return None, "message without role/content"
        role = message["role"]
        if not isinstance(role, str) or role not in ROLES:  # a list or dict role is unhashable
            return None, "unknown role"
        content, reason = _text(message["content"])
        if content is None:
            return None, reason
        messages.append({"role": role, "content": content})
    return messages, None


def row_to_messages(row, messages_field="messages", prompt_field="prompt",
                    response_field="response"):
    """(messages, None) for a usable row, (None, reason) for one to skip."""
    if not isinstance(row, dict):
        return None, "row is not an object"
    if messages_field in row and row[messages_field] is not None:
        return _normalize_messages(row[messages_field])
    prompt, response = row.get(prompt_field), row.get(response_field)
    if isinstance(prompt, list):
        messages, reason = _normalize_messages(prompt)
        if messages is None:
            return None, reason
    elif isinstance(prompt, str):
        prompt, reason = _text(prompt)
        if prompt is None:
            return None, reason
        messages = [{"role": "user", "content": prompt}]
    else:
        return None, "no prompt"
    if response is None:
        return messages, None  # a prompt-only row (usable for generation, not for training)
    response, reason = _text(response)
    if response is None:
        return None, reason
    return messages + [{"role": "assistant", "content": response}], None


def has_assistant_reply(messages):
    return any(m["role"] == "assistant" and m["content"].strip() for m in messages)


def has_reply_after_user(messages):
    """Whether some non-empty assistant reply follows a user turn: a conversation whose replies
    all come before any question (roles out of order) teaches answers to nothing."""
    seen_user = False
    for message in messages:
        if message["role"] == "user":
            seen_user = True
        elif seen_user and message["role"] == "assistant" and message["content"].strip():
            return True
    return False


def load_conversations(data_args, require_reply=True):
    """Load the dataset named by `data_args` and return (list of messages lists, skip Counter).

    `require_reply` drops rows without a non-empty assistant turn (training and scoring need one;
    generating a reply does not).
    """
    pairs, skipped = load_conversation_rows(data_args, require_reply)
    return [messages for messages, _ in pairs], skipped


def describe_skips(skipped, total):
    """'skipped 3 of 100 rows: 2 empty reply, 1 too long' (or '' when nothing was skipped)."""
    count = sum(skipped.values())
    if not count:
        return ""
    reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
    return f"skipped {count} of {total} rows: {reasons}"


def load_conversation_rows(data_args, require_reply=True):
    """([(messages, raw row), ...], skip Counter) for the dataset named by `data_args`; the raw
    row lets a caller read other columns (eval.py reads an `answers` list).

    A missing or empty dataset, or one without the needed columns, is a UserError; rows that cannot
    be used are skipped and counted. `require_reply` drops rows without a non-empty assistant turn.
    """
    rows = load_raw_rows(data_args.dataset, data_args.dataset_split, data_args.dataset_config)
    if not rows:
        raise UserError(f"dataset {data_args.dataset} is empty")
    columns = set().union(*(r.keys() for r in rows[:100] if isinstance(r, dict)))
    if data_args.messages_field not in columns and data_args.prompt_field not in columns:
        raise UserError(
            f"dataset {data_args.dataset} has columns {sorted(columns)} but neither "
            f"'{data_args.messages_field}' nor '{data_args.prompt_field}'; name the right ones "
            f"with --messages-field or --prompt-field/--response-field")
    if require_reply and data_args.messages_field not in columns \
            and data_args.response_field not in columns:
        raise UserError(
            f"dataset {data_args.dataset} has a '{data_args.prompt_field}' column but no "
            f"'{data_args.response_field}' column with assistant replies; name it with "
            f"--response-field")
    if data_args.max_samples > 0:
        rows = rows[:data_args.max_samples]
    pairs, skipped = [], Counter()
    for row in rows:
        messages, reason = row_to_messages(row, data_args.messages_field, data_args.prompt_field,
                                           data_args.response_field)
        if messages is None:
            skipped[reason] += 1
        elif require_reply and not has_assistant_reply(messages):
            skipped["no non-empty assistant reply"] += 1
        elif require_reply and not has_reply_after_user(messages):
            skipped["no user turn before any assistant reply"] += 1
        else:
            pairs.append((messages, row))
    return pairs, skipped
