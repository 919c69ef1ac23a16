"""Chat-template rendering and assistant-token masking: the one place that decides what is supervised.

The conversation is rendered with the tokenizer's own chat template to one string, and that string is
tokenized once (exactly what `apply_chat_template(tokenize=True)` does). Each message's content is
then located in the rendered text, walking forward through the conversation, and the tokens that
overlap an assistant reply, plus the end-of-turn token right after it, are supervised; every other
token gets label -100. A reply is searched for only after the template's opening of its turn (the
conversation so far rendered with the generation prompt), so a short reply such as "a" is never
mistaken for a letter of the role header before it. Whitespace the template writes between that
opening and the reply (Llama 2's "[/INST] reply") is supervised too: at inference the model writes it.

This needs no `{% generation %}` markers, so it works with the templates real models ship:
templates that inject a default system prompt or today's date (the injected text is simply not an
assistant reply), that `trim` content (the stripped content is searched for), and multi-turn
conversations (every assistant turn is supervised). A reply the template rewrites beyond trimming
(e.g. one that drops reasoning from earlier turns) is found as long as its visible text is rendered.

The end-of-turn text is learned once per template from a probe conversation: whatever the template
writes after an assistant reply, up to and including its first special token (`<|eot_id|>`,
`<|im_end|>`, `</s>`, ...).
"""

import os
import sys
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from common.errors import UserError, is_rank_zero

# Used for tokenizers that ship no chat template (base models). Documented in
# docs/data_and_masking.md.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

IGNORE_INDEX = -100
_PROBE_REPLY = "Probe reply 7d1e."


class SkipRow(Exception):
    """This conversation cannot be used; the message is the reason, counted in a warning."""


def read_chat_template(path):
    """The text of a --chat-template file."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise UserError(f"--chat-template {path} cannot be read ({reason}); pass a Jinja chat "
                        f"template file (a model's chat_template.jinja)") from None
    if not text.strip():
        raise UserError(f"--chat-template {path} is empty; pass a Jinja chat template file")
    return text


_TEMPLATE_WARNINGS = set()


def ensure_chat_template(tokenizer, what="model", chat_template_file=None):
    """Give a tokenizer that ships no chat template (a base model, a GGUF conversion) the
    --chat-template file, else the documented default, which it was never trained on: that one
    is said once per model."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer
    if chat_template_file:
        tokenizer.chat_template = read_chat_template(chat_template_file)
        return tokenizer
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    name = getattr(tokenizer, "name_or_path", "") or "?"
    if name not in _TEMPLATE_WARNINGS and is_rank_zero():
        _TEMPLATE_WARNINGS.add(name)
        print(f"warning: the {what} {name} has no chat template; using the generic "
              f"<|user|>/<|assistant|> one (docs/data_and_masking.md), which it was not trained "
              f"on; pass --chat-template FILE (a Jinja template) to use its own",
              file=sys.stderr)
    return tokenizer


def use_teacher_template(student_tokenizer, teacher_tokenizer, chat_template_file=None):
    """Same-vocabulary methods render with the teacher's template (its logits only make sense in
    the format it was trained on); the exported student keeps that template. A teacher without
    one lends the student --chat-template, else the student's own, else the default."""
    if not getattr(teacher_tokenizer, "chat_template", None) and not chat_template_file and \
            getattr(student_tokenizer, "chat_template", None):
        return student_tokenizer
    ensure_chat_template(teacher_tokenizer, "teacher", chat_template_file)
    student_tokenizer.chat_template = teacher_tokenizer.chat_template
    return student_tokenizer


def render(tokenizer, messages, add_generation_prompt=False):
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises its own TemplateError for e.g. role-order rules
        raise SkipRow(f"chat template refused the conversation ({type(exc).__name__})") from None


def _special_token_strings(tokenizer):
    specials = set(tokenizer.all_special_tokens)
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            specials.add(str(token))
    return {s for s in specials if s}


def end_of_turn_text(tokenizer):
    """What the template writes right after an assistant reply, through its first special token.

    Empty if the template closes replies with no special token (the model then never learns to
    stop; docs/data_and_masking.md warns about such templates).
    """
    messages = [{"role": "user", "content": "Probe question?"},
                {"role": "assistant", "content": _PROBE_REPLY}]
    try:
        text = render(tokenizer, messages)
    except SkipRow as exc:
        raise UserError(f"the chat template cannot render a user/assistant exchange: {exc}") from None
    start = text.rfind(_PROBE_REPLY)
    if start < 0:
        raise UserError("the chat template does not write the assistant's reply into the text; "
                        "use a tokenizer with a standard chat template")
    suffix = text[start + len(_PROBE_REPLY):]
    first_special = min(((suffix.find(s), s) for s in _special_token_strings(tokenizer)
                         if s in suffix), default=None)
    if first_special is None:
        return ""
    position, token = first_special
    return suffix[:position + len(token)]


