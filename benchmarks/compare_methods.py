"""Which method gives the best student for a given budget? Every method of the suite trains the
same student initialisation with the same budget on the toy task (examples/toy_task.py), for
several seeds; every student is scored by eval.py; the table goes to JSON, a PNG and stdout.

    python benchmarks/compare_methods.py                      # the published table (5 seeds)
    python benchmarks/compare_methods.py --seeds 0 --max-steps 50 --output /tmp/cmp.json

By default references are scarce, as when a user distils: 500 of the training prompts have a
reference reply, the rest only a prompt. Stage 1 (shared) and the baselines fine-tune on those 500;
every distillation row learns from the teacher on all of stage 2's prompts. `--references all`
gives every prompt its reference (there distillation ties SFT on this task; docs/results.md).

Rows: teacher; baseline (the student fine-tuned on the ground-truth replies); sequence_level;
token_level_forward; token_level_cached (forward KL from an offline top-32 teacher cache, built
once, no teacher loaded while training); token_level_reverse; on_policy; cross_tokenizer (ULD, the
student with the SentencePiece-style tokenizer) and cross_tokenizer_baseline (that student
fine-tuned on the ground truth). Each is trained by its own script as a subprocess (see
examples/toy_pipeline.py).

- Budget: --max-steps optimizer steps x --batch-size conversations, the same learning rate,
  warmup and cosine schedule for every row. The sequence-level teacher pass (the teacher answers
  every training prompt once) is generated once and its time is reported separately; so is the
  teacher-cache build for token_level_cached.
- Seeds: seed s gives a fresh student initialisation (shared by all rows of that seed) and the
  data order. The teacher is trained once and cached; its row repeats its evaluation per seed.
- Scoring: eval.py on each task family's held-out prompts separately, combined exactly (exact
  match and ROUGE-L weighted by replies, perplexity and teacher agreement by scored tokens,
  tokens/s as total tokens over total seconds), so the JSON also has exact match per family.
- Everything is cached under --workdir (runs/compare by default): a killed run resumes, an
  unchanged rerun only re-aggregates.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from examples import toy_task  # noqa: E402
from examples.toy_pipeline import add_references_flag, with_references  # noqa: E402

PRIMARY_METRIC = "exact_match"
ROW_ORDER = ("teacher", "baseline", "sequence_level", "token_level_forward",
             "token_level_cached", "token_level_reverse", "on_policy", "cross_tokenizer", "cross_tokenizer_baseline")
METRICS = ("exact_match", "rouge_l", "perplexity", "kl_to_teacher", "top1_agreement",
           "tokens_per_second", "train_seconds")
# Each distilled row against the SFT baseline of the same student (same seed, same initialisation).
REFERENCE_ROW = {"sequence_level": "baseline", "token_level_forward": "baseline",
                 "token_level_cached": "baseline",
                 "token_level_reverse": "baseline", "on_policy": "baseline",
                 "cross_tokenizer": "cross_tokenizer_baseline"}
# Further paired differences reported in the JSON (not the table): what caching the teacher costs.
EXTRA_PAIRED = {"token_level_cached": "token_level_forward"}

# The published comparison; the quickstart runs one seed of it with a teacher trained half as long.
# learning_rate is stage 1's (the shared SFT warm start); each row's stage-2 rate is selected.
DEFAULT_BUDGET = {"max_steps": 600, "warm_steps": 300, "batch_size": 32, "learning_rate": 3e-3,
                  "warmup_ratio": 0.03, "max_new_tokens": 24, "log_steps": 50, "references": 500}

# Stage-2 settings tried per row on the validation split (selection seed): the learning rate for
# every row (the baselines get the same search), plus the method's own knob where it has one.
LEARNING_RATES = (3e-4, 1e-3, 3e-3)
METHOD_KNOBS = {
    # Hinton's softened targets; and the loss on the teacher's own greedy replies (sequence-level
    # data with token-level targets, GKD's "supervised KD" on teacher outputs)
    "token_level_forward": [[], ["--alpha", 0.5], ["--loss-temperature", 2.0],
                            ["--dataset", "{completions}"]],
    # DistiLLM's skew reverse KL: reverse KL with each token's log-ratio bounded
    "token_level_reverse": [[], ["--alpha", 0.5], ["--kl", "skew_reverse"],
                            ["--kl", "skew_reverse", "--alpha", 0.5]],
    # GKD's λ (all steps on-policy, or a quarter) and its often-best divergence, JSD(β = 0.9);
    # DistiLLM's skew reverse KL; off-policy steps on the teacher's replies instead of the ground
    # truth, with reverse or forward KL
    "on_policy": [[], ["--lmbda", 1.0], ["--kl", "jsd", "--beta", 0.9], ["--kl", "skew_reverse"],
                  ["--completions", "{completions}"],
                  ["--lmbda", 0.25, "--completions", "{completions}"],
                  ["--kl", "forward", "--completions", "{completions}"]],
    "cross_tokenizer": [[], ["--hybrid"]],
}
VALIDATION_ROWS = 250
SELECTION_SEED = 100


def selection_knobs(name, references=None):
    """The method flags tried for row `name`. With scarce references every distillation row
    already learns from the teacher's replies, so a knob's switch to them (an option and its
    "{completions}" value) is dropped, and knobs left equal to another are tried once."""
    knobs = []
    for flags in METHOD_KNOBS.get(name, [[]]):
        if references:
            values = {index for index, flag in enumerate(flags) if flag == "{completions}"}
            flags = [flag for index, flag in enumerate(flags)
                     if index not in values and index + 1 not in values]
        if flags not in knobs:
            knobs.append(flags)
    return knobs


def selection_grid(name, references=None):
    """[{"learning_rate", "flags"}] tried for row `name`: every knob at every learning rate."""
    return [{"learning_rate": rate, "flags": flags}
            for flags in selection_knobs(name, references) for rate in LEARNING_RATES]


# ---------------------------------------------------------------------------------------------
# Aggregation (pure functions: tests/test_quickstart.py feeds them fake eval.py outputs)


def combine_families(per_family):
    """{family: eval.py JSON} -> {model: metrics over all families}, combined exactly.

    Exact match and ROUGE-L are means over replies (weighted by `generated_replies`); perplexity
    is exp of the token-weighted mean log-perplexity (weighted by `scored_tokens`), and KL and
    top-1 agreement are token-weighted too (for a same-tokenizer student the teacher-agreement
    tokens are its scored tokens); tokens/s is total generated tokens over total seconds.
    Null metrics (teacher agreement across tokenizers) stay null.
    """
    combined = {}
    for family, report in per_family.items():
        for result in report["results"]:
            entry = combined.setdefault(result["model"], {
                "teacher": result["teacher"], "parameters": result["parameters"], "replies": 0,
                "tokens": 0, "em_sum": 0.0, "rouge_sum": 0.0, "log_ppl_sum": 0.0,
                "kl_sum": None, "top1_sum": None, "generated_tokens": 0, "seconds": 0.0,
                "exact_match_by_family": {}})
            replies, tokens = result["generated_replies"], result["scored_tokens"]
            entry["replies"] += replies
            entry["tokens"] += tokens
            entry["em_sum"] += result["exact_match"] * replies
            entry["rouge_sum"] += result["rouge_l"] * replies
            entry["log_ppl_sum"] += math.log(result["perplexity"]) * tokens
            for key, total in (("kl_to_teacher", "kl_sum"), ("top1_agreement", "top1_sum")):
                if result[key] is not None:
                    entry[total] = (entry[total] or 0.0) + result[key] * tokens
            entry["generated_tokens"] += result["generated_tokens"]
            entry["seconds"] += result["generation_seconds"]
            entry["exact_match_by_family"][family] = result["exact_match"]
    metrics = {}
    for model, entry in combined.items():
        tokens = max(entry["tokens"], 1)
        metrics[model] = {
            "teacher": entry["teacher"], "parameters": entry["parameters"],
            "exact_match": entry["em_sum"] / max(entry["replies"], 1),
            "rouge_l": entry["rouge_sum"] / max(entry["replies"], 1),
            "perplexity": math.exp(entry["log_ppl_sum"] / tokens),
            "kl_to_teacher": None if entry["kl_sum"] is None else entry["kl_sum"] / tokens,
            "top1_agreement": None if entry["top1_sum"] is None else entry["top1_sum"] / tokens,
            "tokens_per_second": entry["generated_tokens"] / max(entry["seconds"], 1e-9),
            "exact_match_by_family": entry["exact_match_by_family"],
        }
    return metrics


def mean_std(values):
    """{"mean", "std"} of the non-null values (sample std, 0 for one value); None if none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def aggregate_rows(per_seed):
    """{seed: {row name: metrics of that seed}} -> the JSON's "rows" list, in ROW_ORDER.

    Each row has one {"mean", "std"} per metric in METRICS (None where no seed has it), the
    per-family exact match the same way, "seeds": the per-seed metrics with their seed, and for
    a distilled row "exact_match_minus_<its SFT baseline>": the per-seed difference's mean, std
    and the number of seeds where it is positive.
    """
    names = [n for n in ROW_ORDER if any(n in rows for rows in per_seed.values())]
    names += sorted({n for rows in per_seed.values() for n in rows} - set(names))
    result = []
    for name in names:
        seeds = [{"seed": seed, **rows[name]} for seed, rows in sorted(per_seed.items())
                 if name in rows]
        row = {"name": name, "parameters": seeds[0].get("parameters")}
        for metric in METRICS:
            row[metric] = mean_std([s.get(metric) for s in seeds])
        families = sorted({f for s in seeds for f in s.get("exact_match_by_family", {})})
        row["exact_match_by_family"] = {
            family: mean_std([s.get("exact_match_by_family", {}).get(family) for s in seeds])
            for family in families}
        for reference in [REFERENCE_ROW.get(name), EXTRA_PAIRED.get(name)]:
            if not reference:
                continue
            # Paired by seed: both rows start from the same student, so its luck cancels out.
            paired = [rows[name][PRIMARY_METRIC] - rows[reference][PRIMARY_METRIC]
                      for rows in per_seed.values() if reference in rows and name in rows]
            row[f"{PRIMARY_METRIC}_minus_{reference}"] = {
                **mean_std(paired), "wins": sum(d > 0 for d in paired),
                "seeds": len(paired)} if paired else None
        row["seeds"] = seeds
        result.append(row)
    return result


