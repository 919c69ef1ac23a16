"""cross_tokenizer.py: offset alignment across unlike tokenizers, the ULD loss, and the script.

The pair: the tiny setup's teacher (byte-level BPE, Llama-3-style template with BOS, a dated system
prompt and trimmed content) and a Mistral student with a SentencePiece-style tokenizer (Metaspace,
byte fallback) and a ChatML template (no BOS, content as is).
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from common.align import (align_spans, aligned_partners, check_offsets, encode_pair,
                          encode_with_reply_offsets, shared_vocabulary, token_bytes)
from common.chat import IGNORE_INDEX, ChatEncoder, encode_dataset, render
from common.errors import UserError, run_cli
from common.losses import shared_vocab_kl, uld_loss
from conftest import run_script

HARD_REPLY = ("Crème brûlée — naïve café. 東京タワー、ソウル 🙂👍🏽🇫🇷 1234567 + 89 = 1234656.   "
              "Many   spaces\tand\ttabs\n\nnew line 3.14159")


@pytest.fixture(scope="module")
def chatml_student(tiny, tmp_path_factory):
    from examples.tiny_setup import build_chatml_student

    return build_chatml_student(tmp_path_factory.mktemp("chatml"))


@pytest.fixture(scope="module")
def tokenizers(tiny, chatml_student):
    teacher = AutoTokenizer.from_pretrained(tiny / "teacher")
    student = AutoTokenizer.from_pretrained(chatml_student)
    # transformers may rebuild a tokenizer from the model type; this one must load as built.
    assert type(student.backend_tokenizer.pre_tokenizer).__name__ == "Metaspace"
    assert student.convert_ids_to_tokens(student("é", add_special_tokens=False)["input_ids"]) \
        == ["▁", "<0xC3>", "<0xA9>"]
    return teacher, student


def encoders(tokenizers, max_length=512):
    teacher, student = tokenizers
    return ChatEncoder(student, max_length), ChatEncoder(teacher, max_length)


def conversation(*replies):
    messages = []
    for k, reply in enumerate(replies):
        messages += [{"role": "user", "content": f"Question {k}?"},
                     {"role": "assistant", "content": reply}]
    return messages


# --- alignment ----------------------------------------------------------------------------------

def reply_relative_offsets(tokenizer, messages, reply):
    """Offsets of every token of the rendered conversation, relative to the (last) reply text."""
    text = render(tokenizer, messages)
    reply_start = text.rfind(reply.strip())
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [(a - reply_start, b - reply_start) for a, b in offsets["offset_mapping"]]


@pytest.mark.parametrize("reply", [HARD_REPLY, "Plain ASCII: 42 apples,  7 pears.", "東京🙂"])
def test_every_student_token_gets_an_overlapping_teacher_partner(tokenizers, reply):
    teacher, student = tokenizers
    messages = conversation(reply)
    pair = encode_pair(*encoders(tokenizers), messages)
    reference = ChatEncoder(student, 512).encode(messages)
    # every reply token (and the end of turn) the student would be trained on has a partner
    assert pair["labels"] == reference["labels"]
    student_offsets = reply_relative_offsets(student, messages, reply)
    teacher_offsets = reply_relative_offsets(teacher, messages, reply)
    length = len(reply.strip())
    pairs = 0
    for position, label in enumerate(pair["labels"]):
        if label == IGNORE_INDEX:
            continue
        partner = pair["teacher_positions"][position]
        (a, b), (c, d) = student_offsets[position], teacher_offsets[partner]
        if a >= length:  # the end-of-turn tokens of the two templates pair with each other
            assert pair["input_ids"][position] == ChatEncoder(student, 512).end_of_turn_token_id
            assert pair["teacher_input_ids"][partner] == \
                ChatEncoder(teacher, 512).end_of_turn_token_id
        else:
            assert max(a, c) < min(b, d), (student.convert_ids_to_tokens(label), (a, b),
                                           teacher.convert_ids_to_tokens(
                                               pair["teacher_input_ids"][partner]), (c, d))
        pairs += 1
    assert pairs == sum(1 for label in reference["labels"] if label != IGNORE_INDEX)


def test_reply_offsets_agree_with_chat_encoder_on_the_dataset(tiny, tokenizers):
    """The alignment's own encoding supervises exactly what ChatEncoder supervises."""
    rows = [json.loads(line) for line in (tiny / "train.jsonl").read_text().splitlines()]
    for tokenizer in tokenizers:
        encoder = ChatEncoder(tokenizer, 512)
        for row in rows[:16] + [{"messages": conversation(HARD_REPLY, " padded reply \n")}]:
            reference = encoder.encode(row["messages"])
            ours = encode_with_reply_offsets(encoder, row["messages"])
            assert ours["input_ids"] == reference["input_ids"]
            assert ours["labels"] == reference["labels"]


def test_whole_toy_dataset_aligns(tiny, tokenizers):
    rows = [json.loads(line) for line in (tiny / "train.jsonl").read_text().splitlines()]
    student_encoder, teacher_encoder = encoders(tokenizers)
    for row in rows:
        pair = encode_pair(student_encoder, teacher_encoder, row["messages"])
        assert sum(label != IGNORE_INDEX for label in pair["labels"]) == pair["num_reply_tokens"]


