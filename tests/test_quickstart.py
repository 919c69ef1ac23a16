"""The toy task generator and the method comparison's aggregation (not the pipeline itself: that
trains a teacher and 21 students, far too slow for CI)."""

import json
import math
import re

import pytest

from benchmarks.compare_methods import aggregate_rows, combine_families, markdown_table, mean_std
from examples import toy_task


@pytest.fixture(scope="module")
def task():
    return toy_task.generate_task(seed=3, num_train=600, num_test=120)


def test_same_seed_same_rows_other_seed_other_rows(task):
    assert toy_task.generate_task(seed=3, num_train=600, num_test=120) == task
    assert toy_task.generate_task(seed=4, num_train=600, num_test=120) != task


def test_sizes_and_every_family_in_both_splits(task):
    train, test = task
    assert len(train) == 600 and len(test) == 120
    for rows in (train, test):
        assert {row["family"] for row in rows} == set(toy_task.FAMILIES)


def test_every_prompt_is_distinct_within_and_across_splits(task):
    prompts = [toy_task.prompt_text(row) for row in task[0] + task[1]]
    assert len(set(prompts)) == len(prompts)


def expected_answers(row):
    """The accepted replies, recomputed from the prompt text alone."""
    prompt = toy_task.prompt_text(row)
    family = row["family"]
    if family == "arith":
        direction, number = re.fullmatch(r"What number comes (after|before) (\d+)\?",
                                         prompt).groups()
        return {str(int(number) + (1 if direction == "after" else -1))}
    if family == "reverse":
        return {", ".join(reversed(prompt.split(": ", 1)[1].split(", ")))}
    if family == "count":
        return {str(len(prompt.split(": ", 1)[1].rstrip("?").split()))}
    if family == "pick":
        letter, words = re.fullmatch(r"Pick a word that starts with (\w) from: (.*)",
                                     prompt).groups()
        return {w for w in words.split(", ") if w.startswith(letter)}
    category = next(c for c in toy_task.LEXICON if f" {c} " in prompt)
    letter = re.search(r"(?:starts with|the letter) (\w)[.?]", prompt).group(1)
    return {w for w in toy_task.LEXICON[category] if w.startswith(letter)}


def test_answers_are_right_and_the_reply_is_one_of_them(task):
    for row in task[0] + task[1]:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert set(row["answers"]) == expected_answers(row), row
        assert assistant["content"] in row["answers"]
        if row["family"] in toy_task.SINGLE_ANSWER:
            assert len(row["answers"]) == 1
        else:
            assert len(row["answers"]) >= 2  # where a soft target carries more than the argmax


def test_many_answer_replies_vary_in_training(task):
    """The same `name` fact, asked in different words, gets different right replies."""
    replies = {}
    for row in task[0]:
        if row["family"] == "name":
            replies.setdefault(tuple(row["answers"]), set()).add(row["messages"][1]["content"])
    assert max(len(r) for r in replies.values()) >= 2


def test_write_task_files(tmp_path):
    paths = toy_task.write_task(tmp_path, seed=1, num_train=50, num_test=25)
    test = toy_task.read_jsonl(paths["test"])
    assert len(toy_task.read_jsonl(paths["train"])) == 50 and len(test) == 25
    per_family = [toy_task.read_jsonl(paths[f"test_{f}"]) for f in toy_task.FAMILIES]
    assert sorted(map(json.dumps, sum(per_family, []))) == sorted(map(json.dumps, test))


def test_validation_rows_are_new_prompts_and_leave_train_and_test_unchanged(task):
    validation = toy_task.generate_validation(40, seed=3, num_train=600, num_test=120)
    assert toy_task.generate_task(seed=3, num_train=600, num_test=120) == task
    assert len(validation) == 40
    assert {row["family"] for row in validation} == set(toy_task.FAMILIES)
    seen = {toy_task.prompt_text(row) for row in task[0] + task[1]}
    prompts = [toy_task.prompt_text(row) for row in validation]
    assert len(set(prompts)) == len(prompts) and not seen & set(prompts)


