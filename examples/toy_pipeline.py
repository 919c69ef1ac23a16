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
# Which student initialisation (tokenizer) each method trains.
METHOD_TOKENIZER = {name: ("sp" if name.startswith("cross_tokenizer") else "bpe")
                    for name in METHODS}
TIMING_FILE = "train_seconds.json"


def budget_flags(budget, seed):
    """The flags every training run shares: the budget, the optimizer and the data order."""
    return ["--max-steps", budget["max_steps"], "--batch-size", budget["batch_size"],
            "--learning-rate", budget["learning_rate"], "--warmup-ratio", budget["warmup_ratio"],
            "--seed", seed, "--save-steps", 0, "--log-steps", budget["log_steps"],
            "--max-length", 128]


def method_command(name, assets, students, completions, output_dir, budget, seed):
    """The argument list (script first) that trains row `name` into `output_dir`."""
    train = assets["data"]["train"]
    teacher = assets["teacher"]
    student = students[METHOD_TOKENIZER[name]]
    common = ["--output-dir", output_dir, "--overwrite", *budget_flags(budget, seed)]
    if name in ("baseline", "cross_tokenizer_baseline"):
        return ["sequence_level.py", "--student", student, "--completions", train, *common]
    if name == "sequence_level":
        return ["sequence_level.py", "--student", student, "--completions", completions, *common]
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


def train_methods(assets, methods, seed, run_dir, completions, budget, log=print, echo="progress"):
    """Train every method of one seed; returns {method: (student dir, training seconds)}.

    A finished run (its run_config.json exists, plus our timing sidecar) is reused, so a killed
    comparison resumes where it stopped.
    """
    run_dir = Path(run_dir)
    students = {which: student_init(assets, which, seed, log=log) for which in ("bpe", "sp")}
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
        command = method_command(name, assets, students, completions, output_dir, budget, seed)
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

    Cached in `output` (and its wall time in a sidecar)."""
    output = Path(output)
    timing = output.with_suffix(".seconds.json")
    if output.is_file() and timing.is_file():
        return json.loads(output.read_text()), json.loads(timing.read_text())["seconds"]
    seconds = run_script(["eval.py", "--models", *models, "--teacher", teacher, "--dataset",
                          dataset, "--max-new-tokens", max_new_tokens, "--batch-size", 64,
                          "--output", output, "--no-progress"], log_path, echo=echo)
    timing.write_text(json.dumps({"seconds": seconds}) + "\n")
    return json.loads(output.read_text()), seconds
