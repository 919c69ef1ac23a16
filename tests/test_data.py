"""Loading and normalizing datasets: formats, column flags, bad rows, bad files."""

import json
from dataclasses import replace

import pytest

from common.args import DataArguments
from common.data import describe_skips, load_conversations, load_raw_rows, row_to_messages
from common.errors import UserError

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def args(path, **overrides):
    return replace(DataArguments(dataset=str(path)), **overrides)


def test_messages_column_is_used_as_is(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    conversations, skipped = load_conversations(args(path))
    assert conversations == [CHAT] and not skipped


def test_prompt_response_columns_are_converted_with_custom_names(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "hi", "answer": "hello"}])
    conversations, _ = load_conversations(args(path, prompt_field="question",
                                               response_field="answer"))
    assert conversations == [CHAT]


def test_json_csv_and_parquet_files(tmp_path):
    import datasets

    (tmp_path / "d.json").write_text(json.dumps([{"prompt": "hi", "response": "hello"}]))
    assert load_conversations(args(tmp_path / "d.json"))[0] == [CHAT]
    table = datasets.Dataset.from_list([{"prompt": "hi", "response": "hello"}])
    table.to_csv(str(tmp_path / "d.csv"))
    table.to_parquet(str(tmp_path / "d.parquet"))
    assert load_conversations(args(tmp_path / "d.csv"))[0] == [CHAT]
    assert load_conversations(args(tmp_path / "d.parquet"))[0] == [CHAT]
    messages_table = datasets.Dataset.from_list([{"messages": CHAT}])
    messages_table.to_parquet(str(tmp_path / "m.parquet"))
    assert load_conversations(args(tmp_path / "m.parquet"))[0] == [CHAT]


def test_bad_rows_are_skipped_and_counted(tmp_path):
    rows = [{"messages": CHAT},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
            {"messages": [{"role": "user", "content": "only a question"}]},
            {"messages": [{"role": "wizard", "content": "x"}]},
            {"messages": [{"role": "user", "content": 5}]},
            {"messages": "not a list"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    conversations, skipped = load_conversations(args(path))
    assert conversations == [CHAT]
    assert sum(skipped.values()) == 5
    assert skipped["no non-empty assistant reply"] == 2
    assert describe_skips(skipped, 6).startswith("skipped 5 of 6 rows: 2 no non-empty")


def test_max_samples(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}] * 5)
    assert len(load_conversations(args(path, max_samples=2))[0]) == 2


@pytest.mark.parametrize("content, match", [
    ('{"messages": []}\n{not json\n', "line 2 is not valid JSON"),
    ("", "is empty"),
    ('{"text": "hi"}\n', "neither 'messages' nor 'prompt'"),
    ('{"prompt": "hi"}\n', "no 'response' column"),
])
def test_bad_files_are_one_line_errors(tmp_path, content, match):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=match) as error:
        load_conversations(args(path))
    assert "\n" not in str(error.value)


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_raw_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(UserError, match="unsupported file type"):
        load_raw_rows(str(tmp_path / "d.txt"))


def test_hub_id_fails_cleanly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="Hub"):
        load_raw_rows("nobody-here/no-such-dataset-xyz")


def test_row_to_messages_accepts_a_message_list_prompt():
    messages, reason = row_to_messages({"prompt": [{"role": "system", "content": "be brief"},
                                                   {"role": "user", "content": "hi"}],
                                        "response": "hello"})
    assert reason is None and [m["role"] for m in messages] == ["system", "user", "assistant"]


def test_invalid_argument_values():
    with pytest.raises(UserError, match="--max-samples"):
        DataArguments(dataset="x", max_samples=0)
    with pytest.raises(UserError, match="--max-length"):
        DataArguments(dataset="x", max_length=1)