def test_stage_halves_split_the_training_set_once_with_every_family(tmp_path):
    from examples.toy_pipeline import method_steps, training_data

    paths = toy_task.write_task(tmp_path, seed=1, num_train=50, num_test=25)
    assets = {"data": {"train": str(paths["train"])}}
    assert training_data(assets, 0) == {"warm": None, "method": str(paths["train"])}
    halves = training_data(assets, 10)
    first, second = (toy_task.read_jsonl(halves[k]) for k in ("warm", "method"))
    assert first + second == toy_task.read_jsonl(paths["train"]) and len(first) == 25
    for rows in (first, second):
        assert {row["family"] for row in rows} == set(toy_task.FAMILIES)
    assert method_steps({"max_steps": 300, "warm_steps": 120}) == 180
    assert method_steps({"max_steps": 300}) == 300


def test_stage_two_command_carries_the_rows_settings_and_the_remaining_steps(tmp_path):
    from examples.toy_pipeline import method_command, settings_key

    paths = toy_task.write_task(tmp_path, seed=1, num_train=50, num_test=25)
    assets = {"data": {"train": str(paths["train"])}, "teacher": "T"}
    budget = {"max_steps": 30, "warm_steps": 10, "batch_size": 4, "warmup_ratio": 0.0,
              "log_steps": 5, "max_new_tokens": 8}
    settings = {"learning_rate": 1e-3, "flags": ["--lmbda", 1.0]}
    command = [str(a) for a in method_command("on_policy", assets, "S", None, "out", budget, 7,
                                              settings)]
    assert command[0] == "on_policy.py"
    assert command[command.index("--max-steps") + 1] == "20"
    assert command[command.index("--learning-rate") + 1] == "0.001"
    assert command[command.index("--lmbda") + 1] == "1.0"
    assert command[command.index("--dataset") + 1].endswith("train_half2.jsonl")
    assert settings_key(settings) == "lr1e-03_lmbda1.0"
    assert settings_key({"learning_rate": 3e-3, "flags": ["--hybrid"]}) == "lr3e-03_hybridon"



def test_scarce_references_reach_baselines_only_and_distillation_reads_the_teacher(tmp_path):
    from examples.toy_pipeline import method_command, reference_subset, training_data

    paths = toy_task.write_task(tmp_path, seed=1, num_train=50, num_test=25)
    assets = {"data": {"train": str(paths["train"])}, "teacher": "T"}
    budget = {"max_steps": 30, "warm_steps": 10, "batch_size": 4, "warmup_ratio": 0.0,
              "log_steps": 5, "max_new_tokens": 8, "references": 6}
    halves = training_data(assets, 10)
    labeled = reference_subset(halves["warm"], 6)
    assert toy_task.read_jsonl(labeled) == toy_task.read_jsonl(halves["warm"])[:6]

    def data_of(name, flags=()):
        command = [str(a) for a in method_command(
            name, assets, "S", "teacher.jsonl", "out", budget, 0,
            {"learning_rate": 1e-3, "flags": list(flags)})]
        where = "--completions" if command[0] == "sequence_level.py" else "--dataset"
        return command[command.index(where) + 1], command

    assert data_of("baseline")[0] == labeled
    assert data_of("cross_tokenizer_baseline")[0] == labeled
    assert data_of("sequence_level")[0] == "teacher.jsonl"
    assert data_of("token_level_forward")[0] == "teacher.jsonl"
    assert data_of("cross_tokenizer")[0] == "teacher.jsonl"
    prompts, command = data_of("on_policy")  # samples on every prompt, off-policy on the teacher
    assert prompts == halves["method"]
    assert command[command.index("--completions") + 1] == "teacher.jsonl"


