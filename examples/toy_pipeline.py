"""The method comparison's pipeline, shared by examples/quickstart.py (one seed, small budget) and
benchmarks/compare_methods.py (several seeds, the published budget).

Every row is trained by the suite's own command-line script, run as a subprocess exactly as a user
would type it; nothing here re-implements a method. Two stages, as GKD, MiniLLM and DistiLLM run
distillation (from a student already fine-tuned on the task):

    stage 1 (shared by every row of a seed and tokenizer): sequence_level.py as plain SFT on the
            ground-truth replies of the first half of the training set, --warm-steps steps
            (with budget["references"] = N, on its first N rows only: the only references).
    stage 2 (the row's own method, on the second half, the remaining steps):
    baseline                  sequence_level.py --completions train (more SFT on the ground truth)
    sequence_level            sequence_level.py --completions teacher.jsonl  (the teacher's greedy
                              completions of the second half's prompts, generated once)
    token_level_forward       token_level.py --kl forward
    token_level_reverse       token_level.py --kl reverse
    token_level_cached        token_level.py --teacher-cache DIR, no --teacher: forward KL from
                              the teacher's top-32 per position, cached once for every seed
                              (benchmarks/compare_methods.py only, not the quickstart)
    on_policy                 on_policy.py  (GKD)
    cross_tokenizer           cross_tokenizer.py  (ULD, a student with the other tokenizer)
    cross_tokenizer_baseline  more SFT on the ground truth for that other-tokenizer student

So each distillation row is paired with a baseline that had the same stage 1 and the same budget
(--max-steps x --batch-size conversations in all, no conversation seen twice); the difference is
what the method's stage 2 adds over more SFT. With scarce references the baselines fine-tune on
stage 1's N references again and every distillation row reads the teacher's replies to the second
half's prompts instead of references. --warm-steps 0 skips stage 1: every row then trains
the pretrained student on the whole training set. Each row's stage-2 learning rate and method
flags come from ROW_SETTINGS (chosen on a validation split by benchmarks/compare_methods.py
--select; the grid and the scores are in benchmarks/results/compare_methods.json).
"""

import json
from pathlib import Path

from examples import toy_task
from examples.toy_assets import run_script, student_init

METHODS = ("baseline", "sequence_level", "token_level_forward", "token_level_reverse",
           "on_policy", "cross_tokenizer", "cross_tokenizer_baseline")
# The published comparison adds the offline-teacher row (its cache build would lengthen the
# quickstart by a teacher pass over the whole training set).
COMPARISON_METHODS = METHODS[:3] + ("token_level_cached",) + METHODS[3:]
# Which student initialisation (tokenizer) each method trains.
METHOD_TOKENIZER = {name: ("sp" if name.startswith("cross_tokenizer") else "bpe")
                    for name in COMPARISON_METHODS}
BASELINES = ("baseline", "cross_tokenizer_baseline")
TEACHER_CACHE_DIR = "teacher_cache"  # under the runs directory, shared by every seed
TIMING_FILE = "train_seconds.json"

# Stage 2 of each row: learning rate and the method's own flags, as chosen by
# `benchmarks/compare_methods.py --select` (validation split, selection seed; see its JSON).
ROW_SETTINGS = {
    "baseline": {"learning_rate": 1e-3, "flags": []},
    "sequence_level": {"learning_rate": 3e-3, "flags": []},
    "token_level_forward": {"learning_rate": 3e-3, "flags": ["--alpha", 0.5]},
    "token_level_cached": {"learning_rate": 3e-3, "flags": []},
    "token_level_reverse": {"learning_rate": 3e-3,
                            "flags": ["--kl", "skew_reverse", "--alpha", 0.5]},
    "on_policy": {"learning_rate": 3e-3, "flags": ["--kl", "forward"]},
    "cross_tokenizer": {"learning_rate": 3e-3, "flags": ["--hybrid"]},
    "cross_tokenizer_baseline": {"learning_rate": 3e-3, "flags": []},
}