def paired_difference(row):
    """(reference row name, {"mean", "std", "wins", "seeds"}) of a row against its SFT baseline
    (REFERENCE_ROW), or (None, None)."""
    reference = REFERENCE_ROW.get(row["name"])
    if reference is None:
        return None, None
    return reference, row.get(f"{PRIMARY_METRIC}_minus_{reference}")


def format_value(stat, digits=3):
    if stat is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown_table(rows, families):
    """The README table: mean ± std over seeds per row."""
    header = ["row", "params", "exact match ↑", "Δ vs its SFT baseline (wins)",
              *[f"EM {f}" for f in families], "ROUGE-L ↑", "perplexity ↓", "KL to teacher ↓",
              "top-1 agr. ↑", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        by_family = row["exact_match_by_family"]
        _, delta = paired_difference(row)
        cells = [row["name"], f"{row['parameters'] / 1e3:.0f}K" if row["parameters"] else "",
                 format_value(row["exact_match"]),
                 f"{delta['mean']:+.3f} ± {delta['std']:.3f} ({delta['wins']}/{delta['seeds']})"
                 if delta else "",
                 *[f"{by_family[f]['mean']:.2f}" if by_family.get(f) else "n/a"
                   for f in families],
                 format_value(row["rouge_l"]), format_value(row["perplexity"], 2),
                 format_value(row["kl_to_teacher"]), format_value(row["top1_agreement"]),
                 format_value(row["train_seconds"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(rows):
    """The README's short table: exact match, the paired difference against the row's SFT
    baseline, and the stage-2 settings each row was given."""
    lines = ["| row | exact match ↑ | Δ vs its SFT baseline (seeds higher) | stage 2 settings |",
             "|---|---:|---:|---|"]
    for row in rows:
        _, delta = paired_difference(row)
        settings = row.get("stage2_settings")
        described = "" if settings is None else " ".join(
            [f"lr {settings['learning_rate']:g}", *map(str, settings.get("flags", []))])
        lines.append("| " + " | ".join([
            row["name"], format_value(row["exact_match"]),
            f"{delta['mean']:+.3f} ± {delta['std']:.3f} ({delta['wins']}/{delta['seeds']})"
            if delta else "", described]) + " |")
    return "\n".join(lines)


def gap_closed(rows):
    """{row: fraction of the teacher − SFT-baseline exact-match gap the row closes} (means)."""
    by_name = {row["name"]: row for row in rows}
    teacher = by_name.get("teacher")
    closed = {}
    for row in rows:
        reference = REFERENCE_ROW.get(row["name"])
        if teacher is None or reference not in by_name:
            continue
        gap = teacher["exact_match"]["mean"] - by_name[reference]["exact_match"]["mean"]
        if gap > 0:
            closed[row["name"]] = (row["exact_match"]["mean"]
                                   - by_name[reference]["exact_match"]["mean"]) / gap
    return closed


def gap_by_family(rows, family_sizes, single_answer=toy_task.SINGLE_ANSWER):
    """Where the teacher − SFT-baseline exact-match gap lies, from the rows' per-family means.

    `family_sizes` {family: held-out replies}. Per family: both exact matches, the family's part
    of the overall gap (in exact-match points of the whole test set) and its share of the gap.
    "many_answer_share" sums the shares of the families outside `single_answer`: only there can
    the teacher's targets say more than the references (on a one-answer family a right teacher
    gives the reference's own tokens), so it bounds the gap a student could close through what
    the teacher knows beyond the references, without learning the one-answer families faster.
    None without a teacher and baseline row.
    """
    by_name = {row["name"]: row for row in rows}
    if "teacher" not in by_name or "baseline" not in by_name:
        return None
    total = sum(family_sizes.values())
    families = {}
    for family, size in family_sizes.items():
        teacher = by_name["teacher"]["exact_match_by_family"][family]["mean"]
        baseline = by_name["baseline"]["exact_match_by_family"][family]["mean"]
        families[family] = {"teacher": teacher, "baseline": baseline, "replies": size,
                            "gap_points": (teacher - baseline) * size / total}
    gap = sum(entry["gap_points"] for entry in families.values())
    for entry in families.values():
        entry["share"] = entry["gap_points"] / gap if gap > 0 else None
    many = [f for f in families if f not in single_answer]
    return {"families": families, "gap": gap, "many_answer_families": many,
            "many_answer_share": sum(families[f]["gap_points"] for f in many) / gap
            if gap > 0 else None}


def held_out_family_sizes(task_settings):
    """{family: held-out replies} of the test split the task settings generate."""
    _, test = toy_task.generate_task(**task_settings)
    sizes = {family: 0 for family in toy_task.FAMILIES}
    for row in test:
        sizes[row["family"]] += 1
    return sizes


def annotate(path):
    """Recompute the summaries derived from a result JSON's rows (gap_closed, gap_by_family) and
    write them back: for a JSON trained before a summary existed."""
    result = json.loads(Path(path).read_text())
    settings, rows = result["settings"], result["rows"]
    settings["gap_closed"] = gap_closed(rows)
    sizes = held_out_family_sizes(settings["assets"]["task"])
    settings["gap_by_family"] = gap_by_family(rows, sizes)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    return settings["gap_by_family"]


def plot(rows, families, path):
    """Exact match per row (mean ± std over seeds) and per task family; one colour per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["name"] for row in rows]
    palette = [plt.cm.tab10(k) for k in range(10) if k != 7]  # tab10's grey is the teacher's
    students = iter(range(len(rows)))
    colors = ["tab:gray" if name == "teacher" else palette[next(students) % len(palette)]
              for name in names]
    figure, (overall, by_family) = plt.subplots(
        1, 2, figsize=(14, 5.2), gridspec_kw={"width_ratios": [1, 2]})
    overall.bar(range(len(rows)), [row["exact_match"]["mean"] for row in rows],
                yerr=[row["exact_match"]["std"] for row in rows], color=colors, capsize=3)
    overall.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=8)
    overall.set_ylim(0, 1)
    overall.set_title(f"held-out exact match (mean ± std over {len(rows[0]['seeds'])} seeds)",
                      fontsize=10)
    width = 0.8 / max(len(rows), 1)
    for index, row in enumerate(rows):
        values = [row["exact_match_by_family"].get(f) for f in families]
        by_family.bar([k + index * width for k in range(len(families))],
                      [v["mean"] if v else 0 for v in values], width,
                      yerr=[v["std"] if v else 0 for v in values], capsize=2,
                      label=row["name"], color=colors[index])
    by_family.set_xticks([k + 0.4 - width / 2 for k in range(len(families))], families)
    by_family.set_ylim(0, 1)
    by_family.set_title("exact match per task family", fontsize=10)
    figure.legend(*by_family.get_legend_handles_labels(), loc="lower center",
                  ncol=len(rows), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------


def code_version():
    """The commit the scripts were at when this result was aggregated (+ whether it was dirty)."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        # Tracked files that differ from the commit, the published results themselves aside.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!benchmarks/results"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "uncommitted_changes": bool(dirty)}


def machine_description():
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "os": platform.platform(),
            "threads_per_run": os.environ.get("OMP_NUM_THREADS", "torch default")}


def validation_files(assets, runs):
    """{family or "all": path} of the validation split (written once under `runs`)."""
    paths = {family: runs / "validation" / f"val_{family}.jsonl" for family in toy_task.FAMILIES}
    paths["all"] = runs / "validation" / "val.jsonl"
    if not all(path.is_file() for path in paths.values()):
        rows = toy_task.generate_validation(VALIDATION_ROWS, **assets["settings"]["task"])
        for family in toy_task.FAMILIES:
            toy_task.write_jsonl(paths[family], [row for row in rows if row["family"] == family])
        toy_task.write_jsonl(paths["all"], rows)
    return paths


def validation_score(student_dir, validation_file, budget):
    """(exact match of one student on the whole validation split, eval.py's seconds); cached in
    the student's directory, so a grid that grows scores only its new students."""
    from examples.toy_assets import run_script

    output = Path(student_dir) / "validation_eval.json"
    timing = output.with_suffix(".seconds.json")
    if not (output.is_file() and timing.is_file()):
        seconds = run_script(["eval.py", "--models", student_dir, "--dataset", validation_file,
                              "--max-new-tokens", budget["max_new_tokens"], "--batch-size", 64,
                              "--output", output, "--no-progress"],
                             output.with_suffix(".log"), echo="none")
        timing.write_text(json.dumps({"seconds": seconds}) + "\n")
    result = json.loads(output.read_text())["results"][0]
    return result[PRIMARY_METRIC], json.loads(timing.read_text())["seconds"]


def select_settings(assets, methods, runs, completions, budget, echo):
    """Each row's stage-2 settings, chosen on the validation split with the selection seed.

    Returns ({row: {"grid": [{"settings", "validation_exact_match"}], "chosen",
    "validation_exact_match"}}, eval seconds). Trained students are cached like every row."""
    from examples.toy_pipeline import train_methods

    files = validation_files(assets, runs)
    select_dir = runs / f"select_seed{SELECTION_SEED}"
    selection, seconds = {}, 0.0
    for name in methods:
        trained = {}
        for settings in selection_grid(name, budget.get("references")):
            path, _ = train_methods(assets, [name], SELECTION_SEED, select_dir, completions,
                                    budget, row_settings={name: settings}, echo=echo)[name]
            trained[json.dumps(settings)] = path
        scores = {}
        for key, path in trained.items():
            scores[key], spent = validation_score(path, files["all"], budget)
            seconds += spent
        grid = [{"settings": settings,
                 "validation_exact_match": scores[json.dumps(settings)]}
                for settings in selection_grid(name, budget.get("references"))]
        best = max(grid, key=lambda entry: entry["validation_exact_match"])  # first of ties
        selection[name] = {"grid": grid, "chosen": best["settings"],
                           "validation_exact_match": best["validation_exact_match"]}
        if budget.get("warm_steps"):  # what stage 2 starts from, for reading the grid
            from examples.toy_pipeline import METHOD_TOKENIZER, warm_start

            stage1, _ = warm_start(assets, METHOD_TOKENIZER[name], SELECTION_SEED, select_dir,
                                   budget, echo=echo)
            selection[name]["stage1_validation_exact_match"], spent = validation_score(
                stage1, files["all"], budget)
            seconds += spent
        print(f"[select] {name}: " + ", ".join(
            f"{json.dumps(e['settings'])} {e['validation_exact_match']:.3f}" for e in grid)
            + f" -> {json.dumps(best['settings'])}", flush=True)
    return selection, seconds


def training_diagnostics(student_dir):
    """What a run's metrics.jsonl says about its optimisation: the gradient norm before clipping
    (first and last fifth of the logged steps), the loss terms, and for on-policy runs the sampled
    length and how often a sample reached end of turn (first and last fifth)."""
    path = Path(student_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [row for row in steps if "loss" in row and "step" in row]
    fifth = max(1, len(steps) // 5)

    def average(key, part):
        values = [row[key] for row in part if row.get(key) is not None]
        return round(statistics.fmean(values), 4) if values else None

    result = {}
    for key in ("grad_norm", "loss", "kd", "ce", "uld", "sampled_length", "reached_end_of_turn"):
        first, last = average(key, steps[:fifth]), average(key, steps[-fifth:])
        if first is not None or last is not None:
            result[key] = {"first_fifth": first, "last_fifth": last}
    return result


def warm_start_seconds(seed_dir):
    total = 0.0
    for timing in Path(seed_dir).glob("warm_*/train_seconds.json"):
        total += json.loads(timing.read_text())["seconds"]
    return total


def diagnose_first_seed(assets, seed_dir, methods, chosen, budget):
    """benchmarks/diagnose_students.py on the first seed's same-tokenizer students (the stage-1
    student and every bpe row) over 100 validation prompts: what on-policy training sees."""
    from types import SimpleNamespace

    import torch

    from benchmarks.diagnose_students import diagnose
    from common.models import load_model, load_tokenizer
    from examples.toy_pipeline import METHOD_TOKENIZER, settings_key

    rows = toy_task.read_jsonl(Path(seed_dir).parent / "validation" / "val.jsonl")[:100] \
        if (Path(seed_dir).parent / "validation" / "val.jsonl").is_file() else \
        toy_task.generate_validation(100, **assets["settings"]["task"])
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        tokenizer = load_tokenizer(assets["teacher"], what="teacher")
        teacher = load_model(assets["teacher"], "float32", what="teacher").eval()
        options = SimpleNamespace(samples_per_prompt=2, max_new_tokens=budget["max_new_tokens"],
                                  seed=0)
        students = {}
        if budget.get("warm_steps"):
            students["stage1"] = Path(seed_dir) / "warm_bpe"
        for name in methods:
            if METHOD_TOKENIZER[name] == "bpe":
                settings = chosen[name]
                students[name] = Path(seed_dir) / f"{name}-{settings_key(settings)}"
        return {name: diagnose(path, teacher, tokenizer, rows, options)
                for name, path in students.items() if (path / "config.json").is_file()}
    finally:
        torch.set_num_threads(threads)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="student seeds (initialisation, pretraining and data order); "
                             "default 0 1 2 3 4")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="rows to train (default: all); the teacher row is always there")
    parser.add_argument("--max-steps", type=int, default=DEFAULT_BUDGET["max_steps"],
                        help=f"optimizer steps per student (default {DEFAULT_BUDGET['max_steps']})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BUDGET["batch_size"],
                        help=f"conversations per step (default {DEFAULT_BUDGET['batch_size']})")
    parser.add_argument("--learning-rate", type=float, default=DEFAULT_BUDGET["learning_rate"],
                        help=f"peak learning rate, every row (default "
                             f"{DEFAULT_BUDGET['learning_rate']})")
    parser.add_argument("--warm-steps", type=int, default=DEFAULT_BUDGET["warm_steps"],
                        help=f"stage 1: steps of SFT on the ground truth shared by every row "
                             f"before its method (default {DEFAULT_BUDGET['warm_steps']}; 0 = none: "
                             f"every row trains the pretrained student)")
    add_references_flag(parser, DEFAULT_BUDGET["references"])
    parser.add_argument("--no-select", action="store_true",
                        help="skip the validation search; use examples/toy_pipeline.ROW_SETTINGS")
    parser.add_argument("--workdir", default="runs/compare",
                        help="cache for assets, students and eval outputs (default runs/compare)")
    parser.add_argument("--output", default="benchmarks/results/compare_methods.json",
                        help="result JSON (a PNG chart with the same stem is written beside it)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per subprocess (OMP_NUM_THREADS; default 1: on a "
                             "shared or 2-core machine one thread is faster for these tiny models)")
    parser.add_argument("--verbose", action="store_true",
                        help="stream every subprocess's output, not only the progress lines")
    parser.add_argument("--annotate", metavar="JSON", default=None,
                        help="only recompute the summaries derived from the rows of an existing "
                             "result JSON (gap_closed, gap_by_family) and write them into it")
    return parser.parse_args(argv)


def main(argv=None):
    from examples.toy_assets import (DEFAULT_SETTINGS, build_assets, pretraining_seconds,
                                     settings_hash)
    from examples.toy_pipeline import (COMPARISON_METHODS, TEACHER_CACHE_DIR, build_teacher_cache,
                                       evaluate, generate_teacher_completions, train_methods)

    args = parse_args(argv)
    if args.annotate:
        where = annotate(args.annotate)
        if where and where["many_answer_share"] is not None:
            print(f"{args.annotate}: gap {where['gap']:.3f}; share on the many-answer families "
                  f"({', '.join(where['many_answer_families'])}): "
                  f"{where['many_answer_share']:.1%}")
        else:
            print(f"{args.annotate}: the teacher is not ahead of the baseline: no gap to share")
        return None
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    methods = args.methods or list(COMPARISON_METHODS)
    unknown = set(methods) - set(COMPARISON_METHODS)
    if unknown:
        raise SystemExit(f"unknown --methods {sorted(unknown)}; choose from "
                         f"{list(COMPARISON_METHODS)}")
    started = time.perf_counter()
    budget = {**DEFAULT_BUDGET, "max_steps": args.max_steps, "warm_steps": args.warm_steps,
              "batch_size": args.batch_size, "learning_rate": args.learning_rate}
    if not 0 <= budget["warm_steps"] < budget["max_steps"]:
        raise SystemExit("--warm-steps must be in [0, --max-steps)")
    try:
        budget = with_references(budget, args.references)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    references = budget.get("references")
    workdir = Path(args.workdir)
    echo = "all" if args.verbose else "progress"
    assets = build_assets(DEFAULT_SETTINGS, workdir / "assets", echo=echo)
    # Students and evals depend on the assets and the budget: key their directory by both.
    runs = workdir / f"runs-{settings_hash({'assets': DEFAULT_SETTINGS, 'budget': budget})}"
    completions = runs / "teacher_completions.jsonl"
    teacher_pass_seconds = generate_teacher_completions(assets, completions, budget, echo=echo) \
        if "sequence_level" in methods or references else None
    cache_seconds, cache_meta = None, None
    if "token_level_cached" in methods:
        from examples.toy_assets import student_init

        cache_dir = runs / TEACHER_CACHE_DIR
        cache_seconds = build_teacher_cache(
            assets, cache_dir, student_init(assets, "bpe", args.seeds[0]), budget, completions,
            echo=echo)
        cache_meta = json.loads((cache_dir / "meta.json").read_text())

    selection, eval_seconds = None, 0.0
    if args.no_select:
        from examples.toy_pipeline import ROW_SETTINGS

        chosen = {name: ROW_SETTINGS[name] for name in methods}
    else:
        selection, seconds = select_settings(assets, methods, runs, completions, budget, echo)
        eval_seconds += seconds
        chosen = {name: entry["chosen"] for name, entry in selection.items()}

    per_seed, diagnostics = {}, {}
    for seed in args.seeds:
        seed_dir = runs / f"seed{seed}"
        trained = train_methods(assets, methods, seed, seed_dir, completions, budget,
                                row_settings=chosen, echo=echo)
        diagnostics[seed] = {name: training_diagnostics(path) for name, (path, _) in trained.items()}
        print(f"[seed {seed}] scoring {len(trained)} students and the teacher with eval.py, "
              f"one task family at a time (logs in {seed_dir / 'eval'})", flush=True)
        per_family = {}
        for family in toy_task.FAMILIES:
            per_family[family], seconds = evaluate(
                [path for path, _ in trained.values()], assets["teacher"],
                assets["data"][f"test_{family}"], seed_dir / "eval" / f"{family}.json",
                seed_dir / "eval" / f"{family}.log", budget["max_new_tokens"])
            eval_seconds += seconds
        by_model = combine_families(per_family)
        rows = {"teacher": {**by_model[assets["teacher"]],
                            "train_seconds": assets["teacher_seconds"]}}
        for name, (path, seconds) in trained.items():
            rows[name] = {**by_model[path], "train_seconds": seconds}
        for metrics in rows.values():
            metrics.pop("teacher", None)
        per_seed[seed] = rows
        print(f"[seed {seed}] exact match: " + ", ".join(
            f"{name} {metrics['exact_match']:.3f}" for name, metrics in rows.items()), flush=True)

    rows = aggregate_rows(per_seed)
    for row in rows:
        if row["name"] == "teacher":
            continue
        row["stage2_settings"] = chosen[row["name"]]
        if selection:
            row["selection"] = selection[row["name"]]
        row["training_diagnostics"] = {seed: diagnostics[seed][row["name"]] for seed in args.seeds}
    warm_seconds = sum(warm_start_seconds(runs / f"seed{seed}") for seed in args.seeds)
    student_diagnosis = diagnose_first_seed(assets, runs / f"seed{args.seeds[0]}", methods,
                                            chosen, budget)
    wall_seconds = time.perf_counter() - started
    # Every stage's own wall time, cached or not: what the whole comparison costs from scratch.
    student_seconds = sum(s["train_seconds"] for rows_of_seed in per_seed.values()
                          for name, s in rows_of_seed.items() if name != "teacher")
    pretrain_seconds = sum(pretraining_seconds(assets, which, seed)
                           for seed in args.seeds for which in ("bpe", "sp"))
    total_seconds = (assets["teacher_seconds"] + (teacher_pass_seconds or 0.0)
                     + (cache_seconds or 0.0) + pretrain_seconds + warm_seconds + student_seconds
                     + eval_seconds)
    settings = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix() if argv is None
                                         else "benchmarks/compare_methods.py",
                                         *(sys.argv[1:] if argv is None else argv)]),
        "seeds": args.seeds, "budget": budget,
        "budget_conversations": budget["max_steps"] * budget["batch_size"],
        "assets": DEFAULT_SETTINGS, "teacher_training_seconds": assets["teacher_seconds"],
        "teacher_held_out_exact_match_at_build": assets["teacher_exact_match"],
        "sequence_level_teacher_pass_seconds": teacher_pass_seconds,
        "teacher_cache": None if cache_meta is None else {
            "build_seconds": cache_seconds, "top_k": cache_meta["identity"]["top_k"],
            "supervised_positions": cache_meta["num_rows"], "bytes": cache_meta["bytes"],
            "bytes_per_supervised_token": cache_meta["bytes_per_supervised_token"],
            "note": "built once by a one-step token_level.py run (teacher load + one pass over "
                    "the whole training set + one step), read by every seed's "
                    "token_level_cached run, which never loads the teacher"},
        "teacher_note": "one teacher, trained once and cached; its row repeats its evaluation "
                        "in every seed's eval.py run, and its train_seconds is the one training",
        "eval": {"dataset": "held-out test split, one eval.py run per task family, combined "
                            "exactly", "families": list(toy_task.FAMILIES),
                 "max_new_tokens": budget["max_new_tokens"], "decoding": "greedy"},
        "machine": machine_description(), "code": code_version(),
        "total_seconds": total_seconds,
        "total_seconds_parts": {"teacher_training": assets["teacher_seconds"],
                                "sequence_level_teacher_pass": teacher_pass_seconds,
                                "teacher_cache_build": cache_seconds,
                                "student_pretraining": pretrain_seconds,
                                "stage1_warm_start": warm_seconds,
                                "student_training": student_seconds, "evaluation": eval_seconds},
        "total_seconds_note": "sum of every stage's wall time (teacher training, teacher pass, "
                              "student pretraining, all student runs, all eval.py runs), whether "
                              "computed now or read from the cache; this invocation took "
                              "wall_seconds",
        "student_note": "each seed's two students (one per tokenizer) are randomly initialised "
                        "with that seed and pretrained on the raw training text (question and "
                        "answer as plain text, no chat template) before any method; every row "
                        "of that seed starts from them",
        "wall_seconds": wall_seconds,
        "protocol": {
            "stage1": (f"SFT on the first {references} rows of the training set's first half, "
                       f"the only reference replies there are" if references else
                       "SFT on the ground truth of the training set's first half")
                      + f", {budget['warm_steps']} steps at learning rate "
                        f"{budget['learning_rate']}, shared by every row of a seed and tokenizer",
            "stage2": f"the row's method on the second half, "
                      f"{budget['max_steps'] - budget['warm_steps']} steps; baselines continue SFT"
                      + (f" on the same {references} reference replies; every distillation row "
                         f"learns from the teacher on all of stage 2's prompts, with the "
                         f"teacher's greedy replies (sequence_level's data) as its data"
                         if references else ""),
            "selection": None if args.no_select else {
                "seed": SELECTION_SEED, "validation_rows": VALIDATION_ROWS,
                "learning_rates": list(LEARNING_RATES),
                "method_knobs": {name: selection_knobs(name, references)
                                 for name in METHOD_KNOBS},
                "criterion": "highest validation exact match; ties go to the first setting "
                             "of the grid",
                "validation": "generated after the training and test rows from the same task "
                              "seed (examples/toy_task.generate_validation): disjoint from both"},
        },
        "student_diagnosis": student_diagnosis,
    }
    settings["gap_closed"] = gap_closed(rows)
    settings["gap_by_family"] = gap_by_family(rows,
                                              held_out_family_sizes(DEFAULT_SETTINGS["task"]))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"primary_metric": PRIMARY_METRIC, "settings": settings,
                                  "rows": rows}, indent=2) + "\n")
    table = markdown_table(rows, toy_task.FAMILIES)
    print(table)
    print()
    print(summary_table(rows))
    for row in rows:
        for reference in [EXTRA_PAIRED.get(row["name"])]:
            delta = row.get(f"{PRIMARY_METRIC}_minus_{reference}") if reference else None
            if delta:
                print(f"{row['name']} - {reference}: {delta['mean']:+.3f} ± {delta['std']:.3f} "
                      f"exact match, paired by seed ({delta['wins']}/{delta['seeds']} seeds "
                      f"higher)")
    print(f"\nresults written to {output} (the whole comparison: {total_seconds / 60:.1f} min of "
          f"compute; this run: {wall_seconds / 60:.1f} min)")
    try:
        plot(rows, list(toy_task.FAMILIES), output.with_suffix(".png"))
        print(f"chart written to {output.with_suffix('.png')}")
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
    return rows


if __name__ == "__main__":
    main()