@pytest.mark.parametrize("references", [None, 500])
def test_selection_grid_gives_every_row_the_same_learning_rates(references):
    from benchmarks.compare_methods import LEARNING_RATES, selection_grid
    from examples.toy_pipeline import COMPARISON_METHODS

    for name in COMPARISON_METHODS:
        grid = selection_grid(name, references)
        assert sorted({entry["learning_rate"] for entry in grid}) == sorted(LEARNING_RATES)
        assert len(grid) % len(LEARNING_RATES) == 0
        knobs = [json.dumps(entry["flags"]) for entry in grid[::len(LEARNING_RATES)]]
        assert len(set(knobs)) == len(knobs)
        if references:  # every distillation row already reads the teacher's replies
            assert not any("completions" in knob for knob in knobs)


def test_scarce_references_grid_keeps_each_knob_without_the_switch_to_the_teachers_replies():
    from benchmarks.compare_methods import LEARNING_RATES, selection_grid

    knobs = [entry["flags"] for entry in selection_grid("on_policy", 500)[::len(LEARNING_RATES)]]
    assert knobs == [[], ["--lmbda", 1.0], ["--kl", "jsd", "--beta", 0.9],
                     ["--kl", "skew_reverse"], ["--lmbda", 0.25], ["--kl", "forward"]]
    forward = [entry["flags"] for entry in selection_grid("token_level_forward", 500)]
    assert forward[::len(LEARNING_RATES)] == [[], ["--alpha", 0.5], ["--loss-temperature", 2.0]]