def test_multi_turn_partners_stay_in_their_own_reply(tokenizers):
    teacher, _ = tokenizers
    messages = conversation("first answer 11", "second answer 22")
    pair = encode_pair(*encoders(tokenizers), messages)
    teacher_text = render(teacher, messages)
    offsets = teacher(teacher_text, add_special_tokens=False,
                      return_offsets_mapping=True)["offset_mapping"]
    second_reply_start = teacher_text.find("second answer")
    student_reply_of = []
    for position, label in enumerate(pair["labels"]):
        if label != IGNORE_INDEX:
            partner_start = offsets[pair["teacher_positions"][position]][0]
            student_reply_of.append(partner_start >= second_reply_start)
    # the student's first reply tokens pair with the teacher's first reply, then the second's
    assert student_reply_of == sorted(student_reply_of) and any(student_reply_of) \
        and not all(student_reply_of)


def test_replies_cut_differently_by_max_length(tokenizers):
    """The teacher's prompt is longer, so --max-length cuts its reply first: student tokens past
    the teacher's cut have no partner and are not trained on; the others still align."""
    teacher, student = tokenizers
    messages = conversation(HARD_REPLY)
    full = encode_pair(*encoders(tokenizers), messages)
    teacher_reply_start = next(p for p, label in enumerate(
        ChatEncoder(teacher, 512).encode(messages)["labels"]) if label != IGNORE_INDEX)
    max_length = teacher_reply_start + 10
    cut = encode_pair(*encoders(tokenizers, max_length), messages)
    assert len(cut["teacher_input_ids"]) == max_length
    aligned = [p for p, label in enumerate(cut["labels"]) if label != IGNORE_INDEX]
    assert 0 < len(aligned) < sum(1 for label in full["labels"] if label != IGNORE_INDEX)
    assert all(cut["teacher_positions"][p] < max_length for p in aligned)
    # the pairs that survive are the pairs of the uncut run
    assert all(cut["teacher_positions"][p] == full["teacher_positions"][p] for p in aligned[:-1])
    # and student reply tokens beyond the teacher's cut are left out
    student_reply = [p for p, label in enumerate(
        ChatEncoder(student, max_length).encode(messages)["labels"]) if label != IGNORE_INDEX]
    assert len(student_reply) > len(aligned)


def test_a_dataset_is_encoded_in_pairs_with_skips_counted_and_no_usable_row_refused(
        tokenizers, tmp_path):
    """cross_tokenizer.py reads its data through common.chat.encode_dataset with a PairEncoder:
    the pairs are encode_pair's, skipped rows are counted in one warning, and a dataset with no
    usable row is one UserError whose advice fits the cause."""
    from common.args import DataArguments
    from cross_tokenizer import PairEncoder

    teacher, _ = tokenizers
    good, no_reply = conversation("Paris, 42."), [{"role": "user", "content": "Hello?"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in [good, no_reply, good]))
    warnings = []
    examples = encode_dataset(DataArguments(dataset=str(path)), PairEncoder(*encoders(tokenizers)),
                              log=warnings.append, progress=False)
    assert examples == [encode_pair(*encoders(tokenizers), good)] * 2
    assert warnings == ["warning: skipped 1 of 3 rows: 1 no non-empty assistant reply"]

    only_no_reply = tmp_path / "no_reply.jsonl"
    only_no_reply.write_text(json.dumps({"messages": no_reply}) + "\n")
    with pytest.raises(UserError, match=r"no usable example in .*no_reply.jsonl \(skipped 1 of 1 "
                       r"rows: 1 no non-empty assistant reply\); check that rows hold non-empty "
                       r"assistant replies$"):
        encode_dataset(DataArguments(dataset=str(only_no_reply)),
                       PairEncoder(*encoders(tokenizers)), log=lambda message: None)

    # the teacher's longer prompt fills --max-length before its reply starts
    teacher_reply_start = next(p for p, label in enumerate(
        ChatEncoder(teacher, 512).encode(good)["labels"]) if label != IGNORE_INDEX)
    with pytest.raises(UserError, match=rf"no usable example .*--max-length.*; raise --max-length "
                       rf"\(now {teacher_reply_start}\)$"):
        encode_dataset(DataArguments(dataset=str(path), max_length=teacher_reply_start),
                       PairEncoder(*encoders(tokenizers, teacher_reply_start)),
                       log=lambda message: None)


def test_whitespace_before_the_reply_does_not_shift_the_alignment(tiny):
    """A Llama-2-style student template writes "[/INST] 42": its '▁' before the reply is
    supervised (the model writes it), yet the reply's own tokens keep their partners: '4' with
    the teacher's '4', never with the one after it."""
    from examples.toy_assets import build_sentencepiece_tokenizer

    student = build_sentencepiece_tokenizer(["What is 12 + 30?", "12 + 30 = 42."], 40)
    student.chat_template = (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}[INST] {{ message['content'] | trim }} [/INST]"
        "{% else %} {{ message['content'] | trim }} {{ eos_token }}{% endif %}{% endfor %}")
    teacher = AutoTokenizer.from_pretrained(tiny / "teacher")
    messages = [{"role": "user", "content": "What is 12 + 30?"},
                {"role": "assistant", "content": "42"}]
    pair = encode_pair(ChatEncoder(student, 512), ChatEncoder(teacher, 512), messages)
    student_tokens = student.convert_ids_to_tokens(pair["input_ids"])
    teacher_tokens = teacher.convert_ids_to_tokens(pair["teacher_input_ids"])
    partners = {student_tokens[j]: teacher_tokens[pair["teacher_positions"][j]]
                for j, label in enumerate(pair["labels"]) if label != IGNORE_INDEX}
    digits = {k: v for k, v in partners.items() if k in ("4", "2")}
    assert digits == {"4": "4", "2": "2"}, partners


