"""Cross-tokenizer alignment: which teacher token each student reply token is compared with.

Teacher and student never see each other's token ids. Each renders the conversation with its own
chat template and tokenizes it with its own tokenizer (`encode_with_reply_offsets`); what the two
share is the text of every assistant reply. Every reply token gets a span in *reply coordinates*:
character offsets (the fast tokenizer's offset mapping) relative to the start of the stripped reply
text, which is identical on both sides whatever the templates put around it. Two virtual
characters absorb what differs:

    -1      everything before the reply text (a leading space merged into the first word, a
            reply's leading whitespace that only one template keeps)
    L       (L = length of the stripped reply) everything after it: trailing whitespace that only
            one template keeps, and the end-of-turn text (<|eot_id|>, <|im_end|>, </s> ...), so
            the two templates' end-of-turn tokens align with each other

`align_spans` then pairs every student token with the teacher token, among those whose span
overlaps it, whose end offset is closest (ties: closest start, then order within a group of tokens
with identical offsets, which is how a multi-byte character split into byte tokens looks on either
side). The teacher's first reply token also covers -1, so leading whitespace only the student keeps
has a partner. A student token no teacher token overlaps (its reply was cut shorter on the teacher
side by --max-length) has no partner and is left out of training.

`encode_pair` puts the two together for one conversation: the student's `input_ids`, `labels` (-100
except on student reply tokens that have a partner) and `teacher_positions` (the teacher position of
each student token's partner; the logits one position earlier, on both sides, are compared), plus
the teacher's `teacher_input_ids`.

The last section maps the tokens that are the same byte string in both vocabularies (`Ġ12` and
`▁12` are both b" 12"; `Ã` and `<0xC3>` are both b"\\xc3"), for the --hybrid exact KL.
"""

import json
import re
from bisect import bisect_left, bisect_right

from common.chat import IGNORE_INDEX, SkipRow, render, supervised_positions, supervised_tokens
from common.errors import UserError

_OFFSET_PROBE = "Offsets probe: héllo 東京 🙂 42"


def check_offsets(tokenizer, what):
    """Refuse a tokenizer that cannot report character offsets (alignment is built on them)."""
    hint = (f"cross-tokenizer alignment needs character offsets; load the {what}'s fast tokenizer "
            f"(tokenizer.json, with the `tokenizers` package installed)")
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{what} tokenizer {type(tokenizer).__name__} is not a fast tokenizer and "
                        f"gives no character offsets; {hint}")
    try:
        offsets = tokenizer(_OFFSET_PROBE, add_special_tokens=False,
                            return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError) as exc:
        raise UserError(f"{what} tokenizer {type(tokenizer).__name__} gives no character offsets "
                        f"({type(exc).__name__}); {hint}") from None
    if not offsets or max(end for _, end in offsets) == 0:
        raise UserError(f"{what} tokenizer {type(tokenizer).__name__} returns empty character "
                        f"offsets; {hint}")


def reply_regions(text, spans, messages):
    """(core_start, core_end) in `text` of each assistant reply's stripped content.

    `spans` are ChatEncoder.assistant_spans(text, messages) with supervise="all": one per assistant
    message, whose content_start is where the content (or, for a template that trims, the stripped
    content) was found. Not its start: that may include whitespace the template writes before the
    reply, which is no part of the reply's own coordinates.
    """
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    if len(replies) != len(spans):
        raise SkipRow("assistant replies not all found in the rendered template")
    regions = []
    for span, content in zip(spans, replies):
        start = span.content_start
        lead = len(content) - len(content.lstrip()) if text.startswith(content, start) else 0
        regions.append((start + lead, start + lead + len(content.strip())))
    return regions


