"""Everything the quickstart and the method comparison need before any distillation starts, built
offline and cached: the toy task's data, two tokenizers trained on it, a teacher trained from
scratch, and untrained student initialisations.

    assets = build_assets(SETTINGS, "runs/toy_assets")   # reuses runs/toy_assets/<hash>/ if there

The cache directory is named by a hash of the settings that generate it, so changing any of them
(data size, model sizes, teacher steps...) builds afresh and an unchanged rerun costs nothing.

- Byte-level BPE tokenizer (GPT-2 / Llama 3 style, digits split one by one as Llama's are) with a
  role-token chat template: the teacher's and the same-vocabulary students'.
- SentencePiece-style tokenizer (Metaspace '▁', byte fallback, digits split) with a Llama-2-style
  [INST] template: the cross-tokenizer student's.
- The teacher (Llama architecture) is trained by plain SFT through sequence_level.py itself (no
  teacher, `--completions train.jsonl`), exactly as a user would fine-tune a model with the suite.
- Students are 4-10x smaller, random initialisations, one per tokenizer and per seed.
"""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from examples import toy_task  # noqa: E402

PAD, BOS, END = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Role tokens, one end-of-turn token, no date or default system prompt: short sequences, fast CPU.
BPE_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}{{ message['content'] | trim }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

SP_PAD, SP_BOS, SP_EOS = "<pad>", "<s>", "</s>"
SP_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] | trim }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] | trim }}{{ eos_token }}"
    "{% else %}<<SYS>> {{ message['content'] | trim }} <</SYS>>{% endif %}"
    "{% endfor %}"
)

# The defaults of the comparison; the quickstart shrinks the budget, not the task.
DEFAULT_SETTINGS = {
    "task": {"seed": 0, "num_train": 10000, "num_test": 250, "max_digits": 3, "reverse_words": 4,
             "max_words": 6},
    "bpe_vocab_size": 512,
    "sp_vocab_size": 384,  # merges + characters, besides the 256 byte-fallback tokens
    "teacher": {"hidden_size": 128, "num_layers": 4, "intermediate_size": 384, "heads": 4,
                "kv_heads": 2},
    "student": {"hidden_size": 64, "num_layers": 3, "intermediate_size": 192, "heads": 4,
                "kv_heads": 2},
    "teacher_training": {"max_steps": 2000, "batch_size": 32, "learning_rate": 2e-3,
                         "warmup_ratio": 0.03, "weight_decay": 0.0, "seed": 0},
}


def settings_hash(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def teacher_settings(settings):
    """What the data, tokenizers and teacher depend on (not the student's shape)."""
    return {key: value for key, value in settings.items() if key != "student"}


def build_bpe_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, END, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=END, pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS, chat_template=BPE_CHAT_TEMPLATE)