_CONTEXT_WARNINGS = set()


def warn_beyond_context(tokenizer, max_length):
    """Warn once per run when --max-length exceeds the model's context: longer conversations
    would crash models with absolute positions and go beyond what rotary ones were trained on."""
    from common.models import context_length

    name = getattr(tokenizer, "name_or_path", "") or "the model"
    if (name, max_length) in _CONTEXT_WARNINGS:
        return
    _CONTEXT_WARNINGS.add((name, max_length))
    context, source = context_length(name, tokenizer)
    if context and max_length > context and is_rank_zero():
        print(f"warning: --max-length {max_length} is beyond the {context}-token context of "
              f"{name} ({source}); longer conversations may fail or train poorly: lower "
              f"--max-length to {context}", file=sys.stderr)


class ReplySpan(NamedTuple):
    """Character offsets of one assistant reply in the rendered text (see assistant_spans)."""
    start: int
    end: int
    content_start: int
    content_end: int


def is_supervised(token_start, token_end, span):
    """A token is trained on when it overlaps the reply or its end of turn (BPE may merge the
    template's leading space into the first reply token), or lies in the whitespace between the
    generation prompt and the reply; a token that also holds prompt text (":\n" after
    "Assistant") and nothing of the reply is not: the model never writes the prompt."""
    if not (token_end > span.start and token_start < span.end and token_end > token_start):
        return False
    return token_start >= span.start or token_end > span.content_start


def supervised_tokens(offsets, spans):
    """(position, span index) of every token, by its (start, end) character offsets, that
    `is_supervised` by one of `spans` (ReplySpans in text order): the one walk that ChatEncoder and
    common.align's encoding share, so both agree on what is supervised."""
    span_index = 0
    for position, (start, end) in enumerate(offsets):
        while span_index < len(spans) and spans[span_index].end <= start:
            span_index += 1
        if span_index == len(spans):
            break
        if is_supervised(start, end, spans[span_index]):
            yield position, span_index


