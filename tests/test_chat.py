"""Assistant-token masking on real-world template shapes, none with {% generation %} markers."""

import pytest
from transformers import AutoTokenizer

from common.errors import UserError

from common.chat import (DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, ChatEncoder, SkipRow, collate,
                         ensure_chat_template)

CHATML_WITH_DEFAULT_SYSTEM = (  # Qwen2.5's shape: injects a system prompt when none is given
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny / "student")


@pytest.fixture()
def chatml_tokenizer(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny / "student")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML_WITH_DEFAULT_SYSTEM
    return tokenizer


def supervised_text(tokenizer, example):
    """Decode each run of supervised tokens separately."""
    runs, current = [], []
    for token_id, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token_id  # labels are the input ids themselves (shifted in the loss)
            current.append(token_id)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


CONVERSATION = [
    {"role": "user", "content": "  What is 2 + 2?  "},
    {"role": "assistant", "content": " 2 + 2 = 4. "},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "3 + 3 = 6."},
]


def test_template_with_injected_dated_system_prompt_and_trim(tokenizer):
    encoder = ChatEncoder(tokenizer, max_length=512)
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert "Today is" in rendered and "2 + 2 = 4.<|end_of_turn|>" in rendered  # trimmed, dated
    example = encoder.encode(CONVERSATION)
    # every assistant turn, trimmed content plus its end-of-turn token; nothing else
    assert supervised_text(tokenizer, example) == ["2 + 2 = 4.<|end_of_turn|>",
                                                   "3 + 3 = 6.<|end_of_turn|>"]
    # what apply_chat_template(tokenize=True) would produce
    assert example["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_only_last_turn(tokenizer):
    example = ChatEncoder(tokenizer, 512, supervise="last").encode(CONVERSATION)
    assert supervised_text(tokenizer, example) == ["3 + 3 = 6.<|end_of_turn|>"]


def test_chatml_template_injecting_system_prompt(chatml_tokenizer):
    encoder = ChatEncoder(chatml_tokenizer, 512)
    assert encoder.end_of_turn == "<|im_end|>"  # the newline after it is template, not reply
    example = encoder.encode(CONVERSATION)
    assert supervised_text(chatml_tokenizer, example) == [" 2 + 2 = 4. <|im_end|>",
                                                          "3 + 3 = 6.<|im_end|>"]
    assert encoder.end_of_turn_token_id == chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_reply_equal_to_earlier_text_is_found_at_its_own_place(tokenizer):
    """The search walks forward, so a reply that also appears in the prompt is not mislocated."""
    conversation = [{"role": "user", "content": "Say apple"},
                    {"role": "assistant", "content": "apple"},
                    {"role": "user", "content": "apple"},
                    {"role": "assistant", "content": "apple"}]
    example = ChatEncoder(tokenizer, 512).encode(conversation)
    assert supervised_text(tokenizer, example) == ["apple<|end_of_turn|>"] * 2
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    # the supervised runs are the assistant ones: right after an assistant header
    tokens = tokenizer.convert_ids_to_tokens(example["input_ids"])
    first = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    assert "".join(tokens[first - 4:first]).replace("Ċ", "\n").endswith("istant<|/header|>\n")
    assert rendered.count("apple") == 4


def test_default_template_for_tokenizers_without_one(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny / "student")
    tokenizer.chat_template = None
    ensure_chat_template(tokenizer)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    example = ChatEncoder(tokenizer, 512).encode(CONVERSATION)
    assert supervised_text(tokenizer, example) == [" 2 + 2 = 4. <|end_of_turn|>",
                                                   "3 + 3 = 6.<|end_of_turn|>"]


def test_missing_chat_template_warns_once_per_model(tiny, tmp_path, monkeypatch, capsys):
    """A base model or a GGUF conversion ships no template: the generic default is used, and said
    once per model with the flag that passes the right one; a --chat-template file is used as is."""
    from common import chat

    monkeypatch.setattr(chat, "_TEMPLATE_WARNINGS", set())
    monkeypatch.delenv("RANK", raising=False)
    for name in ["student", "student", "teacher"]:
        tokenizer = AutoTokenizer.from_pretrained(tiny / name)
        tokenizer.chat_template = None
        ensure_chat_template(tokenizer, name)
        assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2, warnings
    for name, warning in zip(["student", "teacher"], warnings):
        assert warning.startswith(f"warning: the {name} {tiny / name} has no chat template")
        assert "<|user|>" in warning and "--chat-template FILE" in warning
    template_file = tmp_path / "template.jinja"
    template_file.write_text(CHATML_WITH_DEFAULT_SYSTEM)
    tokenizer.chat_template = None
    monkeypatch.setattr(chat, "_TEMPLATE_WARNINGS", set())
    ensure_chat_template(tokenizer, "teacher", str(template_file))
    assert tokenizer.chat_template == CHATML_WITH_DEFAULT_SYSTEM
    assert capsys.readouterr().err == ""


def test_truncation_keeps_the_start_and_skips_rows_with_nothing_left(tokenizer):
    full = ChatEncoder(tokenizer, 512).encode(CONVERSATION)
    first_supervised = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    cut = ChatEncoder(tokenizer, first_supervised + 2).encode(CONVERSATION)
    assert cut["input_ids"] == full["input_ids"][:first_supervised + 2]
    assert sum(label != IGNORE_INDEX for label in cut["labels"]) == 2
    with pytest.raises(SkipRow, match="too long"):
        ChatEncoder(tokenizer, first_supervised).encode(CONVERSATION)


def test_template_that_rewrites_a_reply_skips_that_row(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny / "student")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: "
                               "{{ m['content'] | replace('apple', 'pear') }}{{ eos_token }}"
                               "{% endfor %}")
    encoder = ChatEncoder(tokenizer, 512)
    assert supervised_text(tokenizer, encoder.encode(CONVERSATION))[0].endswith("<|end_of_turn|>")
    with pytest.raises(SkipRow, match="not found"):
        encoder.encode([{"role": "user", "content": "fruit?"},
                        {"role": "assistant", "content": "an apple"}])