def encode_with_reply_offsets(encoder, messages):
    """One tokenizer's view of a conversation, with reply-relative offsets.

    Returns {'input_ids', 'labels', 'reply_index', 'reply_spans'} (lists, one entry per token, cut
    at encoder.max_length): labels follow ChatEncoder.encode's rule exactly (a token overlapping an
    assistant reply or its end of turn is supervised); reply_index is the assistant turn a
    supervised token belongs to (-1 elsewhere); reply_spans its (start, end) in reply coordinates
    (see the module docstring; (0, 0) where reply_index is -1).
    """
    if encoder.supervise != "all":
        raise ValueError("cross-tokenizer alignment needs every assistant turn (supervise='all')")
    tokenizer = encoder.tokenizer
    text = render(tokenizer, messages)
    spans = encoder.assistant_spans(text, messages)
    if not spans:
        raise SkipRow("no assistant reply")
    regions = reply_regions(text, spans, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoding["input_ids"][:encoder.max_length]
    offsets = encoding["offset_mapping"][:encoder.max_length]
    labels = [IGNORE_INDEX] * len(input_ids)
    reply_index = [-1] * len(input_ids)
    reply_spans = [(0, 0)] * len(input_ids)
    for position, span_index in supervised_tokens(offsets, spans):
        labels[position] = input_ids[position]
        reply_index[position] = span_index
        start, end = offsets[position]
        core_start, core_end = regions[span_index]
        length = core_end - core_start
        reply_spans[position] = (min(max(start - core_start, -1), length),
                                 min(max(end - core_start, 0), length + 1))
    if all(label == IGNORE_INDEX for label in labels):
        raise SkipRow("too long for --max-length")
    return {"input_ids": input_ids, "labels": labels, "reply_index": reply_index,
            "reply_spans": reply_spans}


def align_spans(student_spans, teacher_spans):
    """For each student span, the index of its teacher partner in `teacher_spans`, or -1.

    Both lists hold (start, end) spans of one reply in reply coordinates, in token order (starts
    and ends non-decreasing). Candidates are the teacher spans that overlap the student span; the
    partner is the one whose end is closest, then whose start is closest; within a group of
    identical teacher spans (bytes of one character) the k-th student token with identical offsets
    takes the k-th teacher token of the group (the last one when the group is shorter). The
    first teacher span counts as starting at -1 or before.
    """
    teacher_starts = [start for start, _ in teacher_spans]
    if teacher_starts:
        # The teacher's first reply token also covers the virtual character before the reply:
        # whitespace only the student keeps there, alone or merged with the header's newline
        # ("\n " under a template whose generation prompt ends in "\n"), is predicted at the same
        # point of the text, and pairs with it instead of being left out.
        teacher_starts[0] = min(teacher_starts[0], -1)
    teacher_ends = [end for _, end in teacher_spans]
    partners, previous_span, rank = [], None, 0
    for student_start, student_end in student_spans:
        rank = rank + 1 if (student_start, student_end) == previous_span else 0
        previous_span = (student_start, student_end)
        first = bisect_right(teacher_ends, student_start)  # first teacher span ending after start
        last = bisect_left(teacher_starts, student_end) - 1  # last teacher span starting before end
        if first > last:
            partners.append(-1)
            continue
        best = min(range(first, last + 1),
                   key=lambda i: (abs(teacher_ends[i] - student_end),
                                  abs(teacher_starts[i] - student_start), i))
        group_end = best
        while group_end + 1 <= last and teacher_spans[group_end + 1] == teacher_spans[best]:
            group_end += 1
        partners.append(min(best + rank, group_end))
    return partners


def encode_pair(student_encoder, teacher_encoder, messages):
    """Both tokenizers' encodings of one conversation, aligned; see the module docstring.

    Returns {'input_ids', 'labels', 'teacher_input_ids', 'teacher_positions', 'num_reply_tokens'}:
    labels are -100 except on student reply tokens with a teacher partner; teacher_positions[j] is
    the position in teacher_input_ids of the partner of student token j (-1 where labels[j] is
    -100); num_reply_tokens counts the student's reply tokens, aligned or not. Raises SkipRow when
    no student token has a partner.
    """
    student = encode_with_reply_offsets(student_encoder, messages)
    teacher = encode_with_reply_offsets(teacher_encoder, messages)
    teacher_by_reply = {}
    for position, reply in enumerate(teacher["reply_index"]):
        if reply >= 0:
            teacher_by_reply.setdefault(reply, []).append(position)
    student_by_reply = {}
    for position, reply in enumerate(student["reply_index"]):
        if reply >= 0:
            student_by_reply.setdefault(reply, []).append(position)

    labels = [IGNORE_INDEX] * len(student["input_ids"])
    teacher_positions = [-1] * len(student["input_ids"])
    for reply, student_tokens in student_by_reply.items():
        teacher_tokens = teacher_by_reply.get(reply, [])
        partners = align_spans([student["reply_spans"][p] for p in student_tokens],
                               [teacher["reply_spans"][p] for p in teacher_tokens])
        for position, partner in zip(student_tokens, partners):
            # Position 0 has no logits before it, on either side (never a reply token in practice).
            if partner >= 0 and position > 0 and teacher_tokens[partner] > 0:
                labels[position] = student["labels"][position]
                teacher_positions[position] = teacher_tokens[partner]
    if all(label == IGNORE_INDEX for label in labels):
        raise SkipRow("no student reply token has a teacher partner (teacher cut by --max-length)")
    return {"input_ids": student["input_ids"], "labels": labels,
            "teacher_input_ids": teacher["input_ids"], "teacher_positions": teacher_positions,
            "num_reply_tokens": sum(len(tokens) for tokens in student_by_reply.values())}


def aligned_partners(labels, teacher_positions):
    """Where each aligned student token's prediction and its partner's are, on both sides.

    labels (B, Ts) with -100 where not supervised, teacher_positions (B, Ts) = teacher position of
    the partner of each student token. A token at position j is predicted by position j - 1, on
    both sides. Returns (mask (B, Ts - 1): the student positions that predict an aligned token,
    batch row of each (N,), teacher position of each partner (N,)); the partner is predicted at
    teacher position partner - 1 of the same batch row. N counts the mask's True entries in
    row-major order, the order of every per-token tensor of the loss.
    """
    import torch

    mask = supervised_positions(labels)
    batch_rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(mask)[mask]
    return mask, batch_rows, teacher_positions[:, 1:][mask]


# --- tokens that are the same string in both vocabularies (for --hybrid) -------------------------

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _gpt2_unicode_to_byte():
    """Inverse of GPT-2's bytes_to_unicode: the printable character ByteLevel uses for each byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    byte_values, characters, extra = printable[:], printable[:], 0
    for byte in range(256):
        if byte not in printable:
            byte_values.append(byte)
            characters.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(byte_values, characters)}


def _components(node):
    """Every component dict of a tokenizer.json pre_tokenizer/decoder tree."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _components(value)
    elif isinstance(node, list):
        for value in node:
            yield from _components(value)


def _swaps_space_and_marker(part):
    """A Replace(' ', '▁') normalizer or Replace('▁', ' ') decoder. Compared as strings, not
    searched for in json.dumps(part): that writes '▁' as '\\u2581'."""
    pattern = part.get("pattern") or {}
    return part.get("type") == "Replace" and {pattern.get("String"), part.get("content")} == {
        " ", "▁"}


def token_bytes(tokenizer):
    """The byte string each token id stands for (None for special tokens), shape [len(tokenizer)].

    Understands byte-level BPE ('Ġ' = space, every byte a printable character), SentencePiece
    conventions ('▁' = space, '<0xNN>' byte-fallback tokens) and plain vocabularies.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    parts = list(_components([spec.get("normalizer"), spec.get("pre_tokenizer"),
                              spec.get("decoder")]))
    byte_level = any(p.get("type") == "ByteLevel" for p in parts)
    metaspace = next((p.get("replacement", "▁") for p in parts if p.get("type") == "Metaspace"),
                     None)
    if metaspace is None and any(_swaps_space_and_marker(p) for p in parts):
        metaspace = "▁"  # Llama-2, Mistral, Gemma conversions: Replace rules, no Metaspace
    byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
    unicode_to_byte = _gpt2_unicode_to_byte() if byte_level else None
    added = {index: token for index, token in tokenizer.added_tokens_decoder.items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    result = [None] * len(tokenizer)
    for index, piece in enumerate(pieces):
        match = _BYTE_FALLBACK.match(piece or "")
        if byte_fallback and match:  # byte tokens, even where they were registered as special
            result[index] = bytes([int(match.group(1), 16)])
            continue
        if index in added:
            token = added[index]
            result[index] = None if token.special else str(token).encode("utf-8")
            continue
        if piece is None:
            continue
        if byte_level:
            if all(c in unicode_to_byte for c in piece):
                result[index] = bytes(unicode_to_byte[c] for c in piece)
            continue
        result[index] = (piece.replace(metaspace, " ") if metaspace else piece).encode("utf-8")
    return result


def shared_vocabulary(student_tokenizer, teacher_tokenizer):
    """(student_ids, teacher_ids): equal-length lists pairing tokens with the same byte string.

    Special tokens are left out. Where one vocabulary holds a byte string twice (e.g. 'A' and
    the byte-fallback '<0x41>'), the ordinary token is kept.
    """
    def by_bytes(tokenizer):
        table = {}
        strings = token_bytes(tokenizer)
        names = tokenizer.convert_ids_to_tokens(list(range(len(strings))))
        # Ordinary tokens first, so they win over byte-fallback duplicates.
        order = sorted(range(len(strings)),
                       key=lambda i: (bool(_BYTE_FALLBACK.match(names[i] or "")), i))
        for index in order:
            if strings[index]:  # None (special) and b"" are never shared
                table.setdefault(strings[index], index)
        return table

    student_table, teacher_table = by_bytes(student_tokenizer), by_bytes(teacher_tokenizer)
    shared = sorted(student_table.keys() & teacher_table.keys(), key=lambda b: student_table[b])
    return [student_table[b] for b in shared], [teacher_table[b] for b in shared]