class ChatEncoder:
    """Turns conversations into `input_ids` and `labels` (-100 on tokens the assistant did not write).

    `supervise="all"` trains on every assistant turn, `"last"` only on the final one.
    """

    # encode_dataset's advice when no row of a dataset could be used
    no_usable_hint = "check that rows hold a user turn followed by a non-empty assistant reply"

    def __init__(self, tokenizer, max_length, supervise="all"):
        if not getattr(tokenizer, "is_fast", False):
            raise UserError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; "
                            f"assistant masking needs character offsets (install `tokenizers` "
                            f"and load the model's tokenizer.json)")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.supervise = supervise
        warn_beyond_context(tokenizer, max_length)
        self.end_of_turn = end_of_turn_text(tokenizer)
        end_ids = tokenizer(self.end_of_turn, add_special_tokens=False)["input_ids"]
        # The id generation should stop at (e.g. <|eot_id|>, which is not Llama 3's EOS).
        self.end_of_turn_token_id = end_ids[-1] if end_ids else tokenizer.eos_token_id

    def assistant_spans(self, text, messages):
        """A ReplySpan per assistant reply in `text`: what is supervised, [start, end) (the reply,
        its end of turn, and whitespace the template writes between the generation prompt and
        the reply), and where the content itself was found, [content_start, content_end)."""
        spans, cursor = [], 0
        for index, message in enumerate(messages):
            content = message["content"]
            reply_start = 0
            if message["role"] == "assistant":
                # Search after the template's opening of this turn: a short reply ("a", "t",
                # "assistant") would otherwise be found inside the role header before it.
                reply_start = self._reply_start(text, messages[:index])
                reply_start = reply_start if reply_start >= cursor else 0
                cursor = max(cursor, reply_start)
            candidates = [content, content.strip()] if content.strip() != content else [content]
            found = -1
            for candidate in candidates:
                if not candidate:
                    continue
                found = text.find(candidate, cursor)
                if found >= 0:
                    break
            if found < 0:
                if message["role"] == "assistant":
                    raise SkipRow("assistant reply not found in the rendered template")
                continue  # templates may drop or rewrite system/tool messages
            end = found + len(candidate)
            if message["role"] == "assistant":
                content_end = end
                if self.end_of_turn and text.startswith(self.end_of_turn, end):
                    end += len(self.end_of_turn)
                # Llama 2 renders "[/INST] reply": the space is not in the prompt, so at inference
                # the model writes it, and a tokenizer may make it a token of its own ('▁').
                start = reply_start if reply_start and not text[reply_start:found].strip() \
                    else found
                spans.append(ReplySpan(start, end, found, content_end))
            cursor = end
        if self.supervise == "last":
            spans = spans[-1:]
        return spans

    def _reply_start(self, text, previous_messages):
        """Where the reply after `previous_messages` can start in `text`: the end of their
        rendering with the generation prompt, when the template renders that as a prefix of the
        whole conversation (most do); else 0 (search from the cursor as before)."""
        if not previous_messages:
            return 0
        try:
            prefix = render(self.tokenizer, previous_messages, add_generation_prompt=True)
        except SkipRow:
            return 0
        return len(prefix) if text.startswith(prefix) else 0

    def encode(self, messages):
        """{'input_ids', 'labels'} for one conversation; raises SkipRow when it cannot be used."""
        text = render(self.tokenizer, messages)
        spans = self.assistant_spans(text, messages)
        if not spans:
            raise SkipRow("no assistant reply")
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = encoding["input_ids"]
        labels = [IGNORE_INDEX] * len(input_ids)
        for position, _ in supervised_tokens(encoding["offset_mapping"], spans):
            labels[position] = input_ids[position]
        input_ids, labels = input_ids[:self.max_length], labels[:self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise SkipRow("too long for --max-length")
        return {"input_ids": input_ids, "labels": labels}

    def encode_all(self, conversations, progress=True):
        """Encode a list of conversations; returns (examples, Counter of skip reasons)."""
        return encode_each(self.encode, conversations, "tokenizing", progress)


def encode_each(encode, conversations, desc, progress=True):
    """[encode(messages) for each conversation] less those that raise SkipRow, under a tqdm bar
    named `desc`; returns (examples, Counter of skip reasons)."""
    from tqdm.auto import tqdm

    # One bar per machine: under torchrun / accelerate every process encodes the data.
    progress = progress and os.environ.get("LOCAL_RANK", "0") == "0"

    examples, skipped = [], Counter()
    for messages in tqdm(conversations, desc=desc, disable=not progress, mininterval=2.0):
        try:
            examples.append(encode(messages))
        except SkipRow as exc:
            skipped[str(exc)] += 1
    return examples, skipped


def supervised_positions(labels):
    """(B, T - 1) bool for labels (B, T): True at position t when label t + 1 is supervised, i.e.
    where the model's output predicts a token it is trained on. `labels[:, 1:][mask]` are the
    targets and `logits[:, :-1][mask]` what predicts them, row-major: the order of every
    per-token tensor of the losses and of the teacher cache's rows."""
    return labels[:, 1:] != IGNORE_INDEX


def num_supervised_tokens(examples):
    """Supervised tokens over encoded examples (lists of labels, before collate)."""
    return sum(sum(1 for label in example["labels"] if label != IGNORE_INDEX)
               for example in examples)


def collate(examples, pad_token_id):
    """Right-pad a list of encoded examples into `input_ids`, `attention_mask`, `labels` tensors."""
    import torch

    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def encode_dataset(data_args, encoder, log=print, progress=True):
    """Load `data_args.dataset`, encode every usable conversation, and report what was skipped.

    `encoder` is a ChatEncoder or any object with its `encode_all(conversations, progress)` ->
    (examples, Counter of skip reasons) and `no_usable_hint` (cross_tokenizer.py's PairEncoder).
    A few bad rows are skipped with a counted warning; no usable row at all is a UserError.
    """
    from common.data import describe_skips, load_conversations

    conversations, skipped = load_conversations(data_args, require_reply=True)
    examples, encode_skipped = encoder.encode_all(conversations, progress=progress)
    skipped.update(encode_skipped)
    total = len(conversations) + sum(skipped.values()) - sum(encode_skipped.values())
    if skipped:
        log(f"warning: {describe_skips(skipped, total)}")
    if not examples:
        # Every reason a cut by --max-length gives names the flag (see the encoders' SkipRows).
        hint = (f"raise --max-length (now {data_args.max_length})"
                if any("--max-length" in reason for reason in skipped) else
                encoder.no_usable_hint)
        raise UserError(f"no usable example in {data_args.dataset} "
                        f"({describe_skips(skipped, total) or 'empty'}); {hint}")
    return examples


def encode_datasets(accelerator, encoder, data_args, train_args, held_out_data_args=None):
    """(training examples, --eval-dataset examples or None), each through encode_dataset, on the
    main process first so that the others reuse what it loaded. `held_out_data_args`: the
    DataArguments whose columns --eval-dataset is read with, when the training data's differ."""
    from common.args import eval_data_args

    with accelerator.main_process_first():
        examples = encode_dataset(data_args, encoder, log=accelerator.print)
        eval_examples = encode_dataset(eval_data_args(held_out_data_args or data_args, train_args),
                                       encoder, log=accelerator.print) \
            if train_args.eval_dataset else None
    return examples, eval_examples
