"""The method comparison's pipeline, shared by examples/quickstart.py (one seed, small budget) and
benchmarks/compare_methods.py (several seeds, the published budget).

Every row is trained by the suite's own command-line script, run as a subprocess exactly as a user
would type it; nothing here re-implements a method:

    baseline                  sequence_level.py --student S --completions train.jsonl  (SFT on the
                              ground truth: no teacher, the dataset's own replies)
    sequence_level            sequence_level.py --student S --completions teacher.jsonl  (the
                              teacher's greedy completions, generated once for every seed)
    token_level_forward       token_level.py --kl forward
    token_level_reverse       token_level.py --kl reverse
    token_level_cached        token_level.py --teacher-cache DIR, no --teacher: forward KL from
                              the teacher's top-32 per position, cached once for every seed
                              (benchmarks/compare_methods.py only, not the quickstart)
    on_policy                 on_policy.py  (GKD: --lmbda 0.5, reverse KL, the script's defaults)
    cross_tokenizer           cross_tokenizer.py  (ULD, a student with the other tokenizer)
    cross_tokenizer_baseline  sequence_level.py on the ground truth, with that same
                              other-tokenizer student

All rows of one seed start from the same student initialisation (one per tokenizer) and get the
same budget: --max-steps x --batch-size conversations, the same learning rate and schedule.
"""

import json
from pathlib import Path

from examples.toy_assets import run_script, student_init

METHODS = ("baseline", "sequence_level", "token_level_forward", "token_level_reverse",
           "on_policy", "cross_tokenizer", "cross_tokenizer_baseline")
# The published comparison adds the offline-teacher row (its cache build would lengthen the
# quickstart by a teacher pass over the whole training set).
COMPARISON_METHODS = METHODS[:3] + ("token_level_cached",) + METHODS[3:]
# Which student initialisation (tokenizer) each method trains.
METHOD_TOKENIZER = {name: ("sp" if name.startswith("cross_tokenizer") else "bpe")
                    for name in COMPARISON_METHODS}
TEACHER_CACHE_DIR = "teacher_cache"  # under the runs directory, shared by every seed
TIMING_FILE = "train_seconds.json"


def budget_flags(budget, seed):
    """The flags every training run shares: the budget, the optimizer and the data order."""
    return ["--max-steps", budget["max_steps"], "--batch-size", budget["batch_size"],
            "--learning-rate", budget["learning_rate"], "--warmup-ratio", budget["warmup_ratio"],
            "--seed", seed, "--save-steps", 0, "--log-steps", budget["log_steps"],
            "--max-length", 128]


def method_command(name, assets, students, completions, output_dir, budget, seed,
                   teacher_cache=None):
    """The argument list (script first) that trains row `name` into `output_dir`."""
    train = assets["data"]["train"]
    teacher = assets["teacher"]
    student = students[METHOD_TOKENIZER[name]]
    common = ["--output-dir", output_dir, "--overwrite", *budget_flags(budget, seed)]
    if name in ("baseline", "cross_tokenizer_baseline"):
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


def generate_teacher_completions(assets, path, max_new_tokens, num_prompts, log=print,
                                 echo="progress"):
    """The sequence-level teacher pass, once (cached in `path`): the teacher answers the first
    `num_prompts` training prompts, as many conversations as the training budget consumes.

    Returns its wall time in seconds, read back from a sidecar when the cache was already there.
    """
    path = Path(path)
    timing = path.with_suffix(".seconds.json")
    if path.is_file() and timing.is_file():
        seconds = json.loads(timing.read_text())["seconds"]
        log(f"[teacher pass] reusing {path} (generated in {seconds:.0f} s)")
        return seconds
    log(f"[teacher pass] the teacher answers {num_prompts} training prompts once (greedy), for "
        f"sequence_level (log {path.parent / 'teacher_pass.log'})")
    seconds = run_script(
        ["sequence_level.py", "--teacher", assets["teacher"], "--dataset",
         assets["data"]["train"], "--completions", path, "--generate-only", "--output-dir",
         path.parent / "teacher_pass", "--max-new-tokens", max_new_tokens,
         "--generation-batch-size", 64, "--max-samples", num_prompts],
        path.parent / "teacher_pass.log", echo=echo)
    timing.write_text(json.dumps({"seconds": seconds}) + "\n")
    log(f"[teacher pass] done in {seconds:.0f} s")
    return seconds


