"""eval.py and common/generation.py: each metric against a hand-computed value on the tiny setup,
batched generation against a step-by-step greedy loop, and the CLI as a user runs it."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import eval as eval_script
from common.chat import DEFAULT_CHAT_TEMPLATE, ChatEncoder
from common.errors import UserError
from common.generation import Completion, cut_at_stop, generate, left_pad
from common.models import load_model, load_tokenizer
from examples.tiny_setup import build

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny_eval"))


@pytest.fixture(scope="session")
def student(tiny):
    return load_model(str(tiny / "student")).eval(), load_tokenizer(str(tiny / "student"))


@pytest.fixture(scope="session")
def teacher(tiny):
    return load_model(str(tiny / "teacher")).eval(), load_tokenizer(str(tiny / "teacher"))


def tiny_samples(tiny, max_samples=16):
    data_args = eval_script.EvalDataArguments(dataset=str(tiny / "test.jsonl"),
                                              max_samples=max_samples)
    return eval_script.load_samples(data_args, "answers")[0]


def hand_nll(model, tokenizer, conversations):
    """(summed NLL, token count) over supervised tokens: one unpadded forward per conversation,
    the log-probability of each supervised token read off a plain log-softmax."""
    encoder = ChatEncoder(tokenizer, max_length=1024)
    total, count = 0.0, 0
    for messages in conversations:
        example = encoder.encode(messages)
        with torch.no_grad():
            logits = model(torch.tensor([example["input_ids"]])).logits[0]
        log_probs = torch.log_softmax(logits[:, :len(tokenizer)].double(), dim=-1)
        for position in range(len(example["labels"]) - 1):
            target = example["labels"][position + 1]
            if target != -100:
                total -= log_probs[position, target].item()
                count += 1
    return total, count


# ---------------------------------------------------------------------------------------------
# Text metrics


def test_exact_match_normalization_and_answers_list():
    assert eval_script.normalize_answer("  The  Answer is\n42. ") == "the answer is 42"
    assert eval_script.normalize_answer("Yes!?") == "yes"
    assert eval_script.exact_match("Paris.", "paris") == 1.0
    assert eval_script.exact_match("The answer is 42", "42") == 0.0
    # An answers list replaces the reference: any of them counts, the reference does not.
    assert eval_script.exact_match(" 42 !", "Forty-two is the answer.", ["forty two", "42"]) == 1.0
    assert eval_script.exact_match("paris", "paris", ["Lyon"]) == 0.0
    assert eval_script.accepted_answers({"answers": "a"}, "answers") == ["a"]
    assert eval_script.accepted_answers({"answers": {"text": ["a", "b"]}}, "answers") == ["a", "b"]
    assert eval_script.accepted_answers({"answers": []}, "answers") is None
    assert eval_script.accepted_answers({}, "answers") is None


def test_rouge_l_on_known_pairs():
    # LCS("the cat on the mat", "the cat sat on the mat") = 5 words: P = 5/5, R = 5/6, F1 = 10/11.
    assert eval_script.rouge_l("the cat on the mat", "the cat sat on the mat") == \
        pytest.approx(10 / 11)
    # Reordering: LCS of "c a b" vs "a b c" is 2 → P = R = F1 = 2/3.
    assert eval_script.rouge_l("c a b", "a b c") == pytest.approx(2 / 3)
    assert eval_script.rouge_l("The Cat!", "the cat") == pytest.approx(1.0)
    assert eval_script.rouge_l("dog", "the cat") == 0.0
    # Non-Latin words are words too (rouge-score's default tokenizer would drop them).
    assert eval_script.rouge_l("привет мир", "привет друг") == pytest.approx(0.5)


def test_load_samples_prompt_is_everything_before_the_last_assistant_turn(tmp_path):
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                    {"role": "user", "content": "thanks"}]
    path = tmp_path / "multi.jsonl"
    path.write_text(json.dumps({"messages": conversation, "answers": ["four", "4"]}) + "\n"
                    + json.dumps({"prompt": "Capital of France?", "response": "Paris"}) + "\n"
                    + json.dumps({"messages": conversation[:1]}) + "\n")
    samples, skip_note = eval_script.load_samples(
        eval_script.EvalDataArguments(dataset=str(path)), "answers")
    assert len(samples) == 2 and skip_note.startswith("skipped 1 of 3 rows")
    assert samples[0].prompt_messages == conversation[:3]
    assert samples[0].reference == "4" and samples[0].answers == ["four", "4"]
    assert samples[0].messages == conversation
    assert samples[1].prompt_messages == [{"role": "user", "content": "Capital of France?"}]
    assert samples[1].reference == "Paris" and samples[1].answers is None


def test_load_samples_skips_and_counts_rows_no_model_could_read(tmp_path):
    """A lone surrogate crashed eval.py inside the tokenizer; replies before any question were
    scored as if answered. Both are skipped and counted; BOM and content parts are read."""
    good = {"messages": [{"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
                         {"role": "assistant", "content": "4"}]}
    path = tmp_path / "held_out.jsonl"
    path.write_text(json.dumps(good) + "\n"
                    + '{"prompt": "hi \\ud800", "response": "hello"}\n'
                    + json.dumps({"messages": [{"role": "assistant", "content": "4"},
                                               {"role": "user", "content": "2+2?"}]}) + "\n",
                    encoding="utf-8-sig")
    samples, skip_note = eval_script.load_samples(
        eval_script.EvalDataArguments(dataset=str(path)), "answers")
    assert [s.reference for s in samples] == ["4"]
    assert samples[0].prompt_messages == [{"role": "user", "content": "2+2?"}]
    assert skip_note == ("skipped 2 of 3 rows: 1 lone UTF-16 surrogate in the text, 1 no user "
                         "turn before any assistant reply")
    path.write_text('{"prompt": "hi \\ud800", "response": "hello"}\n')
    with pytest.raises(UserError, match="1 lone UTF-16 surrogate") as error:
        eval_script.load_samples(eval_script.EvalDataArguments(dataset=str(path)), "answers")
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# Forward-pass metrics


def test_perplexity_equals_exp_of_hand_computed_nll(tiny, student):
    model, tokenizer = student
    samples = tiny_samples(tiny)
    total, count = hand_nll(model, tokenizer, [s.messages for s in samples])
    eval_args = eval_script.EvalArguments(models=["s"], max_new_tokens=3, batch_size=5,
                                          no_progress=True)
    data_args = eval_script.EvalDataArguments(dataset=str(tiny / "test.jsonl"))
    result = eval_script.evaluate_model("student", model, tokenizer, samples, eval_args,
                                        data_args)
    assert result["scored_tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result["kl_to_teacher"] is None and result["top1_agreement"] is None
    assert 0.0 <= result["rouge_l"] <= 1.0 and 0.0 <= result["exact_match"] <= 1.0
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    assert result["generated_replies"] == 16 and result["tokens_per_second"] > 0


def test_every_reply_is_kept_with_its_scores(tiny, student):
    """--output holds each generated reply (not one example), so rows can be inspected; a prompt
    the template refuses keeps its place with reply None."""
    model, _ = student
    samples = tiny_samples(tiny, 6)
    samples[2].prompt_messages = [{"role": "tool", "content": "refused"}]
    tokenizer = load_tokenizer(str(tiny / "student"))
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}"
                               "{{ raise_exception('no tools') }}{% endif %}{{ m['content'] }}"
                               "{{ eos_token }}{% endfor %}")
    eval_args = eval_script.EvalArguments(models=["s"], max_new_tokens=3, batch_size=4,
                                          no_progress=True)
    data_args = eval_script.EvalDataArguments(dataset=str(tiny / "test.jsonl"))
    result = eval_script.evaluate_model("student", model, tokenizer, samples, eval_args,
                                        data_args)
    rows = result["replies"]
    assert [row["reference"] for row in rows] == [s.reference for s in samples]
    assert [row["prompt"] for row in rows] == [s.prompt_messages[-1]["content"] for s in samples]
    assert rows[2] == {"prompt": "refused", "reference": samples[2].reference, "reply": None,
                       "exact_match": None, "rouge_l": None}
    scored = [row for k, row in enumerate(rows) if k != 2]
    assert all(isinstance(row["reply"], str) for row in scored)
    assert result["generated_replies"] == 5 and result["example_reply"] == rows[0]["reply"]
    assert result["rouge_l"] == pytest.approx(sum(row["rouge_l"] for row in scored) / 5)
    assert result["exact_match"] == pytest.approx(sum(row["exact_match"] for row in scored) / 5)


def test_teacher_against_itself_has_zero_kl_and_full_top1_agreement(tiny, teacher):
    model, tokenizer = teacher
    _, examples = eval_script.encode_for(tokenizer, tiny_samples(tiny, 6), 1024, "teacher")
    totals = eval_script.score_references(model, examples, len(tokenizer), 4,
                                          tokenizer.pad_token_id, teacher=model, progress=False)
    assert totals["tokens"] > 0
    assert totals["kl"] / totals["tokens"] == pytest.approx(0.0, abs=1e-6)
    assert totals["top1"] == totals["tokens"]


def test_logits_are_made_only_at_scored_positions_a_chunk_at_a_time(tiny, student, teacher,
                                                                    monkeypatch):
    """At a 262,144-token vocabulary full logits at every position were the largest tensors of
    eval.py: both output layers now see scored positions only, a chunk of positions per call."""
    import common.chunked

    monkeypatch.setattr(common.chunked, "auto_chunk_size", lambda vocab_size: 4)
    (model, tokenizer), (teacher_model, _) = student, teacher
    _, examples = eval_script.encode_for(tokenizer, tiny_samples(tiny, 6), 1024, "student")
    calls = []

    def record(layer, inputs, output):  # the positions each real projection is applied to
        if output.shape[-1] == layer.out_features:  # not the hidden-state pass-through
            calls.append(tuple(inputs[0].shape[:-1]))

    hooks = [m.get_output_embeddings().register_forward_hook(record)
             for m in (model, teacher_model)]
    try:
        totals = eval_script.score_references(model, examples, len(tokenizer), 4,
                                              tokenizer.pad_token_id, teacher=teacher_model,
                                              progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    chunks = [shape[0] for shape in calls if len(shape) == 1]
    assert max(chunks) == 4 and sum(chunks) == 2 * totals["tokens"]
    # Whole sequences reach an output layer only in the 16-token probe that checks it is plain.
    assert all(shape[0] * shape[1] <= 16 for shape in calls if len(shape) == 2)


def hand_agreement(student_model, teacher_model, tokenizer, conversations):
    """(mean KL(p_teacher ‖ p_student), top-1 agreement) over supervised positions: unpadded
    forwards, real vocabulary only (the tiny teacher's embedding is padded by 37 rows), the KL
    from torch's own kl_div."""
    encoder = ChatEncoder(tokenizer, 1024)
    kl_sum, agree, count = 0.0, 0, 0
    for messages in conversations:
        example = encoder.encode(messages)
        ids = torch.tensor([example["input_ids"]])
        with torch.no_grad():
            student_logits = student_model(ids).logits[0, :-1, :len(tokenizer)].double()
            teacher_logits = teacher_model(ids).logits[0, :-1, :len(tokenizer)].double()
        supervised = torch.tensor(example["labels"][1:]) != -100
        student_log_probs = torch.log_softmax(student_logits[supervised], -1)
        teacher_log_probs = torch.log_softmax(teacher_logits[supervised], -1)
        kl_sum += F.kl_div(student_log_probs, teacher_log_probs, log_target=True,
                           reduction="sum").item()
        agree += (student_log_probs.argmax(-1) == teacher_log_probs.argmax(-1)).sum().item()
        count += int(supervised.sum())
    return kl_sum / count, agree / count


def test_kl_and_top1_agreement_match_a_hand_computation(tiny, student, teacher):
    student_model, tokenizer = student
    teacher_model, teacher_tokenizer = teacher
    samples = tiny_samples(tiny, 6)
    assert teacher_model.get_output_embeddings().weight.shape[0] > len(tokenizer)
    hand_kl, hand_top1 = hand_agreement(student_model, teacher_model, teacher_tokenizer,
                                        [s.messages for s in samples])

    _, teacher_examples = eval_script.encode_for(teacher_tokenizer, samples, 1024, "teacher")
    context = eval_script.TeacherContext("teacher", teacher_model, teacher_tokenizer,
                                         teacher_examples)
    eval_args = eval_script.EvalArguments(models=["s"], batch_size=4, no_progress=True)
    assert eval_script.tokenizer_mismatch("student", tokenizer, context) is None
    kl, top1 = eval_script.teacher_agreement(student_model, tokenizer, context, eval_args)
    assert kl == pytest.approx(hand_kl, rel=1e-4) and kl > 0
    assert top1 == pytest.approx(hand_top1)

    # A student with another chat template is compared on the teacher's rendering all the same.
    other_template = load_tokenizer(str(tiny / "student"))
    other_template.chat_template = DEFAULT_CHAT_TEMPLATE
    data_args = eval_script.EvalDataArguments(dataset=str(tiny / "test.jsonl"))
    result = eval_script.evaluate_model("student", student_model, other_template, samples,
                                        eval_args, data_args, context)
    assert result["kl_to_teacher"] == pytest.approx(hand_kl, rel=1e-4)
    assert result["top1_agreement"] == pytest.approx(hand_top1)


def test_teacher_agreement_is_null_with_a_reason_for_another_vocabulary(tiny, teacher):
    teacher_model, teacher_tokenizer = teacher
    sp_path = str(tiny / "student_sp")
    context = eval_script.TeacherContext("teacher", teacher_model, teacher_tokenizer, [])
    note = eval_script.tokenizer_mismatch("student_sp", load_tokenizer(sp_path), context)
    assert "different vocabularies" in note and note.startswith("KL and top-1 agreement are n/a")
    assert "cross_tokenizer.py" not in note  # training advice, not a scoring note
    eval_args = eval_script.EvalArguments(models=["s"], max_new_tokens=2, no_progress=True)
    data_args = eval_script.EvalDataArguments(dataset=str(tiny / "test.jsonl"))
    result = eval_script.evaluate_model("student_sp", load_model(sp_path), load_tokenizer(sp_path),
                                        tiny_samples(tiny, 4), eval_args, data_args, context)
    assert result["kl_to_teacher"] is None and result["top1_agreement"] is None
    assert result["teacher_agreement_note"] == note


# ---------------------------------------------------------------------------------------------
# Generation


def sharpened(model):
    """A copy whose logits are 50x larger: random tiny models are nearly uniform, and argmax
    near-ties would make batched vs step-by-step comparisons depend on float rounding."""
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    return model


def greedy_step_by_step(model, prompt, steps):
    """The slow reference: no cache, no padding, one full forward per new token."""
    ids, new = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            next_id = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        new.append(next_id)
        ids.append(next_id)
    return new


def test_left_pad_and_cut_at_stop():
    input_ids, attention_mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_stop([4, 9, 2, 9], {2, 3}) == Completion([4, 9], "stop")
    assert cut_at_stop([4, 9], {2}) == Completion([4, 9], "length")
    assert cut_at_stop([2, 4], {2}).num_generated == 1


def test_batched_generation_matches_greedy_and_stops_at_stop_tokens(student):
    model, tokenizer = student
    model = sharpened(model)
    texts = ["hi", "What is 12 + 30?", "Reverse the list: apple, pear, plum, grape, lemon, mango",
             "Count the words: melon melon"]
    prompts = [tokenizer(tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False)["input_ids"] for text in texts]
    assert len({len(p) for p in prompts}) == len(prompts)  # padding really happens
    references = [greedy_step_by_step(model, prompt, 6) for prompt in prompts]

    # batch_size 3: one padded batch of three plus a batch of one, sorted by length then restored
    never_generated = next(i for i in range(len(tokenizer))
                           if all(i not in ref for ref in references))
    completions = generate(model, tokenizer, prompts, max_new_tokens=6,
                           stop_token_ids=[never_generated], batch_size=3, progress=False)
    assert [c.token_ids for c in completions] == references
    assert all(c.finish_reason == "length" for c in completions)

    # Stopping at the first token of row 0 leaves it empty; other rows are cut at that token.
    stop = references[0][0]
    completions = generate(model, tokenizer, prompts, max_new_tokens=6, stop_token_ids=[stop],
                           batch_size=3, progress=False)
    assert completions[0] == Completion([], "stop")
    for completion, reference in zip(completions, references):
        expected = reference[:reference.index(stop)] if stop in reference else reference
        assert completion.token_ids == expected
        assert completion.finish_reason == ("stop" if stop in reference else "length")
    assert model.training is False


# ---------------------------------------------------------------------------------------------
# Report and arguments


def test_markdown_table_marks_teacher_and_best_student():
    row = dict(parameters=1000, perplexity=5.0, rouge_l=0.5, exact_match=0.25, kl_to_teacher=0.1,
               top1_agreement=0.6, tokens_per_second=100.0, teacher_agreement_note=None)
    results = [{**row, "model": "big", "teacher": True, "perplexity": 2.0, "kl_to_teacher": 0.0,
                "top1_agreement": 1.0},
               {**row, "model": "a", "teacher": False},
               {**row, "model": "b", "teacher": False, "perplexity": 4.0, "rouge_l": 0.4,
                "kl_to_teacher": None, "top1_agreement": None,
                "teacher_agreement_note": "different vocabularies"}]
    lines = eval_script.markdown_table(results).splitlines()
    teacher_line, a_line, b_line = lines[2:5]
    assert teacher_line.startswith("| big (teacher) |") and "**" not in teacher_line
    # lower perplexity is better (b), higher ROUGE-L is better (a); ties are not marked
    assert "| **4.000** |" in b_line and "| 5.000 |" in a_line
    assert "| **0.500** |" in a_line and "| 0.400 |" in b_line
    assert "**0.250**" not in a_line
    assert "n/a" in b_line and "- b: different vocabularies" in lines
    assert "| 1.00K |" in a_line
    # Without a teacher, the teacher-agreement columns are left out.
    no_teacher = [{**r, "kl_to_teacher": None, "top1_agreement": None} for r in results[1:]]
    assert "KL to teacher" not in eval_script.markdown_table(no_teacher)


def test_dataset_split_defaults_to_test():
    eval_args, data_args = eval_script.parse_args(
        (eval_script.EvalArguments, eval_script.EvalDataArguments),
        ["--models", "a", "b", "--dataset", "some/hub-dataset"])
    assert eval_args.models == ["a", "b"] and data_args.dataset_split == "test"


def test_plot_without_matplotlib_is_a_one_line_error(monkeypatch, tiny, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(UserError, match="pip install matplotlib"):
        eval_script.main(["--models", str(tiny / "student"), "--dataset",
                          str(tiny / "test.jsonl"), "--plot", str(tmp_path / "chart.png")])


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    row = dict(parameters=1000, perplexity=5.0, rouge_l=0.5, exact_match=0.25, kl_to_teacher=None,
               top1_agreement=None, tokens_per_second=100.0, teacher_agreement_note=None)
    eval_script.plot_results([{**row, "model": "a", "teacher": True},
                              {**row, "model": "runs/b", "teacher": False}], tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------
# The CLI, as a user runs it


def run_eval(*args):
    return subprocess.run([sys.executable, "eval.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_end_to_end(tiny, student, teacher, tmp_path):
    output = tmp_path / "r.json"
    students = [str(tiny / "student"), str(tiny / "student_sp")]
    done = run_eval("--models", *students, "--teacher", tiny / "teacher",
                    "--dataset", tiny / "test.jsonl", "--max-samples", 16,
                    "--max-new-tokens", 12, "--output", output)
    assert done.returncode == 0, done.stderr
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 3  # header + teacher + two students
    # rows are named by the directories' last parts (--names), the JSON keeps the whole paths
    assert table[1].startswith("| teacher (teacher) |")
    assert table[2].startswith("| student |") and table[3].startswith("| student_sp |")

    report = json.loads(output.read_text())
    assert report["settings"]["max_samples"] == 16 and report["settings"]["max_new_tokens"] == 12
    assert report["settings"]["num_conversations"] == 16
    results = {r["name"]: r for r in report["results"]}
    assert set(results) == {"teacher", "student", "student_sp"}
    assert [r["model"] for r in report["results"]] == [str(tiny / "teacher"), *students]
    for result in results.values():
        for key in ("perplexity", "rouge_l", "exact_match", "kl_to_teacher", "top1_agreement",
                    "tokens_per_second", "parameters"):
            assert key in result
        assert result["perplexity"] > 1.0 and 0.0 <= result["rouge_l"] <= 1.0
        assert result["generated_tokens"] <= 16 * 12
    assert all(len(result["replies"]) == 16 for result in results.values())
    assert results["teacher"]["kl_to_teacher"] == 0.0
    assert results["teacher"]["top1_agreement"] == 1.0
    assert results["student"]["kl_to_teacher"] > 0.0
    assert 0.0 <= results["student"]["top1_agreement"] <= 1.0
    assert results["student_sp"]["kl_to_teacher"] is None
    assert results["student_sp"]["top1_agreement"] is None
    assert "different vocabularies" in results["student_sp"]["teacher_agreement_note"]
    # The subprocess's numbers are the hand-computed ones.
    model, tokenizer = student
    conversations = [s.messages for s in tiny_samples(tiny)]
    total, count = hand_nll(model, tokenizer, conversations)
    assert results["student"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    total, count = hand_nll(teacher[0], teacher[1], conversations)  # padded embedding rows
    assert results["teacher"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    hand_kl, hand_top1 = hand_agreement(model, teacher[0], tokenizer, conversations)
    assert results["student"]["kl_to_teacher"] == pytest.approx(hand_kl, rel=1e-4)
    assert results["student"]["top1_agreement"] == pytest.approx(hand_top1)


def assert_one_line_error(done, *fragments):
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.slow
def test_cli_model_that_cannot_be_loaded(tiny, tmp_path):
    dataset = tiny / "test.jsonl"
    assert_one_line_error(run_eval("--models", tiny / "student", tmp_path / "missing",
                                   "--dataset", dataset), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_eval("--models", tmp_path / "empty", "--dataset", dataset),
                          "could not be loaded")


@pytest.mark.slow
def test_cli_dataset_without_assistant_replies(tiny, tmp_path):
    user_only = tmp_path / "user_only.jsonl"
    user_only.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert_one_line_error(run_eval("--models", tiny / "student", "--dataset", user_only),
                          "assistant reply")
    prompts_only = tmp_path / "prompts.jsonl"
    prompts_only.write_text(json.dumps({"prompt": "hi"}) + "\n")
    assert_one_line_error(run_eval("--models", tiny / "student", "--dataset", prompts_only),
                          "response")


def test_cli_max_samples_zero(tiny):
    assert_one_line_error(run_eval("--models", tiny / "student", "--dataset",
                                   tiny / "test.jsonl", "--max-samples", 0), "--max-samples")


def test_prompts_beyond_the_context_are_left_out(tiny, student, capsys):
    model, tokenizer = student
    samples = tiny_samples(tiny)
    lengths = [len(p) for p in eval_script.prompt_ids(tokenizer, samples)]
    room = sorted(lengths)[len(lengths) // 2]
    assert min(lengths) <= room < max(lengths)
    eval_args = eval_script.EvalArguments(models=["m"], max_new_tokens=4, batch_size=8)
    encoder = ChatEncoder(tokenizer, 1024)
    original = model.config.max_position_embeddings
    model.config.max_position_embeddings = room + 4
    try:
        replies, *_ = eval_script.generate_replies(model, tokenizer, encoder, samples, eval_args)
        too_long = sum(length > room for length in lengths)
        assert [r is None for r in replies] == [length > room for length in lengths]
        assert f"warning: {too_long} of {len(samples)} prompts" in capsys.readouterr().err
        model.config.max_position_embeddings = min(lengths) + 3  # no prompt fits
        with pytest.raises(UserError, match="--max-new-tokens"):
            eval_script.generate_replies(model, tokenizer, encoder, samples, eval_args)
    finally:
        model.config.max_position_embeddings = original


@pytest.mark.slow
def test_rows_scored_before_a_failing_model_are_kept(tiny, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny / "student", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    output = tmp_path / "r.json"
    output.write_text("earlier results\n")
    done = run_eval("--models", tiny / "student", broken, "--dataset", tiny / "test.jsonl",
                    "--max-samples", 4, "--max-new-tokens", 4, "--output", output)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert output.read_text() == "earlier results\n"  # --output untouched
    partial = json.loads((tmp_path / "r.partial.json").read_text())
    assert [Path(r["model"]).name for r in partial["results"]] == ["student"]
    assert "broken" in partial["settings"]["partial"]
    assert any(line.startswith("| student |") for line in done.stdout.splitlines())
    # a later run that completes removes the stale partial rows
    assert run_eval("--models", tiny / "student", "--dataset", tiny / "test.jsonl",
                    "--max-samples", 4, "--max-new-tokens", 4, "--output", output).returncode == 0
    assert not (tmp_path / "r.partial.json").exists() and json.loads(output.read_text())["results"]


def test_scoring_is_cut_to_the_model_context(student):
    model, _ = student
    original = model.config.max_position_embeddings
    try:
        model.config.max_position_embeddings = 16
        assert eval_script.scoring_length(model, 1024) == 16
        assert eval_script.scoring_length(model, 8) == 8
    finally:
        model.config.max_position_embeddings = original


# ---------------------------------------------------------------------------------------------
# Row names and resuming from --output


def test_short_names_are_last_parts_made_unique():
    assert eval_script.short_names(["runs/kd", "Qwen/Qwen2.5-0.5B-Instruct", "runs/seq/"]) == \
        ["kd", "Qwen2.5-0.5B-Instruct", "seq"]
    # two students exported to .../final: the parent folder tells them apart, only for them
    assert eval_script.short_names(["runs/kd/final", "runs/seq/final", "runs/x"]) == \
        ["kd/final", "seq/final", "x"]
    assert eval_script.short_names(["a/b/m", "c/b/m"]) == ["a/b/m", "c/b/m"]
    assert eval_script.short_names(["runs/a", "runs/a"]) == ["a", "a (2)"]
    # a given name stays as given; a default name that collides with it grows instead
    assert eval_script.short_names(["t/teacher", "runs/kd"], [None, "teacher"]) == \
        ["t/teacher", "teacher"]
    assert eval_script.short_names(["."])[0] == Path.cwd().name


def test_names_must_match_the_models_one_to_one():
    parse = lambda *argv: eval_script.parse_args(  # noqa: E731
        (eval_script.EvalArguments, eval_script.EvalDataArguments), list(argv))
    assert parse("--models", "a", "b", "--names", "x", "y")[0].names == ["x", "y"]
    with pytest.raises(UserError, match="--names has 1 names for 2 --models"):
        parse("--models", "a", "b", "--names", "x")
    with pytest.raises(UserError, match="'x' twice"):
        parse("--models", "a", "b", "--names", "x", "x")


def counting_model_loads(monkeypatch):
    """Patch eval.py's model loader to record which models it loads."""
    import common.models

    loaded = []
    real_load_model = common.models.load_model

    def load_model(name, *args, **kwargs):
        loaded.append(Path(name).name)
        return real_load_model(name, *args, **kwargs)

    monkeypatch.setattr(common.models, "load_model", load_model)
    return loaded


def test_rows_scored_with_the_same_settings_are_reused(tiny, tmp_path, monkeypatch, capsys):
    """A second run with the same settings loads no model and gives the same rows, even for a
    model whose directory is gone since; another setting, or a retrained model, is scored again."""
    import shutil

    kd = tmp_path / "kd"
    shutil.copytree(tiny / "student", kd)
    output = tmp_path / "r.json"
    common = ["--teacher", tiny / "teacher", "--dataset", tiny / "test.jsonl", "--max-samples", 4,
              "--batch-size", 4, "--no-progress", "--output", output]

    def argv(*extra):
        return [str(a) for a in ["--models", tiny / "student", kd, *common, *extra]]

    loaded = counting_model_loads(monkeypatch)
    first = eval_script.main(argv("--max-new-tokens", 3))
    assert loaded == ["teacher", "student", "kd"]
    capsys.readouterr()

    loaded.clear()
    shutil.rmtree(kd)  # scoring it now would fail: its row can only come from the file
    second = eval_script.main(argv("--max-new-tokens", 3, "--names", "base", "distilled"))
    assert loaded == []
    err = capsys.readouterr().err
    assert err.count("reusing the row of") == 3 and "(its directory is gone)" in err
    assert [r["name"] for r in second] == ["teacher", "base", "distilled"]
    assert [{**r, "name": None} for r in second] == [{**r, "name": None} for r in first]
    assert [r["name"] for r in json.loads(output.read_text())["results"]] == \
        ["teacher", "base", "distilled"]

    shutil.copytree(tiny / "student", kd)
    (kd / "config.json").write_text((kd / "config.json").read_text() + " ")  # "retrained"
    eval_script.main(argv("--max-new-tokens", 3))
    assert loaded == ["teacher", "kd"]  # the teacher, needed for kd's KL; student reused
    assert "scoring kd" in capsys.readouterr().err

    loaded.clear()
    eval_script.main(argv("--max-new-tokens", 2))  # a setting that changes the numbers
    assert loaded == ["teacher", "student", "kd"]
    assert "other settings (max_new_tokens)" in capsys.readouterr().err
    loaded.clear()
    eval_script.main(argv("--max-new-tokens", 2, "--rescore"))
    assert loaded == ["teacher", "student", "kd"]


def test_rows_of_a_failed_run_are_reused(tiny, tmp_path, monkeypatch):
    """The rows a failed run wrote to NAME.partial.json are not scored again."""
    output = tmp_path / "r.json"
    argv = ["--models", str(tiny / "student"), str(tiny / "student_sp"), "--dataset",
            str(tiny / "test.jsonl"), "--max-samples", "4", "--max-new-tokens", "2",
            "--no-progress", "--output", str(output)]
    import common.models

    real_load_model = common.models.load_model

    def failing_load_model(name, *args, **kwargs):
        if name.endswith("student_sp"):
            raise KeyboardInterrupt
        return real_load_model(name, *args, **kwargs)

    monkeypatch.setattr(common.models, "load_model", failing_load_model)
    with pytest.raises(KeyboardInterrupt):
        eval_script.main(argv)
    assert [r["name"] for r in json.loads(eval_script.partial_path(output).read_text())
            ["results"]] == ["student"]
    monkeypatch.setattr(common.models, "load_model", real_load_model)
    loaded = counting_model_loads(monkeypatch)
    assert [r["name"] for r in eval_script.main(argv)] == ["student", "student_sp"]
    assert loaded == ["student_sp"]
    assert not eval_script.partial_path(output).exists()


def test_each_warning_is_given_once(tiny, capsys):
    """The teacher's conversations are encoded once: its too-long warning was printed twice."""
    eval_script.main([str(a) for a in [
        "--models", tiny / "student", "--teacher", tiny / "teacher", "--dataset",
        tiny / "test.jsonl", "--max-samples", 8, "--max-new-tokens", 2, "--max-length", 60,
        "--no-progress"]])
    err = capsys.readouterr().err
    assert err.count(f"warning: {tiny / 'teacher'}: skipped") == 1
    assert err.count(f"warning: {tiny / 'student'}: skipped") == 1


def test_the_teacher_is_named_by_listing_it_in_models(tiny):
    results = eval_script.main([str(a) for a in [
        "--models", tiny / "student", tiny / "teacher", "--names", "small", "big", "--teacher",
        tiny / "teacher", "--dataset", tiny / "test.jsonl", "--max-samples", 2,
        "--max-new-tokens", 1, "--no-progress"]])
    assert [(r["name"], r["teacher"]) for r in results] == [("big", True), ("small", False)]


def test_fingerprint_of_a_file_is_left_to_the_loader(tmp_path):
    """A file given as a model (a .gguf) has no directory listing to fingerprint: no traceback
    here, the loader's one-line error says what is wrong."""
    from eval import model_fingerprint

    model_file = tmp_path / "model.gguf"
    model_file.write_bytes(b"GGUF")
    assert model_fingerprint(str(model_file)) is None
    assert model_fingerprint(str(tmp_path / "gone")) == "missing"
