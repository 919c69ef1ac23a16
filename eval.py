"""Score and compare students side by side: perplexity, ROUGE-L, exact match, agreement with the
teacher, generation speed and size, as a Markdown table (stdout), a JSON file and a bar chart.

Examples:
    python eval.py --models runs/kd runs/seq_kd Qwen/Qwen2.5-0.5B-Instruct \
        --teacher Qwen/Qwen2.5-1.5B-Instruct --dataset test.jsonl --max-samples 500 \
        --max-new-tokens 256 --batch-size 16 --output results.json --plot results.png

    # a Hub dataset: --dataset-split defaults to "test" here (a local file is one split)
    python eval.py --models runs/kd --dataset HuggingFaceH4/ultrachat_200k \
        --dataset-split test_sft --max-samples 200

    # offline, on tiny local models (see examples/tiny_setup.py):
    python examples/tiny_setup.py runs/tiny
    python eval.py --models runs/tiny/student runs/tiny/student_sp --teacher runs/tiny/teacher \
        --dataset runs/tiny/test.jsonl --max-samples 16 --max-new-tokens 12 \
        --output runs/tiny/r.json

Runs on one device (the GPU if there is one); no `accelerate launch`. Every directory the training
scripts write is a valid --models entry, and so is any Hugging Face causal LM. Each model is scored
with its own tokenizer and chat template. The teacher, when given, gets a row of its own.

Per model, on the held-out conversations:
    perplexity      exp(mean NLL) over every reference assistant token, masked as in training
    rouge_l         ROUGE-L F1 of the greedy reply to the conversation up to its LAST assistant
                    turn, against that turn's content
    exact_match     normalized reply == reference (or == any of the row's `answers`)
    kl_to_teacher   mean KL(p_teacher ‖ p_model) per supervised token, over the real vocabulary
    top1_agreement  fraction of supervised positions where both models' argmax agree
                    (both null, with the reason, when the tokenizer differs from the teacher's)
    tokens_per_second   generated tokens per second, batched
    parameters      parameter count
"""

import dataclasses
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from common.args import DataArguments, parse_args
from common.chat import read_chat_template
from common.errors import UserError, run_cli

# Trailing sentence punctuation dropped for exact match ("42." == "42"); brackets and quotes stay.
TRAILING_PUNCTUATION = ".,!?;:…。！？，；："