def build_teacher_cache(assets, cache_dir, student, budget, log=print, echo="progress"):
    """The offline teacher pass for token_level_cached, once (cached in `cache_dir`): the teacher's
    top-32 log-probs at every supervised position of the training set, written by token_level.py
    itself (a one-step run with --teacher-cache; only the student's tokenizer matters for the
    cache). Returns its wall time in seconds, read back from a sidecar when already built."""
    cache_dir = Path(cache_dir)
    timing = cache_dir.parent / f"{cache_dir.name}.seconds.json"
    meta = cache_dir / "meta.json"
    if timing.is_file() and meta.is_file() and json.loads(meta.read_text()).get("complete"):
        seconds = json.loads(timing.read_text())["seconds"]
        log(f"[teacher cache] reusing {cache_dir} (built in {seconds:.0f} s)")
        return seconds
    log(f"[teacher cache] the teacher scores the whole training set once, for "
        f"token_level_cached (log {cache_dir.parent / 'teacher_cache.log'})")
    scratch = cache_dir.parent / "teacher_cache_build_run"
    command = ["token_level.py", "--teacher", assets["teacher"], "--student", student,
               "--dataset", assets["data"]["train"], "--teacher-cache", cache_dir,
               "--output-dir", scratch, "--overwrite", *budget_flags(budget, 0),
               "--max-steps", 1]
    seconds = run_script(command, cache_dir.parent / "teacher_cache.log", echo=echo)
    timing.write_text(json.dumps({"seconds": seconds}) + "\n")
    log(f"[teacher cache] done in {seconds:.0f} s "
        f"({json.loads(meta.read_text())['bytes_per_supervised_token']} bytes per supervised token)")
    return seconds


def train_methods(assets, methods, seed, run_dir, completions, budget, log=print, echo="progress"):
    """Train every method of one seed; returns {method: (student dir, training seconds)}.

    A finished run (its run_config.json exists, plus our timing sidecar) is reused, so a killed
    comparison resumes where it stopped. token_level_cached reads the teacher cache of
    `run_dir`'s parent (built by build_teacher_cache, once for every seed).
    """
    run_dir = Path(run_dir)
    students = {which: student_init(assets, which, seed, log=log) for which in ("bpe", "sp")}
    teacher_cache = run_dir.parent / TEACHER_CACHE_DIR
    if "token_level_cached" in methods:
        build_teacher_cache(assets, teacher_cache, students["bpe"], budget, log=log, echo=echo)
    trained = {}
    for index, name in enumerate(methods, start=1):
        output_dir = run_dir / name
        timing = output_dir / TIMING_FILE
        if (output_dir / "run_config.json").is_file() and timing.is_file():
            seconds = json.loads(timing.read_text())["seconds"]
            log(f"[seed {seed}] {index}/{len(methods)} {name}: reusing {output_dir} "
                f"(trained in {seconds:.0f} s)")
            trained[name] = (str(output_dir), seconds)
            continue
        command = method_command(name, assets, students, completions, output_dir, budget, seed,
                                 teacher_cache)
        log(f"[seed {seed}] {index}/{len(methods)} {name}: python "
            f"{' '.join(map(str, command[:1]))} ... ({budget['max_steps']} steps x batch "
            f"{budget['batch_size']}; log {run_dir / (name + '.log')})")
        seconds = run_script(command, run_dir / f"{name}.log", echo=echo)
        timing.write_text(json.dumps({"seconds": seconds}) + "\n")
        log(f"[seed {seed}] {index}/{len(methods)} {name}: done in {seconds:.0f} s")
        trained[name] = (str(output_dir), seconds)
    return trained


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