def test_jsonl_and_json_with_a_utf8_byte_order_mark(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n", encoding="utf-8-sig")
    (tmp_path / "d.json").write_text(json.dumps([{"messages": CHAT}]), encoding="utf-8-sig")
    assert load_conversations(args(tmp_path / "d.jsonl"))[0] == [CHAT]
    assert load_conversations(args(tmp_path / "d.json"))[0] == [CHAT]


def test_openai_content_parts_are_joined_and_other_parts_skipped(tmp_path):
    def parts(*texts):
        return [{"type": "text", "text": text} for text in texts]

    rows = [{"messages": [{"role": "user", "content": parts("Look:", "hi")},
                          {"role": "assistant", "content": parts("hello")}]},
            {"prompt": parts("hi"), "response": "hello"},  # a list prompt is a message list
            {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                        "image_url": {"url": "x.png"}}]},
                          {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": ["bare", "strings"]},
                          {"role": "assistant", "content": "hello"}]}]
    conversations, skipped = load_conversations(args(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert conversations == [[{"role": "user", "content": "Look:\nhi"}, CHAT[1]]]
    assert skipped == {"message without role/content": 1, "non-string content": 2}


def test_lone_surrogates_skip_the_row_and_are_counted(tmp_path):
    """JSON can spell half a UTF-16 pair ("\\ud800"); no tokenizer can encode it (training and
    eval.py died with a TypeError deep in `tokenizers`)."""
    lines = [json.dumps({"messages": CHAT}),
             '{"messages": [{"role": "user", "content": "hi \\ud800"}, '
             '{"role": "assistant", "content": "hello"}]}',
             '{"prompt": "hi", "response": "a \\udfff b"}',
             '{"prompt": "\\ud83d", "response": "hello"}',
             '{"prompt": "ok \\ud83d\\ude00", "response": "a proper pair is fine"}']
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    conversations, skipped = load_conversations(args(path))
    assert conversations == [CHAT, [{"role": "user", "content": "ok \U0001F600"},
                                    {"role": "assistant", "content": "a proper pair is fine"}]]
    assert skipped == {"lone UTF-16 surrogate in the text": 3}


def test_conversations_with_no_user_turn_before_a_reply_are_skipped(tmp_path):
    greeting_first = [{"role": "assistant", "content": "How can I help?"}, *CHAT]
    rows = [{"messages": CHAT}, {"messages": greeting_first},
            {"messages": [CHAT[1], CHAT[0]]},  # reply first, question after
            {"messages": [{"role": "system", "content": "be brief"}, CHAT[1]]}]
    conversations, skipped = load_conversations(args(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert conversations == [CHAT, greeting_first]
    assert skipped == {"no user turn before any assistant reply": 2}
    # generation prompts carry no reply yet: the order rule is for rows that must have one
    assert load_conversations(args(tmp_path / "d.jsonl"), require_reply=False)[0][2] == \
        [CHAT[1], CHAT[0]]


def test_a_dataset_of_only_out_of_order_rows_is_an_error(tmp_path, tiny):
    from transformers import AutoTokenizer

    from common.chat import ChatEncoder, encode_dataset

    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [CHAT[1], CHAT[0]]}] * 3)
    encoder = ChatEncoder(AutoTokenizer.from_pretrained(tiny / "student"), 64)
    with pytest.raises(UserError) as error:
        encode_dataset(args(path), encoder, log=lambda message: None)
    message = str(error.value)
    assert "3 no user turn before any assistant reply" in message and "\n" not in message


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps({"messages": CHAT}).encode() + b"\n"
                     + b'{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(UserError, match="line 2 is not valid UTF-8") as error:
        load_raw_rows(str(path))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("separator", ["\u2028", "\u0085", "\x1c"])
def test_unicode_line_separators_inside_a_reply_stay_in_the_row(tmp_path, separator):
    # json.dumps(ensure_ascii=False) writes these unescaped; str.splitlines would cut the row there
    chat = [CHAT[0], {"role": "assistant", "content": f"one{separator}two"}]
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": chat}, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
    assert load_conversations(args(tmp_path / "d.jsonl"))[0] == [chat]