def test_whitespace_led_reply_merged_with_the_header_newline_keeps_a_teacher_partner():
    """A reply starting with whitespace under a template whose generation prompt ends in "\n"
    (ChatML, no trim): the student's first reply token is "\n " ('ĊĠ', the header's newline and
    the reply's first space). The trimming teacher has no such token; the student's is paired
    with the teacher's first reply token rather than left out of training."""
    from examples.tiny_setup import (CHAT_TEMPLATE, CHATML_TEMPLATE, build_bpe_tokenizer,
                                     toy_conversations)

    rows = toy_conversations(80)
    teacher = build_bpe_tokenizer(rows)  # "<|/header|>\n{{ content | trim }}"
    # Trained on text where "\n " is frequent, so that it is one token, as in real vocabularies.
    student = build_bpe_tokenizer(rows + [{"messages": [{"role": "user",
                                                         "content": "x\n  y " * 50}]}])
    student.chat_template = CHATML_TEMPLATE.replace("<|im_start|>", "<|header|>").replace(
        "<|im_end|>", "<|end_of_turn|>")
    assert teacher.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "What is 12 + 30?"},
                {"role": "assistant", "content": "  12 + 30 = 42."}]
    pair = encode_pair(ChatEncoder(student, 512), ChatEncoder(teacher, 512), messages)
    student_tokens = student.convert_ids_to_tokens(pair["input_ids"])
    teacher_tokens = teacher.convert_ids_to_tokens(pair["teacher_input_ids"])
    aligned = [(student_tokens[j], teacher_tokens[pair["teacher_positions"][j]])
               for j, label in enumerate(pair["labels"]) if label != IGNORE_INDEX]
    assert len(aligned) == pair["num_reply_tokens"]  # every student reply token has a partner
    assert aligned[:3] == [("ĊĠ", "12"), ("Ġ12", "12"), ("Ġ+", "Ġ+")]


def test_align_spans_rules():
    # closest end among overlapping teacher tokens; ties broken by the closest start
    assert align_spans([(0, 2)], [(0, 1), (1, 3)]) == [0]
    assert align_spans([(0, 5)], [(0, 1), (1, 4), (4, 9)]) == [1]
    # the closest end overall would be a token that does not overlap: never chosen
    assert align_spans([(4, 5)], [(1, 3), (3, 10)]) == [1]
    # bytes of one character: k-th student byte -> k-th teacher byte, the last when fewer
    assert align_spans([(2, 3)] * 3, [(0, 2), (2, 3), (2, 3)]) == [1, 2, 2]
    assert align_spans([(2, 3)] * 3, [(0, 2), (2, 3)]) == [1, 1, 1]
    assert align_spans([(2, 3)], [(0, 2), (2, 3), (2, 3), (2, 3)]) == [1]
    # text before the reply only the student has (-1 alone) pairs with the teacher's first token
    assert align_spans([(-1, 0), (-1, 2), (2, 3)], [(0, 2), (2, 3)]) == [0, 0, 1]
    # nothing overlaps (teacher cut short)
    assert align_spans([(0, 1), (5, 7)], [(0, 2)]) == [0, -1]
    assert align_spans([(0, 1)], []) == [-1]


def test_check_offsets_refuses_a_tokenizer_without_offsets(tokenizers):
    class SlowTokenizer:
        is_fast = False

    with pytest.raises(UserError, match="character offsets"):
        check_offsets(SlowTokenizer(), "student")
    check_offsets(tokenizers[0], "teacher")
    check_offsets(tokenizers[1], "student")


def test_shared_vocabulary_maps_both_space_and_byte_conventions(tokenizers):
    teacher, student = tokenizers
    student_ids, teacher_ids = shared_vocabulary(student, teacher)
    assert len(student_ids) == len(set(student_ids)) == len(teacher_ids) == len(set(teacher_ids))
    shared = dict(zip(student.convert_ids_to_tokens(student_ids),
                      teacher.convert_ids_to_tokens(teacher_ids)))
    assert shared["<0xC3>"] == "Ã"  # the byte 0xC3 in both conventions
    assert any(s.startswith("▁") and t == "Ġ" + s[1:] for s, t in shared.items())
    assert not set(shared) & set(student.all_special_tokens)
    student_bytes, teacher_bytes = token_bytes(student), token_bytes(teacher)
    assert all(student_bytes[s] == teacher_bytes[t] for s, t in zip(student_ids, teacher_ids))