@dataclass
class EvalArguments:
    models: list[str] = field(default_factory=list, metadata={
        "help": "Models to score: local directories (e.g. a training script's --output-dir) or "
                "Hugging Face Hub ids, separated by spaces."})
    teacher: Optional[str] = field(default=None, metadata={
        "help": "Teacher (directory or Hub id): scored in its own row, and every model with the "
                "same tokenizer gets kl_to_teacher and top1_agreement."})
    max_new_tokens: int = field(default=256, metadata={
        "help": "Most tokens generated per reply (generation also stops at end of turn or EOS)."})
    batch_size: int = field(default=8, metadata={
        "help": "Conversations per forward pass and per generation batch."})
    output: Optional[str] = field(default=None, metadata={
        "help": "Write the numbers and the settings used to this JSON file."})
    plot: Optional[str] = field(default=None, metadata={
        "help": "Write a PNG bar chart of the metrics to this file (needs matplotlib)."})
    answers_field: str = field(default="answers", metadata={
        "help": "Column holding a list of accepted answers for exact match; rows without it are "
                "matched against the reference reply."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "Weight dtype for loading every model ('auto' = as stored). Metrics are computed "
                "in float32 either way."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow models/tokenizers that ship their own Python code (trusted repos only)."})
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bars."})
    chat_template: Optional[str] = field(default=None, metadata={
        "help": "Jinja chat template file for every model whose tokenizer has none (a base model, "
                "a GGUF conversion). Default: the generic <|user|>/<|assistant|> template of "
                "docs/data_and_masking.md, with a warning."})

    def __post_init__(self):
        if self.chat_template is not None:
            read_chat_template(self.chat_template)  # a bad path fails now, not after loading
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")


@dataclass
class EvalDataArguments(DataArguments):
    """The shared data options, with evaluation defaults."""
    dataset: Optional[str] = field(default=None, metadata={
        "help": "Held-out data: a local .jsonl/.json/.parquet/.csv file or a Hugging Face Hub "
                "dataset id. Rows need a messages column or prompt/response columns."})
    dataset_split: str = field(default="test", metadata={
        "help": "Split to use for a Hub dataset (ignored for a local file, which is one split)."})


def log(message):
    """Notes go to stderr so that stdout holds only the table."""
    print(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Data: the conversation, the prompt for generation and the reference reply


@dataclass
class Sample:
    messages: list  # the whole conversation (perplexity and teacher agreement)
    prompt_messages: list  # everything before the last assistant turn (generation)
    reference: str  # the last assistant turn's content
    answers: Optional[list]  # accepted answers for exact match, from the row's answers column


def accepted_answers(row, answers_field):
    """A list of answer strings, or None. Accepts ["a", "b"], "a" and SQuAD's {"text": [...]}."""
    answers = row.get(answers_field) if isinstance(row, dict) else None
    if isinstance(answers, dict):
        answers = answers.get("text")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list):
        return None
    answers = [a for a in answers if isinstance(a, str)]
    return answers or None


def load_samples(data_args, answers_field):
    """[Sample, ...] and a note on the rows skipped ('' if none)."""
    from common.data import describe_skips, load_conversation_rows

    pairs, skipped = load_conversation_rows(data_args, require_reply=True)
    samples = []
    for messages, row in pairs:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if not messages[last]["content"].strip():
            skipped["empty last assistant reply"] += 1
            continue
        samples.append(Sample(messages, messages[:last], messages[last]["content"],
                              accepted_answers(row, answers_field)))
    if not samples:
        raise UserError(f"no row of {data_args.dataset} has an assistant reply to score against "
                        f"({describe_skips(skipped, sum(skipped.values())) or 'no rows'}); "
                        f"rows need a user turn followed by a non-empty assistant reply (name "
                        f"the columns with --messages-field / --prompt-field / --response-field)")
    return samples, describe_skips(skipped, len(samples) + sum(skipped.values()))


# ---------------------------------------------------------------------------------------------
# Text metrics


def normalize_answer(text):
    """Lowercase, strip, collapse whitespace, drop trailing sentence punctuation."""
    return " ".join(text.lower().split()).rstrip(TRAILING_PUNCTUATION + " ")


def exact_match(generation, reference, answers=None):
    """1.0 if the normalized generation equals the reference, or any of `answers` when given."""
    candidates = answers if answers else [reference]
    return float(any(normalize_answer(generation) == normalize_answer(c) for c in candidates))


class _WordTokenizer:
    """rouge-score's own tokenizer keeps only [a-z0-9], so any non-Latin text would score 0;
    this one keeps Unicode word characters and is the same as it on ASCII text."""

    def tokenize(self, text):
        return re.findall(r"\w+", text.lower())


def rouge_l(generation, reference, scorer=None):
    """ROUGE-L F1 (longest common subsequence of words) of one generation against its reference."""
    if scorer is None:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
    return scorer.score(target=reference, prediction=generation)["rougeL"].fmeasure


# ---------------------------------------------------------------------------------------------
# Forward-pass metrics: perplexity and agreement with the teacher


def score_references(model, examples, vocab_size, batch_size, pad_token_id, teacher=None,
                     progress=True, desc="scoring"):
    """Sums over the supervised tokens of `examples` (ChatEncoder output).

    Returns {"tokens", "nll"} and, with a teacher fed the same input ids, {"kl", "top1"}: the summed
    KL(p_teacher ‖ p_model) and the count of positions where both argmaxes agree. Only the first
    `vocab_size` logits count (the tokenizer's real ids; embeddings may have padded rows).

    Memory: logits exist only at scored positions, a chunk of positions at a time (about 128 MiB
    of float32 logits per model), as in training (common/distill.py): at a 262,144-token
    vocabulary full logits at every position would be the largest tensors by far.
    """
    import torch
    from tqdm.auto import tqdm

    from common.chat import collate
    from common.chunked import auto_chunk_size
    from common.losses import cross_entropy, forward_kl

    device = next(model.parameters()).device
    totals = {"tokens": 0, "nll": 0.0, "kl": 0.0, "top1": 0}
    chunk_size = auto_chunk_size(vocab_size)
    heads = {}
    # Similar lengths together waste less padding; the sums do not depend on the order.
    examples = sorted(examples, key=lambda e: len(e["input_ids"]))
    starts = range(0, len(examples), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
            batch = {k: v.to(device) for k, v in
                     collate(examples[start:start + batch_size], pad_token_id).items()}
            model_outputs = scored_outputs(model, batch, heads)
            teacher_outputs = None if teacher is None else scored_outputs(teacher, batch, heads)
            targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != -100]
            totals["tokens"] += targets.numel()
            for rows in torch.arange(targets.numel(), device=device).split(chunk_size):
                model_logits = heads[id(model)](model_outputs[rows])[:, :vocab_size].float()
                totals["nll"] += cross_entropy(model_logits, targets[rows]).sum().item()
                if teacher is not None:
                    teacher_logits = heads[id(teacher)](teacher_outputs[rows])[:, :vocab_size]
                    teacher_logits = teacher_logits.float()
                    totals["kl"] += forward_kl(model_logits, teacher_logits).sum().item()
                    totals["top1"] += (model_logits.argmax(-1) ==
                                       teacher_logits.argmax(-1)).sum().item()
    return totals


def scored_outputs(model, batch, heads):
    """What predicts each supervised token of `batch` (position t predicts label t+1): the final
    hidden states (N, H) when `model`'s logits are its output layer applied to them, else its
    logits (N, V). heads[id(model)] (set on first use) turns a chunk of these into logits."""
    from common.distill import output_layer_passes_hidden_states, why_output_layer_is_not_plain

    if id(model) not in heads:
        plain = why_output_layer_is_not_plain(model, batch["input_ids"],
                                              batch["attention_mask"]) is None
        heads[id(model)] = model.get_output_embeddings() if plain else (lambda logits: logits)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    supervised = batch["labels"][:, 1:] != -100
    if heads[id(model)] is model.get_output_embeddings():
        with output_layer_passes_hidden_states(model):
            return model(**inputs).logits[:, :-1][supervised]
    return model(**inputs).logits[:, :-1][supervised]


def context_length(model):
    """The model's context in tokens (max_position_embeddings), or None when it does not say."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    return getattr(config, "max_position_embeddings", None)


def scoring_length(model, max_length):
    """--max-length, cut to the model's context: longer inputs crash absolute-position models."""
    context = context_length(model)
    return min(max_length, context) if context else max_length


def encode_for(tokenizer, samples, max_length, name):
    """ChatEncoder examples of every sample that fits; the encoder (for its end-of-turn id)."""
    from common.chat import ChatEncoder
    from common.data import describe_skips

    encoder = ChatEncoder(tokenizer, max_length)
    examples, skipped = encoder.encode_all([s.messages for s in samples], progress=False)
    if skipped:
        log(f"warning: {name}: {describe_skips(skipped, len(samples))} for perplexity")
    if not examples:
        raise UserError(f"no conversation could be encoded for {name} "
                        f"({describe_skips(skipped, len(samples))}); raise --max-length or check "
                        f"its chat template")
    return encoder, examples


@dataclass
class TeacherContext:
    name: str
    model: object
    tokenizer: object
    examples: list  # the samples encoded with the teacher's tokenizer and chat template


def tokenizer_mismatch(name, tokenizer, teacher):
    """Why the model cannot be compared with the teacher token by token, or None if it can."""
    from common.models import check_same_tokenizer

    try:
        check_same_tokenizer(teacher.tokenizer, tokenizer, teacher.name, name)
    except UserError as exc:
        # The training scripts' advice ("use cross_tokenizer.py") does not fit a scoring note:
        # the row may well have been made by cross_tokenizer.py. Say only why it is n/a.
        reason = str(exc).split("; use cross_tokenizer.py")[0]
        return f"KL and top-1 agreement are n/a: {reason}"
    return None


def teacher_agreement(model, tokenizer, teacher, eval_args):
    """(kl_to_teacher, top1_agreement) of a model with the teacher's tokenizer.

    Both models read the same input ids: the conversation rendered with the teacher's template
    (its logits only make sense in its own format), which is also what the trained students use.
    """
    from common.models import real_vocab_size

    totals = score_references(model, teacher.examples, real_vocab_size(tokenizer),
                              eval_args.batch_size, tokenizer.pad_token_id,
                              teacher=teacher.model, progress=not eval_args.no_progress,
                              desc="teacher agreement")
    tokens = max(totals["tokens"], 1)
    return totals["kl"] / tokens, totals["top1"] / tokens


# ---------------------------------------------------------------------------------------------
# One model, all metrics


def prompt_ids(tokenizer, samples):
    """Token ids of each sample's prompt (None where the chat template refuses it)."""
    from common.chat import SkipRow, render

    prompts = []
    for sample in samples:
        try:
            text = render(tokenizer, sample.prompt_messages, add_generation_prompt=True)
        except SkipRow:
            prompts.append(None)
            continue
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def generate_replies(model, tokenizer, encoder, samples, eval_args):
    """Greedy replies (None where the prompt cannot be rendered), generated tokens, seconds."""
    import torch

    from common.generation import generate

    prompts = prompt_ids(tokenizer, samples)
    refused = sum(p is None for p in prompts)
    # A prompt that leaves no room for the reply inside the model's context cannot be answered
    # (absolute position embeddings would even crash): left out and counted, like refused ones.
    context = context_length(model)
    too_long = 0
    if context:
        room = context - eval_args.max_new_tokens
        too_long = sum(p is not None and len(p) > room for p in prompts)
        prompts = [p if p is not None and len(p) <= room else None for p in prompts]
    usable = [i for i, p in enumerate(prompts) if p is not None]
    if not usable:
        if too_long:
            raise UserError(f"every prompt is longer than the model's context ({context} tokens) "
                            f"minus --max-new-tokens {eval_args.max_new_tokens}; lower "
                            f"--max-new-tokens or use shorter prompts")
        raise UserError("the chat template refused every prompt (the conversation up to its last "
                        "assistant turn); check the dataset's roles against the template")
    if refused:
        log(f"warning: the chat template refused {refused} of {len(samples)} prompts; they are "
            f"left out of rouge_l and exact_match")
    if too_long:
        log(f"warning: {too_long} of {len(samples)} prompts leave less than --max-new-tokens "
            f"{eval_args.max_new_tokens} tokens of the model's {context}-token context; they are "
            f"left out of rouge_l and exact_match")
    stop_ids = [encoder.end_of_turn_token_id, tokenizer.eos_token_id]
    options = dict(max_new_tokens=eval_args.max_new_tokens, stop_token_ids=stop_ids,
                   batch_size=eval_args.batch_size)
    # Warm-up, so one-time costs (CUDA kernels, allocator) do not count against the first model.
    generate(model, tokenizer, [prompts[usable[0]]], **{**options, "max_new_tokens": 2},
             progress=False)
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    synchronize()
    started = time.perf_counter()
    completions = generate(model, tokenizer, [prompts[i] for i in usable], **options,
                           progress=not eval_args.no_progress)
    synchronize()
    seconds = time.perf_counter() - started
    replies = [None] * len(samples)
    for index, completion in zip(usable, completions):
        replies[index] = tokenizer.decode(completion.token_ids, skip_special_tokens=True).strip()
    stopped = sum(c.finish_reason == "stop" for c in completions) / len(completions)
    return replies, sum(c.num_generated for c in completions), seconds, stopped


def evaluate_model(name, model, tokenizer, samples, eval_args, data_args, teacher=None,
                   is_teacher=False):
    """Every metric of one model, as the dict that becomes its row and its JSON entry."""
    from rouge_score import rouge_scorer

    from common.models import check_vocab_fits, count_parameters, real_vocab_size

    check_vocab_fits(model, tokenizer, name)
    encoder, examples = encode_for(tokenizer, samples,
                                   scoring_length(model, data_args.max_length), name)
    comparable = teacher is not None and not is_teacher
    mismatch = tokenizer_mismatch(name, tokenizer, teacher) if comparable else None
    # When the model renders conversations exactly as the teacher does, one pass gives both.
    share_pass = comparable and mismatch is None and examples == teacher.examples
    totals = score_references(model, examples, real_vocab_size(tokenizer), eval_args.batch_size,
                              tokenizer.pad_token_id, teacher=teacher.model if share_pass else None,
                              progress=not eval_args.no_progress, desc="perplexity")
    tokens = max(totals["tokens"], 1)
    result = {"model": name, "teacher": is_teacher, "parameters": count_parameters(model),
              "perplexity": math.exp(totals["nll"] / tokens), "scored_tokens": totals["tokens"]}

    if teacher is None or mismatch:
        agreement = (None, None)
    elif is_teacher:
        agreement = (0.0, 1.0)  # by definition; no need to run it against itself
    elif share_pass:
        agreement = (totals["kl"] / tokens, totals["top1"] / tokens)
    else:
        agreement = teacher_agreement(model, tokenizer, teacher, eval_args)
    result["kl_to_teacher"], result["top1_agreement"] = agreement
    result["teacher_agreement_note"] = mismatch

    replies, generated_tokens, seconds, stopped = generate_replies(
        model, tokenizer, encoder, samples, eval_args)
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
    # One entry per conversation, in dataset order, so that the --output JSON shows every reply
    # with its scores (None where the prompt could not be rendered or left no room to generate).
    rows = [{"prompt": sample.prompt_messages[-1]["content"], "reference": sample.reference,
             "reply": reply,
             "exact_match": None if reply is None else exact_match(reply, sample.reference,
                                                                   sample.answers),
             "rouge_l": None if reply is None else rouge_l(reply, sample.reference, scorer)}
            for reply, sample in zip(replies, samples)]
    scored = [row for row in rows if row["reply"] is not None]
    result["rouge_l"] = sum(row["rouge_l"] for row in scored) / len(scored)
    result["exact_match"] = sum(row["exact_match"] for row in scored) / len(scored)
    result.update(tokens_per_second=generated_tokens / max(seconds, 1e-9),
                  generated_tokens=generated_tokens, generation_seconds=seconds,
                  stopped_fraction=stopped, generated_replies=len(scored),
                  example_reply=scored[0]["reply"], replies=rows)
    return result


# ---------------------------------------------------------------------------------------------
# Reporting: Markdown table, JSON, bar chart

# (key, header, better: "low"/"high"/None, format)
COLUMNS = [
    ("parameters", "params", None, lambda v: human_count(v)),
    ("perplexity", "perplexity ↓", "low", "{:.3f}".format),
    ("rouge_l", "ROUGE-L ↑", "high", "{:.3f}".format),
    ("exact_match", "exact match ↑", "high", "{:.3f}".format),
    ("kl_to_teacher", "KL to teacher ↓", "low", "{:.4f}".format),
    ("top1_agreement", "top-1 agreement ↑", "high", "{:.3f}".format),
    ("tokens_per_second", "tokens/s ↑", "high", "{:.1f}".format),
]


def human_count(number):
    for unit, size in [("B", 1e9), ("M", 1e6), ("K", 1e3)]:
        if number >= size:
            return f"{number / size:.2f}{unit}"
    return str(number)


def best_values(results):
    """{column: best value among the non-teacher rows}, for columns where 2+ rows compete and
    not all of them tie."""
    best = {}
    for key, _, better, _ in COLUMNS:
        values = [r[key] for r in results if not r["teacher"] and r[key] is not None]
        if better and len(values) >= 2 and min(values) != max(values):
            best[key] = min(values) if better == "low" else max(values)
    return best


def markdown_table(results):
    best = best_values(results)
    # Columns nobody has (the teacher ones without --teacher) are left out; the JSON keeps them.
    columns = [c for c in COLUMNS if any(r[c[0]] is not None for r in results)]
    lines = ["| model | " + " | ".join(header for _, header, _, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for result in results:
        cells = [result["model"] + (" (teacher)" if result["teacher"] else "")]
        for key, _, _, fmt in columns:
            value = result[key]
            text = "n/a" if value is None else fmt(value)
            # Compare formatted values: a tie at the shown precision is bold on both rows.
            if key in best and not result["teacher"] and value is not None \
                    and text == fmt(best[key]):
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r['model']}: {r['teacher_agreement_note']}" for r in results
             if r["teacher_agreement_note"]]
    if best:
        notes.insert(0, "Bold: best among the students (the teacher is a reference, not a "
                        "contestant)." if any(r["teacher"] for r in results) else
                        "Bold: best per column.")
    return "\n".join(lines + ([""] + notes if notes else []))


def load_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib, which is not installed: pip install "
                        "matplotlib") from None
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_results(results, path):
    """A bar chart per metric, a bar per model; the teacher grey, 'n/a' where a metric is null."""
    plt = load_pyplot()
    columns = [(key, header) for key, header, better, _ in COLUMNS
               if better and any(r[key] is not None for r in results)]
    num_columns = min(3, len(columns))
    num_rows = math.ceil(len(columns) / num_columns)
    figure, axes = plt.subplots(num_rows, num_columns, squeeze=False,
                                figsize=(0.6 * len(results) * num_columns + 3, 3.4 * num_rows))
    names = [Path(r["model"]).name or r["model"] for r in results]
    if len(set(names)) < len(names):  # runs/a/final and runs/b/final: show the whole names
        names = [r["model"] for r in results]
    positions = range(len(results))
    for axis, (key, header) in zip(axes.flat, columns):
        for position, result in zip(positions, results):
            if result[key] is None:
                axis.text(position, 0, "n/a", ha="center", va="bottom", fontsize=8)
            else:
                axis.bar(position, result[key],
                         color="tab:gray" if result["teacher"] else "tab:blue")
        axis.set_ylim(bottom=0)
        axis.set_xlim(-0.6, len(results) - 0.4)  # room for an 'n/a' in the last place
        axis.set_title(header, fontsize=10)
        axis.set_xticks(list(positions), names, rotation=30, ha="right", fontsize=8)
    for axis in list(axes.flat)[len(columns):]:
        axis.axis("off")
    if any(r["teacher"] for r in results):
        figure.suptitle("grey = teacher", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------


def same_model(a, b):
    path_a, path_b = Path(a).expanduser(), Path(b).expanduser()
    if path_a.exists() and path_b.exists():
        return path_a.resolve() == path_b.resolve()
    return a == b


def partial_path(output):
    """Where the rows of a run that failed part-way go: NAME.partial.json beside --output."""
    output = Path(output)
    return output.with_name(f"{output.stem}.partial{output.suffix or '.json'}")


def write_results(path, settings, results):
    """The --output JSON, written atomically (a crash never leaves half a file)."""
    from common.checkpoint import write_json_atomic

    output = Path(path)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output, {"settings": settings, "results": results})
    except OSError as exc:
        raise UserError(f"could not write --output {output} ({exc.strerror or exc}); the table "
                        f"above has the numbers") from None


def main(argv=None):
    eval_args, data_args = parse_args((EvalArguments, EvalDataArguments), argv,
                                      description=__doc__.split("\n\n")[0])
    if not eval_args.models:
        raise UserError("--models is required: one or more model directories or Hub ids")
    if not data_args.dataset:
        raise UserError("--dataset is required: a held-out .jsonl/.json/.parquet/.csv file or a "
                        "Hub dataset id")
    for flag, path in [("--output", eval_args.output), ("--plot", eval_args.plot)]:
        if path and Path(path).is_dir():
            raise UserError(f"{flag} {path} is a directory; pass a file name")
        # Refused now, not after the whole evaluation: a file where a folder of the path goes.
        blocker = path and next((p for p in Path(path).absolute().parents if p.exists()), None)
        if blocker and not blocker.is_dir():
            raise UserError(f"{flag} {path} is inside {blocker}, a file; pass a path in a folder")
    if eval_args.plot:
        load_pyplot()  # fail now, not after an hour of generation

    import torch

    from common.chat import ensure_chat_template
    from common.models import check_vocab_fits, freeze, load_model, load_tokenizer

    samples, skip_note = load_samples(data_args, eval_args.answers_field)
    # (name, is_teacher): the teacher first, once, even if it is also listed in --models.
    entries = [(name, False) for name in eval_args.models
               if not (eval_args.teacher and same_model(name, eval_args.teacher))]
    if eval_args.teacher:
        entries.insert(0, (eval_args.teacher, True))
    # Tokenizers first: a misspelled model fails in seconds, not after the others are scored.
    tokenizers = {name: ensure_chat_template(
        load_tokenizer(name, eval_args.trust_remote_code, "teacher" if is_teacher else "model"),
        "teacher" if is_teacher else "model", eval_args.chat_template)
        for name, is_teacher in entries}
    log(f"{len(samples)} conversations from {data_args.dataset}"
        + (f" (warning: {skip_note})" if skip_note else ""))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = None
    if eval_args.teacher:
        teacher_tokenizer = tokenizers[eval_args.teacher]
        teacher_model = freeze(load_model(eval_args.teacher, eval_args.dtype,
                                          eval_args.trust_remote_code, "teacher")).to(device)
        check_vocab_fits(teacher_model, teacher_tokenizer, f"teacher {eval_args.teacher}")
        _, teacher_examples = encode_for(teacher_tokenizer, samples,
                                         scoring_length(teacher_model, data_args.max_length),
                                         eval_args.teacher)
        teacher = TeacherContext(eval_args.teacher, teacher_model, teacher_tokenizer,
                                 teacher_examples)

    settings = {**dataclasses.asdict(eval_args), **dataclasses.asdict(data_args),
                "num_conversations": len(samples), "device": str(device), "decoding": "greedy",
                "command": " ".join(sys.argv if argv is None else ["eval.py", *argv])}
    results = []
    for name, is_teacher in entries:
        log(f"scoring {name}{' (teacher)' if is_teacher else ''}")
        try:
            model = teacher.model if is_teacher else \
                freeze(load_model(name, eval_args.dtype, eval_args.trust_remote_code)).to(device)
            results.append(evaluate_model(name, model, tokenizers[name], samples, eval_args,
                                          data_args, teacher, is_teacher))
        except BaseException as exc:
            # Keep what the models before this one cost: their rows go out before the error.
            if results:
                partial = f"{name} failed ({type(exc).__name__}); rows of the models before it"
                print(markdown_table(results))
                if eval_args.output:  # beside --output, which keeps its earlier contents
                    try:
                        write_results(partial_path(eval_args.output),
                                      {**settings, "partial": partial}, results)
                        log(f"partial results written to {partial_path(eval_args.output)}: "
                            f"{partial}")
                    except UserError as write_error:  # the model's failure is the one to report
                        log(f"warning: {write_error}")
            raise
        if not is_teacher:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print(markdown_table(results))
    if eval_args.output:
        write_results(eval_args.output, settings, results)
        partial_path(eval_args.output).unlink(missing_ok=True)  # an earlier failed run's rows
        log(f"results written to {eval_args.output}")
    if eval_args.plot:
        plot_results(results, eval_args.plot)
        log(f"chart written to {eval_args.plot}")
    return results


if __name__ == "__main__":
    run_cli(main)