def test_template_that_never_writes_replies_is_an_error(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny / "student")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(UserError, match="chat template"):
        ChatEncoder(tokenizer, 512)


def test_encode_all_counts_skips(tokenizer):
    examples, skipped = ChatEncoder(tokenizer, 512).encode_all(
        [CONVERSATION, [{"role": "user", "content": "no reply"}]], progress=False)
    assert len(examples) == 1 and skipped == {"no assistant reply": 1}


def test_collate_right_pads_and_masks():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                     {"input_ids": [8], "labels": [8]}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


LLAMA2_TEMPLATE = (  # the reply follows "[/INST] " after a space that the prompt does not hold
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] | trim }} [/INST]"
    "{% else %} {{ message['content'] | trim }} {{ eos_token }}{% endif %}{% endfor %}")


def test_space_token_between_prompt_and_reply_is_supervised():
    """Llama 2 renders "[/INST] 42": with a tokenizer that makes that space its own token ('▁'
    before split digits), the model must generate the '▁' after the prompt, so it is labelled."""
    from examples.toy_assets import build_sentencepiece_tokenizer

    tokenizer = build_sentencepiece_tokenizer(["What is 12 + 30?", "12 + 30 = 42."], 40)
    tokenizer.chat_template = LLAMA2_TEMPLATE
    conversation = [{"role": "user", "content": "What is 12 + 30?"},
                    {"role": "assistant", "content": "42"}]
    example = ChatEncoder(tokenizer, 512).encode(conversation)
    tokens = tokenizer.convert_ids_to_tokens(example["input_ids"])
    supervised = [token for token, label in zip(tokens, example["labels"])
                  if label != IGNORE_INDEX]
    assert tokens[tokens.index("[/INST]") + 1] == "▁"  # the space is a token of its own
    assert supervised == ["▁", "4", "2", "▁", "</s>"]


def test_a_token_holding_prompt_text_before_the_reply_is_not_supervised():
    """Prompt "Assistant:" but the turn renders "Assistant:\n{reply}", with a pre-tokenizer that
    merges ":\n" (as Llama 3's and Qwen's do with punctuation and newlines): the '\n' is the
    model's to write, but the ':\n' token holds prompt text, so it stays unlabelled."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<s>", "</s>", "User", "Assistant", ":", ":\n", "\n", " ", "hi", "hello", "there"]
    backend = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<s>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r":\n|\w+|\s|[^\w\s]"), "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
        "{% else %}Assistant:\n{{ m['content'] }}</s>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}")
    example = ChatEncoder(tokenizer, 64).encode([{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "hello there"}])
    tokens = tokenizer.convert_ids_to_tokens(example["input_ids"])
    supervised = [t for t, label in zip(tokens, example["labels"]) if label != IGNORE_INDEX]
    assert ":\n" in tokens and supervised == ["hello", " ", "there", "</s>"]