def test_hybrid_shares_the_same_strings_for_replace_rule_and_metaspace_tokenizers(tiny,
                                                                                   tmp_path):
    """Llama-2 / Mistral / Gemma conversions mark spaces with Replace rules, not a Metaspace
    pre-tokenizer: their '▁have' is b" have" all the same, shared with the teacher's 'Ġhave'."""
    from examples.tiny_setup import build_sentencepiece_tokenizer, toy_conversations

    rows = toy_conversations(80)  # the rows build() trains on
    teacher = AutoTokenizer.from_pretrained(tiny / "teacher")
    shared = {}
    for space_rule in ("metaspace", "replace"):
        build_sentencepiece_tokenizer(rows, space_rule=space_rule).save_pretrained(
            tmp_path / space_rule)
        student = AutoTokenizer.from_pretrained(tmp_path / space_rule)
        shared[space_rule] = shared_vocabulary(student, teacher)
    spec = json.loads(student.backend_tokenizer.to_str())  # the Replace-rule twin, as saved
    assert spec["pre_tokenizer"] is None and "Replace" in json.dumps(spec["normalizer"])
    assert shared["replace"] == shared["metaspace"]
    words = [t for t in teacher.convert_ids_to_tokens(shared["replace"][1]) if t.startswith("Ġ")]
    assert len(words) > 20


# --- the loss -----------------------------------------------------------------------------------

def permuted(logits, seed):
    generator = torch.Generator().manual_seed(seed)
    return logits[:, torch.randperm(logits.shape[-1], generator=generator)]


@pytest.mark.parametrize("kind", ["kl", "l1"])
@pytest.mark.parametrize("top_k", [0, 5, 64])
def test_uld_is_zero_for_identical_distributions_and_ignores_token_identity(kind, top_k):
    torch.manual_seed(0)
    logits = torch.randn(6, 40) * 3
    assert torch.allclose(uld_loss(logits, logits, kind, top_k), torch.zeros(6), atol=1e-6)
    # the same distribution in another vocabulary order: still zero
    assert torch.allclose(uld_loss(permuted(logits, 1), logits, kind, top_k), torch.zeros(6),
                          atol=1e-6)
    # a permutation of either vocabulary leaves the loss unchanged
    teacher = torch.randn(6, 55) * 2
    loss = uld_loss(logits, teacher, kind, top_k)
    assert (loss > 0).all()
    assert torch.allclose(uld_loss(permuted(logits, 2), teacher, kind, top_k), loss, atol=1e-6)
    assert torch.allclose(uld_loss(logits, permuted(teacher, 3), kind, top_k), loss, atol=1e-6)


def test_uld_l1_matches_the_original_zero_padded_form():
    torch.manual_seed(1)
    student, teacher = torch.randn(4, 30), torch.randn(4, 45)
    for temperature in (1.0, 2.0):
        p_s = F.softmax(student / temperature, -1).sort(-1, descending=True).values
        p_t = F.softmax(teacher / temperature, -1).sort(-1, descending=True).values
        expected_full = (F.pad(p_s, (0, 15)) - p_t).abs().sum(-1)
        got = uld_loss(student, teacher, "l1", 0, temperature)
        assert torch.allclose(got, expected_full, atol=1e-6)
        assert torch.allclose(uld_loss(student, teacher, "l1", 10, temperature),
                              (p_s[:, :10] - p_t[:, :10]).abs().sum(-1), atol=1e-6)
        assert ((got >= 0) & (got <= 2)).all()


def test_uld_kl_matches_kl_div_on_renormalized_top_k():
    torch.manual_seed(2)
    student, teacher = torch.randn(4, 30), torch.randn(4, 45)
    for top_k, ranks in [(8, 8), (0, 30), (100, 30)]:
        p_s = F.softmax(student, -1).sort(-1, descending=True).values[:, :ranks]
        p_t = F.softmax(teacher, -1).sort(-1, descending=True).values[:, :ranks]
        p_s, p_t = p_s / p_s.sum(-1, keepdim=True), p_t / p_t.sum(-1, keepdim=True)
        expected = F.kl_div(p_s.log(), p_t, reduction="none").sum(-1)  # KL(teacher ‖ student)
        assert torch.allclose(uld_loss(student, teacher, "kl", top_k), expected, atol=1e-5)
    # direction: KL(q_t ‖ q_s) is not symmetric
    assert not torch.allclose(uld_loss(student[:, :30], teacher[:, :30], "kl", 8),
                              uld_loss(teacher[:, :30], student[:, :30], "kl", 8))