def training_data(assets, warm_steps):
    """{"warm": file or None, "method": file}: the halves of the training set that stage 1 and
    stage 2 read (written beside it once); with warm_steps 0, stage 2 reads all of it."""
    train = Path(assets["data"]["train"])
    if not warm_steps:
        return {"warm": None, "method": str(train)}
    halves = {"warm": train.with_name("train_half1.jsonl"),
              "method": train.with_name("train_half2.jsonl")}
    if not all(path.is_file() for path in halves.values()):
        rows = toy_task.read_jsonl(train)  # families alternate row by row: equal shares per half
        for (key, path), part in zip(halves.items(), (rows[:len(rows) // 2],
                                                      rows[len(rows) // 2:])):
            toy_task.write_jsonl(path.with_suffix(".tmp"), part)
            path.with_suffix(".tmp").replace(path)
    return {key: str(path) for key, path in halves.items()}


def add_references_flag(parser, default):
    """--references N|all, shared by the quickstart and the comparison (see with_references)."""
    parser.add_argument("--references", default=str(default), metavar="N|all",
                        help=f"how many training prompts have a reference reply: stage 1 and the "
                             f"baselines fine-tune on those N (cycled), every distillation row "
                             f"learns from the teacher on all of stage 2's prompts instead; 'all': "
                             f"every prompt has its reference and every row trains on them "
                             f"(default {default})")


def with_references(budget, value):
    """`budget` with --references `value` applied: 'all' drops the key (every prompt has its
    reference), N sets it. Raises ValueError naming the problem for anything else."""
    budget = dict(budget)
    if value == "all":
        budget.pop("references", None)
        return budget
    if not value.isdigit() or int(value) < 1 or not budget.get("warm_steps"):
        raise ValueError(f"--references {value}: give N >= 1 (with a stage 1, --warm-steps > 0) "
                         f"or 'all'")
    budget["references"] = int(value)
    return budget


def method_steps(budget):
    """Stage-2 optimizer steps: what the budget leaves after stage 1."""
    return budget["max_steps"] - budget.get("warm_steps", 0)


def reference_subset(train, references):
    """The first `references` rows of stage 1's data (written beside it once): with scarce
    references (budget["references"]) the only reference replies there are, which stage 1 and
    the baselines' stage 2 fine-tune on."""
    train = Path(train)
    path = train.with_name(f"{train.stem}_first{references}.jsonl")
    if not path.is_file():
        toy_task.write_jsonl(path.with_suffix(".tmp"), toy_task.read_jsonl(train)[:references])
        path.with_suffix(".tmp").replace(path)
    return str(path)


def budget_flags(budget, seed, steps, learning_rate):
    """The flags every training run shares: the budget, the optimizer and the data order."""
    return ["--max-steps", steps, "--batch-size", budget["batch_size"],
            "--learning-rate", learning_rate, "--warmup-ratio", budget["warmup_ratio"],
            "--seed", seed, "--save-steps", 0, "--log-steps", budget["log_steps"],
            "--max-length", 128]


def warm_start(assets, which, seed, run_dir, budget, log=print, echo="progress"):
    """Stage 1 for tokenizer `which`: the pretrained student of `seed` fine-tuned on the first
    half's ground truth for budget["warm_steps"] steps (cached in run_dir). Returns (its
    directory, seconds); the pretrained student itself with 0 s when warm_steps is 0."""
    init = student_init(assets, which, seed, log=log)
    if not budget.get("warm_steps"):
        return init, 0.0
    output_dir = Path(run_dir) / f"warm_{which}"
    timing = output_dir / TIMING_FILE
    if (output_dir / "run_config.json").is_file() and timing.is_file():
        return str(output_dir), json.loads(timing.read_text())["seconds"]
    log(f"[seed {seed}] stage 1 ({which} student): SFT on the ground truth, "
        f"{budget['warm_steps']} steps x batch {budget['batch_size']}")
    data = training_data(assets, budget["warm_steps"])["warm"]
    if budget.get("references"):
        data = reference_subset(data, budget["references"])
    seconds = run_script(
        ["sequence_level.py", "--student", init, "--completions", data, "--output-dir", output_dir,
         "--overwrite", *budget_flags(budget, seed, budget["warm_steps"],
                                      budget["learning_rate"])],
        Path(run_dir) / f"warm_{which}.log", echo=echo)
    timing.write_text(json.dumps({"seconds": seconds}) + "\n")
    return str(output_dir), seconds


def method_command(name, assets, student, completions, output_dir, budget, seed, settings,
                   teacher_cache=None):
    """The argument list (script first) that runs stage 2 of row `name` into `output_dir`."""
    data = training_data(assets, budget.get("warm_steps", 0))
    train = data["method"]
    teacher = assets["teacher"]
    # "{completions}" in a row's flags names the teacher's replies to stage 2's prompts
    flags = [completions if flag == "{completions}" else flag
             for flag in settings.get("flags", [])]
    references = budget.get("references")
    if references and name in BASELINES:  # fine-tuning has only stage 1's N reference replies
        train = reference_subset(data["warm"], references)
    elif references and name == "on_policy" and "--completions" not in flags:
        flags += ["--completions", completions]  # off-policy steps on the teacher's replies
    elif references and name not in ("sequence_level", "on_policy"):
        flags = ["--dataset", completions, *flags]  # the teacher's replies stand in for them
    if "--dataset" in flags:  # a row's own training data replaces stage 2's ground truth
        index = flags.index("--dataset")
        train, flags = flags[index + 1], flags[:index] + flags[index + 2:]
    common = ["--output-dir", output_dir, "--overwrite",
              *budget_flags(budget, seed, method_steps(budget), settings["learning_rate"]),
              *flags]
    if name in BASELINES:
        return ["sequence_level.py", "--student", student, "--completions", train, *common]
    if name == "sequence_level":
        return ["sequence_level.py", "--student", student, "--completions", completions, *common]
    if name == "token_level_cached":  # no --teacher: the run reads only the cache
        return ["token_level.py", "--student", student, "--dataset", train, "--teacher-cache",
                teacher_cache, *common]
    if name.startswith("token_level_"):
        return ["token_level.py", "--teacher", teacher, "--student", student, "--dataset", train,
                "--kl", name.rsplit("_", 1)[1], *common]
    if name == "on_policy":
        return ["on_policy.py", "--teacher", teacher, "--student", student, "--dataset", train,
                "--max-new-tokens", budget["max_new_tokens"], *common]
    if name == "cross_tokenizer":
        return ["cross_tokenizer.py", "--teacher", teacher, "--student", student, "--dataset",
                train, *common]
    raise ValueError(f"unknown method {name}")


def generate_teacher_completions(assets, path, budget, log=print, echo="progress"):
    """The sequence-level teacher pass, once (cached in `path`): the teacher answers as many of
    stage 2's training prompts as stage 2 consumes (steps x batch size).

    Returns its wall time in seconds, read back from a sidecar when the cache was already there.
    """
    path = Path(path)
    timing = path.with_suffix(".seconds.json")
    num_prompts = method_steps(budget) * budget["batch_size"]
    if path.is_file() and timing.is_file():
        seconds = json.loads(timing.read_text())["seconds"]
        log(f"[teacher pass] reusing {path} (generated in {seconds:.0f} s)")
        return seconds
    log(f"[teacher pass] the teacher answers {num_prompts} training prompts once (greedy), for "
        f"sequence_level (log {path.parent / 'teacher_pass.log'})")
    seconds = run_script(
        ["sequence_level.py", "--teacher", assets["teacher"], "--dataset",
         training_data(assets, budget.get("warm_steps", 0))["method"], "--completions", path,
         "--generate-only", "--output-dir", path.parent / "teacher_pass", "--max-new-tokens",
         budget["max_new_tokens"], "--generation-batch-size", 64, "--max-samples", num_prompts],
        path.parent / "teacher_pass.log", echo=echo)
    timing.write_text(json.dumps({"seconds": seconds}) + "\n")
    log(f"[teacher pass] done in {seconds:.0f} s")
    return seconds


def build_teacher_cache(assets, cache_dir, student, budget, completions=None, log=print,
                        echo="progress"):
    """The offline teacher pass for token_level_cached, once (cached in `cache_dir`): the teacher's
    top-32 log-probs at every supervised position of stage 2's training data (of the teacher's
    own replies, `completions`, when references are scarce), written by
    token_level.py itself (a one-step run with --teacher-cache; only the student's tokenizer
    matters for the cache). Returns its wall time in seconds, read back from a sidecar when
    already built."""
    cache_dir = Path(cache_dir)
    timing = cache_dir.parent / f"{cache_dir.name}.seconds.json"
    meta = cache_dir / "meta.json"
    if timing.is_file() and meta.is_file() and json.loads(meta.read_text()).get("complete"):
        seconds = json.loads(timing.read_text())["seconds"]
        log(f"[teacher cache] reusing {cache_dir} (built in {seconds:.0f} s)")
        return seconds
    log(f"[teacher cache] the teacher scores stage 2's training data once, for "
        f"token_level_cached (log {cache_dir.parent / 'teacher_cache.log'})")
    scratch = cache_dir.parent / "teacher_cache_build_run"
    command = ["token_level.py", "--teacher", assets["teacher"], "--student", student,
               "--dataset", (completions if budget.get("references") else
                             training_data(assets, budget.get("warm_steps", 0))["method"]),
               "--teacher-cache", cache_dir, "--output-dir", scratch, "--overwrite",
               *budget_flags(budget, 0, 1, budget["learning_rate"])]
    seconds = run_script(command, cache_dir.parent / "teacher_cache.log", echo=echo)
    timing.write_text(json.dumps({"seconds": seconds}) + "\n")
    log(f"[teacher cache] done in {seconds:.0f} s "
        f"({json.loads(meta.read_text())['bytes_per_supervised_token']} bytes per supervised token)")
    return seconds


def train_methods(assets, methods, seed, run_dir, completions, budget, row_settings=None,
                  log=print, echo="progress"):
    """Train every method of one seed; returns {method: (student dir, stage-2 seconds)}.

    row_settings: {method: {"learning_rate", "flags"}} for stage 2 (default ROW_SETTINGS). A
    finished run (its run_config.json exists, plus our timing sidecar) is reused, so a killed
    comparison resumes where it stopped; a row's directory is named by the method and its
    settings (token_level_forward-lr3e-03). token_level_cached reads the teacher cache of `run_dir`'s parent
    (built by build_teacher_cache, once for every seed).
    """
    run_dir = Path(run_dir)
    row_settings = {**ROW_SETTINGS, **(row_settings or {})}
    tokenizers = sorted({METHOD_TOKENIZER[name] for name in methods})
    students = {which: warm_start(assets, which, seed, run_dir, budget, log=log, echo=echo)[0]
                for which in tokenizers}
    teacher_cache = run_dir.parent / TEACHER_CACHE_DIR
    if "token_level_cached" in methods:
        build_teacher_cache(assets, teacher_cache, students["bpe"], budget, completions, log=log,
                            echo=echo)
    trained = {}
    for index, name in enumerate(methods, start=1):
        settings = row_settings[name]
        output_dir = run_dir / f"{name}-{settings_key(settings)}"
        timing = output_dir / TIMING_FILE
        if (output_dir / "run_config.json").is_file() and timing.is_file():
            seconds = json.loads(timing.read_text())["seconds"]
            log(f"[seed {seed}] {index}/{len(methods)} {name}: reusing {output_dir} "
                f"(trained in {seconds:.0f} s)")
            trained[name] = (str(output_dir), seconds)
            continue
        command = method_command(name, assets, students[METHOD_TOKENIZER[name]], completions,
                                 output_dir, budget, seed, settings, teacher_cache)
        log(f"[seed {seed}] {index}/{len(methods)} {name}: python {command[0]} "
            f"{settings_key(settings)} ({method_steps(budget)} steps x batch "
            f"{budget['batch_size']}; log {output_dir}.log)")
        seconds = run_script(command, Path(f"{output_dir}.log"), echo=echo)
        timing.write_text(json.dumps({"seconds": seconds}) + "\n")
        log(f"[seed {seed}] {index}/{len(methods)} {name}: done in {seconds:.0f} s")
        trained[name] = (str(output_dir), seconds)
    return trained


def settings_key(settings):
    """A readable, file-name-safe key of stage-2 settings: lr3e-03 or lr1e-03_alpha0.5."""
    parts = [f"lr{settings['learning_rate']:.0e}"]
    flags = [str(f) for f in settings.get("flags", [])]
    for index, flag in enumerate(flags):
        if flag.startswith("--"):
            value = flags[index + 1] if index + 1 < len(flags) and \
                not flags[index + 1].startswith("--") else "on"
            parts.append(f"{flag[2:].replace('-', '')}{value.strip('{}')}")
    return "_".join(parts)


def evaluate(models, teacher, dataset, output, log_path, max_new_tokens, echo="none"):
    """eval.py on `models` (+ the teacher) over `dataset`; returns (its JSON, seconds).

    Cached in `output` (and its wall time in a sidecar) while it scored the same models."""
    output = Path(output)
    timing = output.with_suffix(".seconds.json")
    if output.is_file() and timing.is_file():
        cached = json.loads(output.read_text())
        if {r["model"] for r in cached["results"]} == {str(m) for m in [*models, teacher]}:
            return cached, json.loads(timing.read_text())["seconds"]
    seconds = run_script(["eval.py", "--models", *models, "--teacher", teacher, "--dataset",
                          dataset, "--max-new-tokens", max_new_tokens, "--batch-size", 64,
                          "--output", output, "--no-progress"], log_path, echo=echo)
    timing.write_text(json.dumps({"seconds": seconds}) + "\n")
    return json.loads(output.read_text()), seconds
