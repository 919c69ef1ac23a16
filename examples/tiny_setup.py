"""Build a tiny, fully offline distillation setup: tokenizer, teacher, student and a toy dataset.

Nothing here touches the Hugging Face Hub, so it works on a machine without network access. The
tests use it as their fixture and the README uses it for the offline token-level example:

    python examples/tiny_setup.py runs/tiny
    python token_level.py --teacher runs/tiny/teacher --student runs/tiny/student \
        --dataset runs/tiny/train.jsonl --output-dir runs/tiny/out --max-steps 12

What gets built, and why it looks the way it does:
- a byte-level BPE tokenizer trained on the toy text, with a chat template that has NO
  `{% generation %}` markers, injects a default system prompt with today's date and `trim`s message
  content: the hard case for assistant-token masking;
- a Llama-style teacher whose embedding matrix has more rows than the tokenizer has tokens (as
  Qwen2.5 and many others pad theirs), and a smaller student with the exact vocabulary;
- optionally a second, SentencePiece-style tokenizer (Metaspace pre-tokenizer, byte fallback) with
  its own vocabulary, for cross-tokenizer work and mismatch checks;
- opt-in (`--with-chatml-student`, or `build_chatml_student`), a student of another architecture
  (Mistral) with a SentencePiece-style tokenizer and a ChatML template (<|im_start|>/<|im_end|>,
  default system prompt, no trim, no BOS): the unlike pair for cross_tokenizer.py:

    python examples/tiny_setup.py runs/tiny --with-chatml-student
    python cross_tokenizer.py --teacher runs/tiny/teacher --student runs/tiny/student_chatml \
        --dataset runs/tiny/train.jsonl --output-dir runs/tiny/uld --top-k 16 --max-steps 12
The weights are random: these models exist to exercise the code, not to be good.
"""

import argparse
import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOT, PAD = "<|begin|>", "<|end_of_turn|>", "<|pad|>"
HEADER_START, HEADER_END = "<|header|>", "<|/header|>"

# Marker-less template that injects a dated system prompt and trims content (like Llama 3's).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] != 'system' %}"
    "<|header|>system<|/header|>\nYou are a helpful assistant. Today is {{ strftime_now('%d %B %Y') }}."
    "<|end_of_turn|>"
    "{% endif %}"
    "{% for message in messages %}"
    "<|header|>{{ message['role'] }}<|/header|>\n{{ message['content'] | trim }}<|end_of_turn|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|header|>assistant<|/header|>\n{% endif %}"
)

SP_BOS, SP_EOS, SP_PAD = "<s>", "</s>", "<pad>"
SP_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] | trim }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] | trim }}{{ eos_token }}"
    "{% else %}<<SYS>> {{ message['content'] | trim }} <</SYS>>{% endif %}"
    "{% endfor %}"
)

# ChatML (Qwen-style): injects a default system prompt, writes content as is (no trim), no BOS.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WORDS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach", "pear", "plum"]


def toy_conversations(num_rows, seed=0):
    """Short chat rows with one right answer each: sums, word reversal, counting."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        kind = rng.randrange(3)
        if kind == 0:
            a, b = rng.randrange(100), rng.randrange(100)
            question, answer = f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
        elif kind == 1:
            words = rng.sample(WORDS, 3)
            question = "Reverse the list: " + ", ".join(words)
            answer = ", ".join(reversed(words))
        else:
            word = rng.choice(WORDS)
            count = rng.randrange(1, 6)
            question = "Count the words: " + " ".join([word] * count)
            answer = f"There are {count} words."
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": answer}]})
    return rows


def _corpus(rows):
    for row in rows:
        for message in row["messages"]:
            yield message["content"]
    yield "You are a helpful assistant. Today is 27 November 2026."
    yield "system user assistant January February March April May June July August September " \
          "October November December 0123456789"


def build_bpe_tokenizer(rows, vocab_size=400):
    """Byte-level BPE (GPT-2 / Llama 3 style) with a marker-less chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOT, HEADER_START, HEADER_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_corpus(rows), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOT, pad_token=PAD,
        additional_special_tokens=[HEADER_START, HEADER_END], chat_template=CHAT_TEMPLATE)