def build_sentencepiece_tokenizer(texts, vocab_size):
    """Metaspace + byte fallback. The 256 <0x..> byte tokens are ordinary vocabulary entries (as
    in Llama 2's), not special tokens: decode(skip_special_tokens=True) must keep them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        pre_tokenizers.Digits(individual_digits=True)])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256,
                                  special_tokens=[SP_PAD, SP_BOS, SP_EOS] + byte_tokens,
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # The trainer registers every special token as an added token; demote the byte tokens.
    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_tokens]
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=SP_BOS, eos_token=SP_EOS, pad_token=SP_PAD,
        chat_template=SP_CHAT_TEMPLATE)


def build_model(tokenizer, config, seed):
    """A randomly initialised Llama for `tokenizer` (embeddings not tied, as in larger Llamas)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_layers"],
        num_attention_heads=config["heads"], num_key_value_heads=config["kv_heads"],
        max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def save_model(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def run_script(args, log_path, echo="progress"):
    """Run one of the suite's scripts as a user would, its whole output going to `log_path`.

    echo: "progress" repeats the training loop's log lines ("step 00100/300 | loss ...") and
    errors on the terminal, "all" everything, "none" nothing. Raises with the log's tail if the
    script fails. Returns its wall time in seconds.
    """
    command = [sys.executable, *map(str, args)]
    # One torch thread per run unless told otherwise: for these tiny models a second thread gains
    # little on 2 cores and loses a lot when other processes share them.
    env = {"OMP_NUM_THREADS": "1", **os.environ, "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        # Text mode reads tqdm's carriage-return updates as lines too; only the log gets them.
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in process.stdout:
            log.write(line)
            log.flush()  # the log is what a user watches (tail -f) during a long run
            if echo == "all" or (echo == "progress" and line.startswith(("step ", "error"))):
                print("      " + line.rstrip(), flush=True)
        process.wait()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"{Path(str(args[0])).name} failed (exit {process.returncode}); "
                           f"log {log_path}:\n{tail}")
    return seconds


def build_assets(settings, workdir, log=print, echo="progress"):
    """Build (or reuse) data, tokenizers, the trained teacher and student initialisations.

    Returns a dict of paths plus the teacher's training seconds; everything lives in
    WORKDIR/<hash of the settings but the student's>/, with `assets.json` written last as the
    completeness marker. Student initialisations go in a subdirectory keyed by their own shape.
    """
    root = Path(workdir) / settings_hash(teacher_settings(settings))
    done_marker = root / "assets.json"
    if done_marker.is_file():
        assets = {**json.loads(done_marker.read_text()), "settings": settings}
        log(f"[assets] reusing {root} (teacher trained in {assets['teacher_seconds']:.0f} s, "
            f"held-out exact match {assets['teacher_exact_match']:.3f})")
        return assets
    root.mkdir(parents=True, exist_ok=True)
    task = settings["task"]
    log(f"[assets] building in {root}: toy task (seed {task['seed']}, {task['num_train']} train / "
        f"{task['num_test']} test rows), two tokenizers, the teacher")
    paths = {key: str(path) for key, path in toy_task.write_task(root / "data", **task).items()}
    texts = list(toy_task.corpus(toy_task.read_jsonl(paths["train"])))
    bpe = build_bpe_tokenizer(texts, settings["bpe_vocab_size"])
    sp = build_sentencepiece_tokenizer(texts, settings["sp_vocab_size"])
    bpe.save_pretrained(root / "tokenizer_bpe")
    sp.save_pretrained(root / "tokenizer_sp")

    teacher_init = root / "teacher_init"
    save_model(build_model(bpe, settings["teacher"], seed=settings["teacher_training"]["seed"]),
               bpe, teacher_init)
    training = settings["teacher_training"]
    teacher = root / "teacher"
    log(f"[assets] training the teacher from scratch: sequence_level.py as plain SFT on the "
        f"ground truth, {training['max_steps']} steps x batch {training['batch_size']} "
        f"(log: {root / 'teacher.log'})")
    seconds = run_script(
        ["sequence_level.py", "--student", teacher_init, "--completions", paths["train"],
         "--output-dir", teacher, "--overwrite", "--max-steps", training["max_steps"],
         "--batch-size", training["batch_size"], "--learning-rate", training["learning_rate"],
         "--warmup-ratio", training["warmup_ratio"], "--weight-decay",
         training["weight_decay"], "--seed", training["seed"], "--save-steps", 0,
         "--log-steps", 100],
        root / "teacher.log", echo=echo)
    log(f"[assets] teacher trained in {seconds:.0f} s; checking it on the held-out prompts")
    report = root / "teacher_eval.json"
    run_script(["eval.py", "--models", teacher, "--dataset", paths["test"], "--max-new-tokens",
                32, "--batch-size", 64, "--output", report, "--no-progress"],
               root / "teacher_eval.log", echo="none")
    exact = json.loads(report.read_text())["results"][0]["exact_match"]
    log(f"[assets] teacher held-out exact match {exact:.3f}")
    assets = {"root": str(root), "data": paths, "tokenizer_bpe": str(root / "tokenizer_bpe"),
              "tokenizer_sp": str(root / "tokenizer_sp"), "teacher": str(teacher),
              "teacher_seconds": seconds, "teacher_exact_match": exact, "settings": settings}
    (root / "settings.json").write_text(json.dumps(teacher_settings(settings), indent=2) + "\n")
    done_marker.write_text(json.dumps(assets, indent=2) + "\n")
    return assets


def student_init(assets, which, seed):
    """Path of the untrained student for tokenizer `which` ("bpe" or "sp") and `seed`, built on
    first use. Every method of one seed starts from this same directory."""
    from transformers import AutoTokenizer

    student = assets["settings"]["student"]
    path = Path(assets["root"]) / f"students-{settings_hash(student)}" / f"{which}_seed{seed}"
    if not (path / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(assets[f"tokenizer_{which}"])
        save_model(build_model(tokenizer, student, seed=1000 + seed), tokenizer, path)
    return str(path)