@pytest.mark.parametrize("kind", ["kl", "l1"])
def test_uld_gradients_are_finite_and_reach_the_student(kind):
    torch.manual_seed(3)
    student = torch.randn(5, 20, requires_grad=True)
    teacher = torch.randn(5, 33)
    teacher[:, :10] = -math.inf  # a masked teacher vocabulary must not produce NaN
    loss = uld_loss(student, teacher, kind, 8, temperature=2.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
    empty = uld_loss(torch.zeros(0, 20), torch.zeros(0, 33), kind, 8)
    assert empty.shape == (0,) and empty.sum() == 0  # an all-masked batch gives 0, not NaN
    with pytest.raises(ValueError):
        uld_loss(student, teacher, "sideways")


def test_shared_vocab_kl_is_an_exact_kl_over_the_shared_tokens():
    torch.manual_seed(4)
    student, teacher = torch.randn(3, 12), torch.randn(3, 20)
    student_ids, teacher_ids = torch.tensor([0, 3, 5, 7]), torch.tensor([10, 2, 4, 19])
    p_s = F.softmax(student[:, student_ids], -1)
    p_t = F.softmax(teacher[:, teacher_ids], -1)
    expected = (p_t * (p_t.log() - p_s.log())).sum(-1)
    got = shared_vocab_kl(student, teacher, student_ids, teacher_ids)
    assert torch.allclose(got, expected, atol=1e-6)
    same = teacher.clone()
    same[:, teacher_ids] = student[:, student_ids]
    assert torch.allclose(shared_vocab_kl(student, same, student_ids, teacher_ids),
                          torch.zeros(3), atol=1e-6)


# --- the causal shift ---------------------------------------------------------------------------

def select_aligned_logits(student_logits, teacher_logits, labels, teacher_positions):
    """Rows of both models' logits that predict each aligned student token and its partner: the
    full-logits form of what make_loss_fn gathers through common.align.aligned_partners.

    student_logits (B, Ts, Vs), teacher_logits (B, Tt, Vt), labels (B, Ts) with -100 where not
    supervised, teacher_positions (B, Ts) = teacher position of the partner of each student token.
    A token at position j is predicted by the logits at j - 1, on both sides: student row j - 1
    and teacher row teacher_positions[j] - 1. Returns (student (N, Vs), teacher (N, Vt), student
    target ids (N,), batch row of each (N,), teacher position of each partner (N,)).
    """
    mask, batch_rows, partner_positions = aligned_partners(labels, teacher_positions)
    student_selected = student_logits[:, :-1][mask]
    teacher_selected = teacher_logits[batch_rows, partner_positions - 1]
    return student_selected, teacher_selected, labels[:, 1:][mask], batch_rows, partner_positions


def test_logits_one_position_before_each_aligned_token_are_compared(tokenizers):
    """Row k of both models' logits predicts token k + 1; pairing row k with token k must fail."""
    from cross_tokenizer import collate_pairs

    teacher, student = tokenizers
    examples = [encode_pair(*encoders(tokenizers), conversation(reply))
                for reply in ["東京 42", "Crème  brûlée"]]
    batch = collate_pairs(examples, student.pad_token_id, teacher.pad_token_id)
    # logits whose first entry names their own (row, position)
    rows, student_length = batch["input_ids"].shape
    student_logits = torch.zeros(rows, student_length, 3)
    student_logits[..., 0] = torch.arange(rows)[:, None] * 1000 + torch.arange(student_length)
    teacher_length = batch["teacher_input_ids"].shape[1]
    teacher_logits = torch.zeros(rows, teacher_length, 3)
    teacher_logits[..., 0] = torch.arange(rows)[:, None] * 1000 + torch.arange(teacher_length)
    student_selected, teacher_selected, targets, batch_rows, partners = select_aligned_logits(
        student_logits, teacher_logits, batch["labels"], batch["teacher_positions"])
    expected_student, expected_teacher, expected_targets = [], [], []
    for row in range(rows):
        for position in range(student_length):
            if batch["labels"][row, position] != IGNORE_INDEX:
                expected_student.append(row * 1000 + position - 1)
                expected_teacher.append(row * 1000 + batch["teacher_positions"][row, position] - 1)
                expected_targets.append(int(batch["input_ids"][row, position]))
    assert student_selected[:, 0].long().tolist() == expected_student
    assert teacher_selected[:, 0].long().tolist() == expected_teacher
    assert targets.tolist() == expected_targets
    assert (batch["teacher_input_ids"][batch_rows, partners] != teacher.pad_token_id).all()


def test_an_oracle_student_has_zero_cross_entropy_in_the_loss(tokenizers):
    """A student that reads the next input token gets CE ≈ 0 only if logits at k predict k + 1."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from cross_tokenizer import CrossTokenizerArguments, collate_pairs, make_loss_fn

    teacher, student = tokenizers

    class Oracle(torch.nn.Module):
        def __init__(self, vocab_size):
            super().__init__()
            self.vocab_size = vocab_size

        def forward(self, input_ids, attention_mask):
            next_ids = torch.roll(input_ids, -1, dims=1)
            return SimpleNamespace(logits=F.one_hot(next_ids, self.vocab_size).float() * 50)

    examples = [encode_pair(*encoders(tokenizers), conversation("東京 42 cafés"))]
    batch = collate_pairs(examples, student.pad_token_id, teacher.pad_token_id)
    args = CrossTokenizerArguments(alpha=0.5, top_k=4, hybrid=False)
    loss_fn = make_loss_fn(Accelerator(cpu=True), Oracle(len(teacher)), len(student),
                           len(teacher), args)
    loss, stats = loss_fn(Oracle(len(student)), batch)
    assert stats["ce"] < 1e-6 and stats["uld"] < 1e-6 and loss < 1e-6


# --- the memory-bounded loss: output layers at aligned positions only, a chunk at a time -------

def uld_setup(tiny, chatml_student, tokenizers, hybrid):
    """The fixtures' teacher (Llama, 37 padded vocabulary rows) and student (Mistral), a batch of
    three conversations and, for --hybrid, make_loss_fn's shared-vocabulary tables."""
    from transformers import AutoModelForCausalLM

    from common.models import real_vocab_size
    from cross_tokenizer import collate_pairs

    teacher_tokenizer, student_tokenizer = tokenizers
    teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher").eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(chatml_student)
    examples = [encode_pair(*encoders(tokenizers), conversation(reply)) for reply in
                [HARD_REPLY, "Plain ASCII: 42 apples,  7 pears.", "東京 42 cafés"]]
    batch = collate_pairs(examples, student_tokenizer.pad_token_id, teacher_tokenizer.pad_token_id)
    vocab_sizes = (real_vocab_size(student_tokenizer), real_vocab_size(teacher_tokenizer))
    assert teacher.get_output_embeddings().out_features > vocab_sizes[1]  # padded rows to drop
    shared = None
    if hybrid:
        student_ids, teacher_ids = shared_vocabulary(student_tokenizer, teacher_tokenizer)
        student_to_teacher = torch.full((vocab_sizes[0],), -1, dtype=torch.long)
        student_to_teacher[torch.tensor(student_ids)] = torch.tensor(teacher_ids)
        shared = (student_to_teacher, torch.tensor(student_ids), torch.tensor(teacher_ids))
    return teacher, student, batch, vocab_sizes, shared


def uld_step(loss_fn, student, batch):
    student.zero_grad(set_to_none=True)
    loss, stats = loss_fn(student, batch)
    loss.backward()
    return loss.detach(), stats, {n: p.grad.clone() for n, p in student.named_parameters()}


def full_logits_uld_float64(teacher, student, batch, vocab_sizes, args, shared):
    """What cross_tokenizer.py computed before it chunked: both models' full logits at every
    position, then the rows that predict each aligned token and its partner, on float64 copies.
    Returns (loss, stats, student gradients) like uld_step, and the size of the log-probabilities
    the loss combines (see tests/float32_error.py)."""
    import copy

    from common.losses import cross_entropy
    from float32_error import log_prob_scale

    teacher, student = copy.deepcopy(teacher).double(), copy.deepcopy(student).double()
    student_logits = student(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).logits
    teacher_logits = teacher(input_ids=batch["teacher_input_ids"],
                             attention_mask=batch["teacher_attention_mask"]).logits
    student_rows, teacher_rows, targets, rows, partners = select_aligned_logits(
        student_logits, teacher_logits, batch["labels"], batch["teacher_positions"])
    student_rows, teacher_rows = student_rows[:, :vocab_sizes[0]], teacher_rows[:, :vocab_sizes[1]]
    temperature = args.loss_temperature
    uld = uld_loss(student_rows, teacher_rows, args.uld_loss, args.top_k,
                   temperature) * temperature ** 2
    ce = cross_entropy(student_rows, targets)
    stats = {"uld": uld.sum(), "ce": ce.sum()}
    distill = uld.sum()
    if shared is not None:
        same = shared[0][targets] == batch["teacher_input_ids"][rows, partners]
        exact = shared_vocab_kl(student_rows[same], teacher_rows[same], shared[1], shared[2],
                                temperature) * temperature ** 2
        stats.update(hybrid=exact.sum(), same_string=same.sum().double())
        distill = distill + exact.sum()
    loss = (1 - args.alpha) * distill + args.alpha * ce.sum()  # as token_level.py weighs them
    loss.backward()
    scale = max(temperature ** 2 * log_prob_scale(student_rows, teacher_rows,
                                                  temperature=temperature),
                log_prob_scale(student_rows))
    return ((loss.detach(), {k: v.detach() for k, v in stats.items()},
             {n: p.grad for n, p in student.named_parameters()}), scale)


def assert_uld_matches_float64(got, reference, teacher, student, batch, vocab_sizes, hybrid):
    """Within float32 error of the float64 full-logits loss: both models' forward paths, the loss
    over the larger vocabulary (twice with --hybrid's second divergence), the student's path and
    the loss again on the way back, and each weight's gradient summed over the batch's tokens.
    Per aligned position CE combines one log-probability, ULD and the hybrid KL two each."""
    from float32_error import assert_close, decoder_roundings, loss_roundings

    (expected_loss, expected_stats, expected_grads), scale = reference
    num_positions = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    teacher_path = decoder_roundings(teacher.config, batch["teacher_input_ids"].shape[1])
    student_path = decoder_roundings(student.config, batch["input_ids"].shape[1])
    loss_path = (2 if hybrid else 1) * loss_roundings(max(vocab_sizes), num_positions)
    forward = teacher_path + student_path + loss_path
    backward = forward + student_path + loss_path + batch["input_ids"].numel()
    assert_close(got[0], expected_loss, forward, 5 * num_positions * scale, "loss")
    for name, value in expected_stats.items():
        assert_close(got[1][name], value, forward, 2 * num_positions * scale, name)
    for name, grad in expected_grads.items():
        assert_close(got[2][name], grad, backward, what=f"gradient of {name}")


@pytest.mark.parametrize("uld_kind, top_k, temperature, alpha, hybrid", [
    ("kl", 5, 1.0, 0.5, False), ("kl", 0, 2.0, 1 / 3, True),
    ("l1", 5, 1.0, 0.0, True), ("l1", 0, 0.7, 0.25, False)])
def test_chunked_loss_equals_the_full_logits_loss(tiny, chatml_student, tokenizers, uld_kind,
                                                  top_k, temperature, alpha, hybrid):
    """Loss, statistics and student gradients of the chunked path (5 aligned positions per chunk:
    several chunks, the last one short) and of --loss-chunk-size -1, in float32, within float32
    error of the old full-logits computation in float64."""
    from accelerate import Accelerator

    from cross_tokenizer import CrossTokenizerArguments, make_loss_fn

    teacher, student, batch, vocab_sizes, shared = uld_setup(tiny, chatml_student, tokenizers,
                                                             hybrid)
    settings = dict(uld_loss=uld_kind, top_k=top_k, loss_temperature=temperature, alpha=alpha,
                    hybrid=hybrid)
    reference = full_logits_uld_float64(teacher, student, batch, vocab_sizes,
                                        CrossTokenizerArguments(**settings), shared)
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) % 5 != 0
    for loss_chunk_size in (5, -1):
        args = CrossTokenizerArguments(**settings, loss_chunk_size=loss_chunk_size)
        loss_fn = make_loss_fn(Accelerator(cpu=True), teacher, *vocab_sizes, args, shared)
        got = uld_step(loss_fn, student, batch)
        assert_uld_matches_float64(got, reference, teacher, student, batch, vocab_sizes, hybrid)
        assert not any(value.requires_grad for value in got[1].values())
    if hybrid:
        assert 0 < reference[0][1]["same_string"] < int((batch["labels"] != IGNORE_INDEX).sum())