def test_training_diagnostics_read_the_first_and_last_fifth(tmp_path):
    from benchmarks.compare_methods import training_diagnostics

    rows = [{"step": step, "loss": float(step), "grad_norm": 10.0 if step <= 2 else 1.0}
            for step in range(1, 11)] + [{"step": 10, "eval_loss": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = training_diagnostics(tmp_path)
    assert result["grad_norm"] == {"first_fifth": 10.0, "last_fifth": 1.0}
    assert result["loss"] == {"first_fifth": 1.5, "last_fifth": 9.5}
    assert "sampled_length" not in result
    assert training_diagnostics(tmp_path / "missing") is None


# --- aggregation ------------------------------------------------------------------------------


def fake_result(model, exact_match, replies, tokens, perplexity, kl=None, teacher=False,
                generated=100, seconds=2.0):
    return {"model": model, "teacher": teacher, "parameters": 1000, "exact_match": exact_match,
            "rouge_l": exact_match, "perplexity": perplexity, "kl_to_teacher": kl,
            "top1_agreement": None if kl is None else 1.0 - kl, "generated_replies": replies,
            "scored_tokens": tokens, "generated_tokens": generated, "generation_seconds": seconds}


def test_combine_families_weights_exactly():
    per_family = {
        "arith": {"results": [fake_result("s", 1.0, replies=10, tokens=30, perplexity=2.0,
                                          kl=0.1)]},
        "name": {"results": [fake_result("s", 0.0, replies=30, tokens=10, perplexity=8.0,
                                         kl=0.5, generated=300, seconds=1.0)]},
    }
    combined = combine_families(per_family)["s"]
    assert combined["exact_match"] == pytest.approx(10 / 40)
    assert combined["perplexity"] == pytest.approx(math.exp((30 * math.log(2) + 10 * math.log(8))
                                                            / 40))
    assert combined["kl_to_teacher"] == pytest.approx((30 * 0.1 + 10 * 0.5) / 40)
    assert combined["tokens_per_second"] == pytest.approx(400 / 3.0)
    assert combined["exact_match_by_family"] == {"arith": 1.0, "name": 0.0}


def test_combine_families_keeps_null_agreement_null():
    per_family = {"arith": {"results": [fake_result("sp", 0.5, 4, 8, 3.0, kl=None)]}}
    combined = combine_families(per_family)["sp"]
    assert combined["kl_to_teacher"] is None and combined["top1_agreement"] is None


def test_aggregate_rows_mean_std_order_and_seeds():
    per_seed = {
        0: {"baseline": {"exact_match": 0.2, "train_seconds": 10.0,
                         "exact_match_by_family": {"arith": 0.1}, "parameters": 5},
            "teacher": {"exact_match": 0.9, "train_seconds": 100.0, "parameters": 50}},
        1: {"baseline": {"exact_match": 0.4, "train_seconds": 14.0,
                         "exact_match_by_family": {"arith": 0.3}, "parameters": 5},
            "teacher": {"exact_match": 0.9, "train_seconds": 100.0, "parameters": 50}},
    }
    rows = aggregate_rows(per_seed)
    assert [row["name"] for row in rows] == ["teacher", "baseline"]
    baseline = rows[1]
    assert baseline["exact_match"]["mean"] == pytest.approx(0.3)
    assert baseline["exact_match"]["std"] == pytest.approx(math.sqrt(0.02))  # sample std
    assert baseline["exact_match_by_family"]["arith"]["mean"] == pytest.approx(0.2)
    assert baseline["kl_to_teacher"] is None  # no seed has it
    assert [s["seed"] for s in baseline["seeds"]] == [0, 1]
    assert rows[0]["exact_match"] == {"mean": 0.9, "std": 0.0}
    json.dumps(rows)  # the result file must serialize
    table = markdown_table(rows, ["arith"])
    assert "| baseline | " in table and "0.300 ± 0.141" in table


def test_paired_difference_against_the_same_seeds_baseline():
    per_seed = {seed: {"baseline": {"exact_match": base},
                       "token_level_forward": {"exact_match": kd},
                       "cross_tokenizer": {"exact_match": 0.1}}
                for seed, (base, kd) in enumerate([(0.5, 0.6), (0.3, 0.35), (0.4, 0.38)])}
    rows = {row["name"]: row for row in aggregate_rows(per_seed)}
    delta = rows["token_level_forward"]["exact_match_minus_baseline"]
    assert delta["mean"] == pytest.approx((0.1 + 0.05 - 0.02) / 3)
    assert (delta["wins"], delta["seeds"]) == (2, 3)
    assert "exact_match_minus_baseline" not in rows["baseline"]
    # no cross_tokenizer_baseline row: nothing to pair with
    assert rows["cross_tokenizer"]["exact_match_minus_cross_tokenizer_baseline"] is None


def test_gap_closed_and_the_summary_table():
    from benchmarks.compare_methods import gap_closed, summary_table

    per_seed = {seed: {"teacher": {"exact_match": 0.9}, "baseline": {"exact_match": base},
                       "token_level_forward": {"exact_match": kd}}
                for seed, (base, kd) in enumerate([(0.5, 0.6), (0.3, 0.4)])}
    rows = aggregate_rows(per_seed)
    # teacher 0.9, baseline 0.4, forward 0.5: a fifth of the gap
    assert gap_closed(rows) == {"token_level_forward": pytest.approx(0.2)}
    rows[2]["stage2_settings"] = {"learning_rate": 1e-3, "flags": ["--alpha", 0.5]}
    lines = summary_table(rows).splitlines()
    assert lines[-1] == ("| token_level_forward | 0.500 ± 0.141 | +0.100 ± 0.000 (2/2) | "
                         "lr 0.001 --alpha 0.5 |")


def test_gap_by_family_weighs_families_by_replies_and_sums_the_many_answer_share():
    from benchmarks.compare_methods import gap_by_family

    def row(name, by_family):
        return {"name": name, "exact_match_by_family": {
            family: {"mean": value, "std": 0.0} for family, value in by_family.items()}}

    rows = [row("teacher", {"arith": 1.0, "name": 1.0, "pick": 0.5}),
            row("baseline", {"arith": 0.0, "name": 0.5, "pick": 0.5})]
    where = gap_by_family(rows, {"arith": 30, "name": 10, "pick": 60}, single_answer=("arith",))
    # arith: 1.0 of 30 replies, name: 0.5 of 10 replies, pick: nothing, out of 100 replies
    assert where["gap"] == pytest.approx(0.35)
    assert where["families"]["arith"]["share"] == pytest.approx(0.30 / 0.35)
    assert where["families"]["pick"]["share"] == 0.0
    assert where["many_answer_families"] == ["name", "pick"]
    assert where["many_answer_share"] == pytest.approx(0.05 / 0.35)
    assert gap_by_family(rows[:1], {"arith": 1}) is None


def test_cached_row_is_paired_with_its_baseline_and_the_live_teacher_row():
    per_seed = {seed: {"baseline": {"exact_match": 0.5},
                       "token_level_forward": {"exact_match": live},
                       "token_level_cached": {"exact_match": cached}}
                for seed, (live, cached) in enumerate([(0.6, 0.58), (0.5, 0.52)])}
    rows = {row["name"]: row for row in aggregate_rows(per_seed)}
    cached = rows["token_level_cached"]
    assert cached["exact_match_minus_baseline"]["mean"] == pytest.approx(0.05)
    gap = cached["exact_match_minus_token_level_forward"]
    assert gap["mean"] == pytest.approx(0.0) and (gap["wins"], gap["seeds"]) == (1, 2)
    # the table's delta column stays "vs its SFT baseline"
    line = next(l for l in markdown_table(list(rows.values()), []).splitlines()
                if l.startswith("| token_level_cached |"))
    assert "+0.050" in line


def test_mean_std_edge_cases():
    assert mean_std([]) is None and mean_std([None, None]) is None
    assert mean_std([0.5]) == {"mean": 0.5, "std": 0.0}


# --- the two tokenizers ----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["bpe", "sp"])
def test_every_token_after_the_prompt_is_supervised(task, which):
    """What the student must generate after the generation prompt is exactly what it is trained
    on, for both tokenizers (a digit-initial reply is the case that once went wrong)."""
    from common.chat import ChatEncoder
    from examples import toy_assets

    texts = list(toy_task.corpus(task[0]))
    tokenizer = (toy_assets.build_bpe_tokenizer(texts, 400) if which == "bpe" else
                 toy_assets.build_sentencepiece_tokenizer(texts, 300))
    encoder = ChatEncoder(tokenizer, 128)
    for row in task[1][:10]:
        example = encoder.encode(row["messages"])
        prompt = tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True,
                                               tokenize=False)
        prompt_length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert example["input_ids"][:prompt_length] == \
            tokenizer(prompt, add_special_tokens=False)["input_ids"]
        supervised = [label != -100 for label in example["labels"]]
        assert supervised == [False] * prompt_length + [True] * (len(supervised) - prompt_length)
        reply_ids = example["input_ids"][prompt_length:-1]  # without the end-of-turn token
        assert tokenizer.decode(reply_ids).strip() == row["messages"][1]["content"]


def test_diagnosis_divergences_against_a_float64_reference():
    import torch

    from benchmarks.diagnose_students import per_token_divergences

    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=generator, dtype=torch.float64)
    values = per_token_divergences(student.float(), teacher.float())
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    expected = {"forward_kl": (log_t.exp() * (log_t - log_s)).sum(-1),
                "reverse_kl": (log_s.exp() * (log_s - log_t)).sum(-1),
                "student_entropy": -(log_s.exp() * log_s).sum(-1)}
    # float32 softmax over 11 entries: a few units of 2**-24 relative error per term
    for name, reference in expected.items():
        assert torch.allclose(values[name].double(), reference, rtol=1e-5, atol=1e-6), name
    same = per_token_divergences(student.float(), student.float())
    assert same["forward_kl"].abs().max() < 1e-6 and same["reverse_kl_grad_norm"].max() < 1e-6


def test_references_flag_sets_or_drops_the_budget_key_and_names_bad_values():
    from examples.toy_pipeline import with_references

    budget = {"max_steps": 30, "warm_steps": 10, "references": 500}
    assert with_references(budget, "all") == {"max_steps": 30, "warm_steps": 10}
    assert with_references(budget, "40")["references"] == 40 and budget["references"] == 500
    for bad, where in (("0", budget), ("x", budget), ("-3", budget), ("40", {"warm_steps": 0})):
        with pytest.raises(ValueError, match=f"--references {bad}: give N >= 1"):
            with_references(where, bad)