def build_sentencepiece_tokenizer(rows, vocab_size=300, space_rule="metaspace"):
    """SentencePiece-style (Metaspace '▁', byte fallback) tokenizer with a different vocabulary.

    The 256 <0x..> byte tokens are ordinary vocabulary entries (as in Llama 2's), not special
    tokens: decode(skip_special_tokens=True) must keep them, or non-ASCII text vanishes.
    space_rule="replace" gives the same vocabulary with spaces turned into '▁' by Replace rules
    instead of a Metaspace pre-tokenizer: a normalizer Prepend('▁') + Replace(' ', '▁') and no
    pre-tokenizer, as Llama-2, Mistral and Gemma conversions have."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256,
                                  special_tokens=[SP_PAD, SP_BOS, SP_EOS] + byte_tokens,
                                  show_progress=False)
    tokenizer.train_from_iterator(_corpus(rows), trainer=trainer)
    # The trainer registers every special token as an added token; demote the byte tokens.
    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_tokens]
    if space_rule == "replace":
        spec["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
        spec["pre_tokenizer"] = None
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=SP_BOS, eos_token=SP_EOS, pad_token=SP_PAD,
        chat_template=SP_CHAT_TEMPLATE)


def build_model(tokenizer, hidden_size, num_layers, vocab_padding=0, seed=0):
    """A randomly initialised Llama whose embedding has `vocab_padding` rows beyond the tokenizer."""
    import torch

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + vocab_padding, hidden_size=hidden_size,
        intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def build_chatml_tokenizer(rows, vocab_size=300):
    """The SentencePiece-style tokenizer with <|im_start|>/<|im_end|> and a ChatML template.

    EOS is <|im_end|> (generation stops at the end of a turn, as in Qwen's ChatML).
    """
    tokenizer = build_sentencepiece_tokenizer(rows, vocab_size)
    tokenizer.add_special_tokens({"eos_token": IM_END,
                                  "additional_special_tokens": [IM_START, IM_END]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_chatml_student(out_dir, num_train=64, num_test=16, name="student_chatml", seed=4):
    """Write OUT/student_chatml: a Mistral-architecture student with the ChatML tokenizer.

    Its tokenizer is trained on the same toy rows as `build()`'s (same arguments, same rows), so it
    can be written next to an existing tiny setup without touching anything there.
    """
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    out = Path(out_dir) / name
    rows = toy_conversations(num_train + num_test, seed=0)
    tokenizer = build_chatml_tokenizer(rows)
    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        sliding_window=None, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    MistralForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build(out_dir, num_train=64, num_test=16, with_sentencepiece=True, with_chatml_student=False):
    """Write tokenizer + teacher + student (+ a second-vocabulary student) and train/test jsonl.

    `with_chatml_student` also writes student_chatml/ (see `build_chatml_student`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = toy_conversations(num_train + num_test, seed=0)
    tokenizer = build_bpe_tokenizer(rows)
    teacher = build_model(tokenizer, hidden_size=64, num_layers=2, vocab_padding=37, seed=1)
    student = build_model(tokenizer, hidden_size=32, num_layers=2, seed=2)
    for name, model in [("teacher", teacher), ("student", student)]:
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    if with_sentencepiece:
        sp_tokenizer = build_sentencepiece_tokenizer(rows)
        sp_student = build_model(sp_tokenizer, hidden_size=32, num_layers=2, seed=3)
        sp_student.save_pretrained(out / "student_sp")
        sp_tokenizer.save_pretrained(out / "student_sp")
    if with_chatml_student:
        build_chatml_student(out, num_train, num_test)
    write_jsonl(out / "train.jsonl", rows[:num_train])
    write_jsonl(out / "test.jsonl", rows[num_train:])
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="directory to write teacher/, student/, student_sp/, "
                                        "train.jsonl and test.jsonl into")
    parser.add_argument("--num-train", type=int, default=64, help="training rows (default 64)")
    parser.add_argument("--num-test", type=int, default=16, help="held-out rows (default 16)")
    parser.add_argument("--with-chatml-student", action="store_true",
                        help="also write student_chatml/: a Mistral student with a SentencePiece-"
                             "style tokenizer and a ChatML template (for cross_tokenizer.py)")
    cli = parser.parse_args()
    out = build(cli.out_dir, cli.num_train, cli.num_test,
                with_chatml_student=cli.with_chatml_student)
    print(f"wrote tiny setup to {out}")