def soft_capped(model):
    """`model` with its logits capped after the output layer (as Gemma 2 does), with no config
    field saying so: only the probe of common/distill.py can tell."""
    def cap(module, inputs, output):
        output.logits = 2.0 * torch.tanh(output.logits / 2.0)
        return output

    model.register_forward_hook(cap)
    return model


@pytest.mark.parametrize("capped", ["teacher", "student"])
def test_soft_capped_output_layers_keep_their_full_logits(tiny, chatml_student, tokenizers,
                                                          capped, capsys):
    """A model whose logits are not its output layer applied to its hidden states is scored on
    its own full logits (one warning); the other model is still chunked; the loss is unchanged."""
    from accelerate import Accelerator

    from cross_tokenizer import CrossTokenizerArguments, make_loss_fn

    teacher, student, batch, vocab_sizes, shared = uld_setup(tiny, chatml_student, tokenizers,
                                                             True)
    soft_capped(teacher if capped == "teacher" else student)
    settings = dict(top_k=5, alpha=0.5, hybrid=True)
    reference = full_logits_uld_float64(teacher, student, batch, vocab_sizes,
                                        CrossTokenizerArguments(**settings), shared)
    args = CrossTokenizerArguments(**settings, loss_chunk_size=5)
    loss_fn = make_loss_fn(Accelerator(cpu=True), teacher, *vocab_sizes, args, shared)
    for _ in range(2):
        got = uld_step(loss_fn, student, batch)
        assert_uld_matches_float64(got, reference, teacher, student, batch, vocab_sizes, True)
    assert capsys.readouterr().out.count(f"warning: the {capped}'s output layer") == 1


