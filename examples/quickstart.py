"""The whole suite on one small, fully offline problem, in one command (about 5 minutes on a
2-core CPU; everything is cached, so a rerun only re-scores, and `--seed 1` reuses the teacher):

    python examples/quickstart.py                 # writes into runs/quickstart/

1. Generates a toy instruction task from a seed (examples/toy_task.py): arithmetic, list reversal,
   counting, and two families with many right answers ("name a fruit that starts with b").
2. Trains two tokenizers on it (byte-level BPE; SentencePiece-style) and a 0.9M-parameter Llama
   teacher from scratch, by plain SFT with sequence_level.py (cached under --workdir).
3. Trains a 0.2M-parameter student (briefly pretrained on the raw task text) with every method of
   the suite, each through its own script, from the same initialisation and with the same small
   budget. As when a user distils, only 500 training prompts have a reference reply (--references):
   every row starts from the student fine-tuned on them (stage 1); then the baselines continue
   fine-tuning on them, while sequence_level, token_level (forward and reverse KL), on_policy and
   cross_tokenizer (a student with the other tokenizer, beside its own SFT baseline) learn from
   the teacher on all of the other half's prompts.
4. Scores them all with eval.py on held-out prompts and prints its table.

One seed: expect noise of several points between rows. The published comparison is
benchmarks/compare_methods.py (same pipeline and budget, a longer-trained teacher, five seeds and
a validation search for each row's settings).
"""

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from examples.toy_assets import DEFAULT_SETTINGS, build_assets, run_script  # noqa: E402
from examples.toy_pipeline import (METHODS, add_references_flag,  # noqa: E402
                                   generate_teacher_completions, train_methods, with_references)

# The comparison's task and models, with a teacher trained half as long (it still answers ~86% of
# the held-out prompts), to fit in 5 minutes.
QUICKSTART_SETTINGS = {**DEFAULT_SETTINGS,
                       "teacher_training": {**DEFAULT_SETTINGS["teacher_training"],
                                            "max_steps": 1000}}
# The comparison's student budget (one seed of it): references are scarce, as when a user
# distils, with 500 training prompts that have a reference reply.
QUICKSTART_BUDGET = {"max_steps": 600, "warm_steps": 300, "batch_size": 32, "learning_rate": 3e-3,
                     "warmup_ratio": 0.03, "max_new_tokens": 24, "log_steps": 25,
                     "references": 500}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/quickstart",
                        help="where the cached assets, students and results go "
                             "(default runs/quickstart)")
    parser.add_argument("--seed", type=int, default=0, help="student seed (default 0)")
    parser.add_argument("--max-steps", type=int, default=QUICKSTART_BUDGET["max_steps"],
                        help=f"optimizer steps per student (default "
                             f"{QUICKSTART_BUDGET['max_steps']})")
    add_references_flag(parser, QUICKSTART_BUDGET["references"])
    parser.add_argument("--verbose", action="store_true",
                        help="show every script's whole output, not only its progress lines")
    args = parser.parse_args()
    started = time.perf_counter()
    echo = "all" if args.verbose else "progress"
    budget = {**QUICKSTART_BUDGET, "max_steps": args.max_steps}
    try:
        budget = with_references(budget, args.references)
    except ValueError as error:
        parser.error(str(error))
    if not budget["warm_steps"] < budget["max_steps"]:
        parser.error(f"--max-steps must be above the {budget['warm_steps']} steps of stage 1")
    workdir = Path(args.workdir)

    def log(message):
        print(f"[{(time.perf_counter() - started) / 60:4.1f} min] {message}", flush=True)

    log("step 1/4: toy task, tokenizers and the teacher (built once, then reused)")
    assets = build_assets(QUICKSTART_SETTINGS, workdir / "assets", log=log, echo=echo)
    run_dir = workdir / (f"seed{args.seed}_steps{budget['max_steps']}"
                         + (f"_references{budget['references']}" if "references" in budget
                            else ""))

    log("step 2/4: the sequence-level teacher pass")
    completions = run_dir / "teacher_completions.jsonl"
    generate_teacher_completions(assets, completions, budget, log=log, echo=echo)

    log(f"step 3/4: one student per method, same initialisation, {budget['max_steps']} steps x "
        f"batch {budget['batch_size']} each")
    trained = train_methods(assets, METHODS, args.seed, run_dir, completions, budget, log=log,
                            echo=echo)

    log("step 4/4: eval.py on the held-out prompts (exact match against each row's accepted "
        "answers, ROUGE-L, perplexity, agreement with the teacher, speed)")
    results = run_dir / "eval.json"
    # The table is eval.py's own stdout; the per-model notes and warnings stay in the log.
    run_script(["eval.py", "--models", *[path for path, _ in trained.values()],
                "--teacher", assets["teacher"], "--dataset", assets["data"]["test"],
                "--max-new-tokens", budget["max_new_tokens"], "--batch-size", 64,
                "--output", results, "--no-progress"], run_dir / "eval.log", echo="none")
    table = (run_dir / "eval.log").read_text().split("\n")
    print()
    print("\n".join(line for line in table if line.startswith(("|", "Bold", "- "))))
    print()
    for name, (path, seconds) in trained.items():
        print(f"  {name:<26} {path}  (trained in {seconds:.0f} s)")
    log(f"done; numbers in {results}. Rows are one seed: see benchmarks/compare_methods.py for "
        f"means over seeds")


if __name__ == "__main__":
    main()