def test_bf16_mixed_precision_keeps_both_output_layers_chunked(tiny, chatml_student, tokenizers,
                                                               capsys):
    """Under --mixed-precision bf16 the teacher's forward runs under autocast; probed outside it,
    its float32 logits missed the bf16 rebuilt ones and it fell back to full logits, warning."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from cross_tokenizer import CrossTokenizerArguments, make_loss_fn

    teacher, student, batch, vocab_sizes, shared = uld_setup(tiny, chatml_student, tokenizers,
                                                             True)
    try:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        student = accelerator.prepare(student)  # its forward runs under autocast, as in training
        results = []
        for loss_chunk_size in (5, -1):
            args = CrossTokenizerArguments(top_k=5, hybrid=True, loss_chunk_size=loss_chunk_size)
            loss_fn = make_loss_fn(accelerator, teacher, *vocab_sizes, args, shared)
            results.append(uld_step(loss_fn, student, batch))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert "warning: the" not in capsys.readouterr().out
    (chunked, _, _), (full, _, _) = results
    assert torch.allclose(chunked, full, rtol=2e-2)  # bf16 matmuls on both sides


def test_no_positions_by_vocabulary_tensor_is_ever_made(monkeypatch):
    """At a 262,144-token vocabulary full logits at every position were the largest tensors of a
    step: now both output layers see aligned positions only, a chunk at a time, in the forward
    and in the recomputing backward."""
    import common.chunked
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    from cross_tokenizer import CrossTokenizerArguments, make_loss_fn
    from test_chunked import LargestTensor

    def llama(vocab, seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128))

    student_vocab, teacher_vocab, chunk_size = 3000, 5000, 4
    monkeypatch.setattr(common.chunked, "auto_chunk_size", lambda vocab_size: chunk_size)
    teacher, student = llama(teacher_vocab, 0).eval().requires_grad_(False), llama(student_vocab, 1)
    generator = torch.Generator().manual_seed(0)
    rows, length = 2, 64
    input_ids = torch.randint(0, student_vocab, (rows, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :16] = IGNORE_INDEX  # the prompt
    # a teacher one token longer, each student token partnered with the teacher token after it
    teacher_positions = torch.arange(1, length + 1).expand(rows, length).clone()
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "labels": labels, "teacher_positions": teacher_positions,
             "teacher_input_ids": torch.randint(0, teacher_vocab, (rows, length + 1),
                                                generator=generator),
             "teacher_attention_mask": torch.ones(rows, length + 1, dtype=torch.long)}
    num_aligned = int((labels[:, 1:] != IGNORE_INDEX).sum())
    for top_k in (8, 0):  # 0 sorts whole rows of both vocabularies
        loss_fn = make_loss_fn(Accelerator(cpu=True), teacher, student_vocab, teacher_vocab,
                               CrossTokenizerArguments(top_k=top_k))
        with LargestTensor() as largest:
            loss, _ = loss_fn(student, batch)
            loss.backward()
        # one chunk's rows of the larger vocabulary (a sort keeps values and indices, autograd a
        # few more), and the weights and their gradients: far below aligned positions x vocab
        assert largest.numel <= max(4 * chunk_size * teacher_vocab, teacher_vocab * 16)
        assert largest.numel < num_aligned * teacher_vocab / 4


# --- the script ---------------------------------------------------------------------------------

def base_args(tiny, student, output_dir, *extra):
    return ["--teacher", tiny / "teacher", "--student", student, "--dataset",
            tiny / "train.jsonl", "--output-dir", output_dir, "--batch-size", "4",
            "--log-steps", "4", *extra]


@pytest.mark.slow
def test_end_to_end_across_vocabularies(tiny, chatml_student, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    result = run_script("cross_tokenizer.py", *base_args(tiny, chatml_student, out, "--top-k", "16",
                                                         "--max-steps", "12", "--eval-dataset",
                                                         tiny / "test.jsonl", "--eval-steps", "6"))
    assert "student saved to" in result.stdout
    assert "100.0%" in result.stdout  # every student reply token of the toy data has a partner
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MistralForCausalLM"
    saved = AutoTokenizer.from_pretrained(out)
    original = AutoTokenizer.from_pretrained(chatml_student)
    assert saved.get_vocab() == original.get_vocab()
    assert saved.chat_template == original.chat_template
    assert (saved.eos_token, saved.pad_token) == (original.eos_token, original.pad_token)
    for text in [HARD_REPLY, "What is 3 + 4?"]:
        assert saved(text)["input_ids"] == original(text)["input_ids"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval_loss" in row]
    rows = [row for row in rows if "loss" in row]
    assert [row["step"] for row in evals] == [6, 12] and all(row["eval_uld"] >= 0 for row in evals)
    assert [row["step"] for row in rows] == [4, 8, 12]
    assert all(math.isfinite(row["loss"]) and row["uld"] >= 0 for row in rows)
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["method"] == "cross_tokenizer" and run_config["finished"] is True
    assert run_config["cross_tokenizer"]["top_k"] == 16
    before = load_file(chatml_student / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)


@pytest.mark.slow
def test_end_to_end_l1_hybrid_full_vocabulary(tiny, chatml_student, tmp_path):
    out = tmp_path / "out"
    result = run_script("cross_tokenizer.py", *base_args(
        tiny, chatml_student, out, "--uld-loss", "l1", "--top-k", "0", "--hybrid",
        "--max-steps", "4", "--batch-size", "2", "--grad-accum", "2", "--alpha", "0",
        "--loss-temperature", "2"))
    assert "token strings shared by both vocabularies" in result.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0 < rows[-1]["same_string"] <= 1  # a fraction of the aligned positions
    assert rows[-1]["hybrid"] >= 0 and 0 <= rows[-1]["uld"] <= 2 * 2 ** 2  # l1 <= 2, times T²
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["uld"] + rows[-1]["hybrid"], rel=1e-4)


def run_main(argv):
    import cross_tokenizer

    with pytest.raises(SystemExit) as exit_info:
        run_cli(cross_tokenizer.main, [str(a) for a in argv])
    return exit_info.value.code


BAD_INPUTS = {
    "unknown uld loss": (["--uld-loss", "wasserstein"], "invalid choice"),
    "negative top-k": (["--top-k", "-1"], "--top-k must be >= 0"),
    "zero temperature": (["--loss-temperature", "0"], "--loss-temperature must be > 0"),
    "negative alpha": (["--alpha", "-0.5"], "--alpha must be in [0, 1]"),
    "alpha above 1": (["--alpha", "2"], "--alpha must be in [0, 1]"),
    "removed --distill-weight": (["--distill-weight", "1"], "--distill-weight was removed: "
                                 "--alpha is now the cross-entropy weight in [0, 1]"),
    "bad loss chunk size": (["--loss-chunk-size", "-2"], "--loss-chunk-size must be"),
    "missing teacher path": (["--teacher", "./no/such/teacher"], "does not exist"),
    "missing student path": (["--student", "/no/such/student"], "does not exist"),
    "missing dataset": (["--dataset", "/no/such/train.jsonl"], "does not exist"),
    "nothing fits max length": (["--max-length", "8"], "--max-length"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_one_line_error(tiny, chatml_student, tmp_path, capsys, case):
    override, expected = BAD_INPUTS[case]
    out = tmp_path / "out"
    assert run_main(base_args(tiny, chatml_student, out, "--max-steps", "2") + override) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]  # (a progress bar may precede)
    assert errors == [err[-1]] and expected in err[-1], err
    assert not any(line.startswith("Traceback") for line in err)
    assert not out.exists(), "a refused run must write nothing"


def test_help_documents_the_method_flags():
    result = run_script("cross_tokenizer.py", "--help")
    for flag in ["--uld-loss", "--top-k", "--loss-temperature", "--alpha", "--hybrid",
                 "--teacher", "--student", "--max-length", "--output-dir"]:
        assert flag in result.stdout, flag
    assert "--distill-weight" not in result.stdout  # removed: refused with the conversion
