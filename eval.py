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
with its own tokenizer and chat template. The teacher, when given, gets a row of its own. Rows
are named by --names or each directory's last part. With --output, a model already scored there
with the same settings (and unchanged files) is reused, not scored again (--rescore to redo it).

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
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from common.args import DataArguments, parse_args, shared_field
from common.chat import read_chat_template, supervised_positions
from common.errors import UserError, run_cli

# Trailing sentence punctuation dropped for exact match ("42." == "42"); brackets and quotes stay.
TRAILING_PUNCTUATION = ".,!?;:…。！？，；："


@dataclass
class EvalArguments:
    models: list[str] = field(default_factory=list, metadata={
        "help": "Models to score: local directories (e.g. a training script's --output-dir) or "
                "Hugging Face Hub ids, separated by spaces."})
    names: list[str] = field(default_factory=list, metadata={
        "help": "Short row names, one per --models entry in the same order (default: each "
                "model's directory or Hub id's last part, with parent folders added where two "
                "would collide). List the teacher in --models too to name its row."})
    teacher: Optional[str] = shared_field("teacher", default=None)
    max_new_tokens: int = shared_field("max_new_tokens", default=256)
    batch_size: int = shared_field("batch_size", default=8)
    output: Optional[str] = field(default=None, metadata={
        "help": "Write the numbers and the settings used to this JSON file. If it (or the "
                "NAME.partial.json of a run that failed) already holds a model's row scored "
                "with the same settings, data and weights, that row is reused, not recomputed."})
    rescore: bool = field(default=False, metadata={
        "help": "Score every model again, even those with a reusable row in --output."})
    plot: Optional[str] = field(default=None, metadata={
        "help": "Write a PNG bar chart of the metrics to this file (needs matplotlib)."})
    answers_field: str = field(default="answers", metadata={
        "help": "Column holding a list of accepted answers for exact match; rows without it are "
                "matched against the reference reply."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = shared_field("dtype",
                                                                            default="auto")
    trust_remote_code: bool = shared_field("trust_remote_code", default=False)
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bars."})
    chat_template: Optional[str] = shared_field("chat_template", default=None)

    def __post_init__(self):
        if self.chat_template is not None:
            read_chat_template(self.chat_template)  # a bad path fails now, not after loading
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.names and len(self.names) != len(self.models):
            raise UserError(f"--names has {len(self.names)} names for {len(self.models)} "
                            f"--models; give one per model, in the same order")
        repeated = sorted({n for n in self.names if self.names.count(n) > 1})
        if repeated:
            raise UserError(f"--names gives {repeated[0]!r} twice; each row needs its own name")


@dataclass
class EvalDataArguments(DataArguments):
    """The shared data options, with evaluation defaults."""
    dataset_split: str = shared_field("dataset_split", default="test")


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
                     progress=True, desc="scoring", bar=None):
    """Sums over the supervised tokens of `examples` (ChatEncoder output).

    Returns {"tokens", "nll"} and, with a teacher fed the same input ids, {"kl", "top1"}: the summed
    KL(p_teacher ‖ p_model) and the count of positions where both argmaxes agree. Only the first
    `vocab_size` logits count (the tokenizer's real ids; embeddings may have padded rows).

    Memory: logits exist only at scored positions, a chunk of positions at a time (about 128 MiB
    of float32 logits per model), as in training (common/distill.py): at a 262,144-token
    vocabulary full logits at every position would be the largest tensors by far.
    bar: the model's progress bar, advanced once per batch (else a bar of its own).
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
    if bar is None:
        starts = tqdm(starts, desc=desc, disable=not progress, leave=False)
    else:
        bar.set_postfix_str(desc)
    with torch.no_grad():
        for start in starts:
            batch = {k: v.to(device) for k, v in
                     collate(examples[start:start + batch_size], pad_token_id).items()}
            model_outputs = scored_outputs(model, batch, heads)
            teacher_outputs = None if teacher is None else scored_outputs(teacher, batch, heads)
            targets = batch["labels"][:, 1:][supervised_positions(batch["labels"])]
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
            if bar is not None:
                bar.update()
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
    supervised = supervised_positions(batch["labels"])
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
    encoder: object = None  # the ChatEncoder that made them (the teacher's row reuses both)


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


def teacher_agreement(model, tokenizer, teacher, eval_args, bar=None):
    """(kl_to_teacher, top1_agreement) of a model with the teacher's tokenizer.

    Both models read the same input ids: the conversation rendered with the teacher's template
    (its logits only make sense in its own format), which is also what the trained students use.
    """
    from common.models import real_vocab_size

    totals = score_references(model, teacher.examples, real_vocab_size(tokenizer),
                              eval_args.batch_size, tokenizer.pad_token_id,
                              teacher=teacher.model, progress=not eval_args.no_progress,
                              desc="teacher agreement", bar=bar)
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


def generate_replies(model, tokenizer, encoder, samples, eval_args, bar=None):
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
    if bar is not None:  # now the number of generation batches is known
        bar.total = bar.n + math.ceil(len(usable) / eval_args.batch_size)
        bar.refresh()
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    synchronize()
    started = time.perf_counter()
    completions = generate(model, tokenizer, [prompts[i] for i in usable], **options,
                           progress=not eval_args.no_progress, bar=bar)
    synchronize()
    seconds = time.perf_counter() - started
    replies = [None] * len(samples)
    for index, completion in zip(usable, completions):
        replies[index] = tokenizer.decode(completion.token_ids, skip_special_tokens=True).strip()
    stopped = sum(c.finish_reason == "stop" for c in completions) / len(completions)
    return replies, sum(c.num_generated for c in completions), seconds, stopped


def evaluate_model(name, model, tokenizer, samples, eval_args, data_args, teacher=None,
                   is_teacher=False, row_name=None):
    """Every metric of one model, as the dict that becomes its row and its JSON entry.

    name: the directory or Hub id (the row's "model"); row_name: its short name in the table.
    """
    from tqdm.auto import tqdm
    from rouge_score import rouge_scorer

    from common.models import check_vocab_fits, count_parameters, real_vocab_size

    row_name = row_name or name
    check_vocab_fits(model, tokenizer, name)
    if is_teacher and teacher is not None and teacher.encoder is not None:
        encoder, examples = teacher.encoder, teacher.examples  # encoded (and warned about) once
    else:
        encoder, examples = encode_for(tokenizer, samples,
                                       scoring_length(model, data_args.max_length), name)
    comparable = teacher is not None and not is_teacher
    mismatch = tokenizer_mismatch(name, tokenizer, teacher) if comparable else None
    # When the model renders conversations exactly as the teacher does, one pass gives both.
    share_pass = comparable and mismatch is None and examples == teacher.examples
    separate_agreement = comparable and mismatch is None and not share_pass
    # One bar per model, counting batches: perplexity, teacher agreement, then generation (its
    # count is set once the prompts that fit are known; here the most it can be).
    batches = math.ceil(len(examples) / eval_args.batch_size) + math.ceil(
        len(samples) / eval_args.batch_size)
    if separate_agreement:
        batches += math.ceil(len(teacher.examples) / eval_args.batch_size)
    with tqdm(total=batches, desc=row_name, unit="batch", disable=eval_args.no_progress,
              leave=True, dynamic_ncols=True) as bar:
        totals = score_references(model, examples, real_vocab_size(tokenizer),
                                  eval_args.batch_size, tokenizer.pad_token_id,
                                  teacher=teacher.model if share_pass else None,
                                  desc="perplexity", bar=bar)
        tokens = max(totals["tokens"], 1)
        result = {"model": name, "name": row_name, "teacher": is_teacher,
                  "parameters": count_parameters(model),
                  "perplexity": math.exp(totals["nll"] / tokens),
                  "scored_tokens": totals["tokens"]}

        if teacher is None or mismatch:
            agreement = (None, None)
        elif is_teacher:
            agreement = (0.0, 1.0)  # by definition; no need to run it against itself
        elif share_pass:
            agreement = (totals["kl"] / tokens, totals["top1"] / tokens)
        else:
            agreement = teacher_agreement(model, tokenizer, teacher, eval_args, bar=bar)
        result["kl_to_teacher"], result["top1_agreement"] = agreement
        result["teacher_agreement_note"] = mismatch

        replies, generated_tokens, seconds, stopped = generate_replies(
            model, tokenizer, encoder, samples, eval_args, bar=bar)
        bar.set_postfix_str("done")
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


def row_name(result):
    """The row's short name (rows written before --names existed have only the model)."""
    return result.get("name") or result["model"]


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
        cells = [row_name(result) + (" (teacher)" if result["teacher"] else "")]
        for key, _, _, fmt in columns:
            value = result[key]
            text = "n/a" if value is None else fmt(value)
            # Compare formatted values: a tie at the shown precision is bold on both rows.
            if key in best and not result["teacher"] and value is not None \
                    and text == fmt(best[key]):
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {row_name(r)}: {r['teacher_agreement_note']}" for r in results
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
    names = [row_name(r) for r in results]
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


def short_names(models, given=None):
    """Row names: `given` where set, else the last part of each directory or Hub id, with parent
    folders added while two collide (runs/kd/final, runs/seq/final -> kd/final, seq/final), and
    " (2)", " (3)" after the same model listed twice."""
    import os

    given = given or [None] * len(models)
    parts = []
    for model in models:
        normalized = os.path.normpath(os.path.expanduser(model))
        path_parts = Path(normalized).parts
        if not path_parts or path_parts[-1] in (".", ".."):  # ".", "..": the folder's own name
            path_parts = Path(normalized).resolve().parts
        parts.append([p for p in path_parts if p != os.sep] or [model])
    depth = [1] * len(models)

    def current():
        return [given[i] or "/".join(parts[i][-depth[i]:]) for i in range(len(models))]

    while True:
        names = current()
        grown = False
        for name in {n for n in names if names.count(n) > 1}:
            group = [i for i, n in enumerate(names) if n == name]
            if len({tuple(parts[i]) for i in group}) == 1:
                continue  # the same path twice: more folders would not tell them apart
            for i in group:
                if given[i] is None and depth[i] < len(parts[i]):
                    depth[i] += 1
                    grown = True
        if not grown:
            break
    seen = {}
    for i, name in enumerate(names):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:  # the same path twice (or a given name equal to a whole path)
            names[i] = f"{name} ({seen[name]})"
    return names


# Settings that do not change a row's numbers: which models, how rows are named, where output
# goes. Every other setting (and the data, device and teacher) must match for a row to be reused.
ROW_NEUTRAL_SETTINGS = frozenset({"models", "names", "output", "plot", "no_progress", "rescore",
                                  "trust_remote_code", "command", "partial"})


def model_fingerprint(name):
    """What tells whether a model changed since its row was scored: for a local directory, the
    names, sizes and modification times of its files (a retrained --output-dir differs; reading
    gigabytes of weights to hash them would cost more than scoring a small model); "missing" for
    a path that is gone; None for a Hub id (the id names it)."""
    import hashlib

    path = Path(name).expanduser()
    if not path.exists():
        looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
        return "missing" if looks_like_path else None
    if not path.is_dir():  # a file (a .gguf): loading it says what is wrong, in one line
        return None
    # metrics.jsonl and checkpoints/ change while a run trains, not the exported model.
    files = sorted((f.name, stat.st_size, stat.st_mtime_ns) for f in path.iterdir()
                   if f.is_file() and f.name != "metrics.jsonl" for stat in [f.stat()])
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def samples_digest(samples):
    """sha256 (16 hex digits) of the held-out conversations as scored: notices an edited file."""
    import hashlib

    text = json.dumps([dataclasses.asdict(s) for s in samples], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def row_settings(settings):
    return {k: v for k, v in settings.items() if k not in ROW_NEUTRAL_SETTINGS}


def reusable_rows(output, settings):
    """[(model, is_teacher, row)] from --output and its .partial.json scored with these settings
    (the partial file, newer when it exists, wins), and a note on why none are usable."""
    wanted = json.dumps(row_settings(settings), sort_keys=True)
    rows, notes = [], []
    for path in (Path(output), partial_path(output)):
        if not path.is_file():
            continue
        try:
            saved = json.loads(path.read_text())
            same = json.dumps(row_settings(saved["settings"]), sort_keys=True) == wanted
            found = [(r["model"], bool(r["teacher"]), r) for r in saved["results"]]
        except (OSError, ValueError, KeyError, TypeError):
            notes.append(f"{path} is not an eval.py results file")
            continue
        if same:
            rows = [r for r in rows if not any(same_model(r[0], f[0]) and r[1] == f[1]
                                               for f in found)] + found
        else:
            changed = sorted(k for k in set(row_settings(saved["settings"])) |
                             set(row_settings(settings))
                             if saved["settings"].get(k) != settings.get(k))
            notes.append(f"{path} was scored with other settings ({', '.join(changed)})")
    return rows, notes


def cached_row(rows, model, is_teacher):
    """The reusable row of this model, or None: scored in the same role, and its files unchanged
    since (or gone: the row is all that is left of it)."""
    fingerprint = model_fingerprint(model)
    for saved_model, saved_teacher, row in rows:
        if saved_teacher == is_teacher and same_model(saved_model, model) and \
                fingerprint in (row.get("model_fingerprint"), "missing"):
            return row
    return None


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


# What the command line parses into, in main's order (tests/test_flags.py builds every
# script's parser from these).
ARGUMENT_GROUPS = (EvalArguments, EvalDataArguments)


def main(argv=None):
    eval_args, data_args = parse_args(ARGUMENT_GROUPS, argv,
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

    if eval_args.no_progress:  # transformers' "Loading weights" bars too
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    samples, skip_note = load_samples(data_args, eval_args.answers_field)
    # (model, is_teacher, row name): the teacher first, once, even if it is also listed in
    # --models (then the name given to it there is its row's name).
    # Names pair with --models by position: the same model listed twice keeps both names.
    given = list(zip(eval_args.models, eval_args.names or [None] * len(eval_args.models)))
    entries = [(model, False, name) for model, name in given
               if not (eval_args.teacher and same_model(model, eval_args.teacher))]
    if eval_args.teacher:
        teacher_given = next((name for model, name in given
                              if same_model(model, eval_args.teacher)), None)
        entries.insert(0, (eval_args.teacher, True, teacher_given))
    names = short_names([model for model, _, _ in entries], [name for _, _, name in entries])
    entries = [(model, is_teacher, name) for (model, is_teacher, _), name in zip(entries, names)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = {**dataclasses.asdict(eval_args), **dataclasses.asdict(data_args),
                "num_conversations": len(samples), "data_sha256": samples_digest(samples),
                "teacher_fingerprint": eval_args.teacher and model_fingerprint(eval_args.teacher),
                "device": str(device), "decoding": "greedy",
                "command": " ".join(sys.argv if argv is None else ["eval.py", *argv])}
    reused, notes = {}, []  # {(model, is_teacher): row} of rows an earlier run scored
    if eval_args.output and not eval_args.rescore:
        rows, notes = reusable_rows(eval_args.output, settings)
        for model, is_teacher, name in entries:
            row = cached_row(rows, model, is_teacher)
            if row is not None:
                reused[model, is_teacher] = {**row, "name": name}
    to_score = [entry for entry in entries if entry[:2] not in reused]

    # Tokenizers first: a misspelled model fails in seconds, not after the others are scored.
    tokenizers = {model: ensure_chat_template(
        load_tokenizer(model, eval_args.trust_remote_code, "teacher" if is_teacher else "model"),
        "teacher" if is_teacher else "model", eval_args.chat_template)
        for model, is_teacher, _ in to_score}
    log(f"{len(samples)} conversations from {data_args.dataset}"
        + (f" (warning: {skip_note})" if skip_note else ""))
    for note in notes if not reused else []:  # why nothing could be reused
        log(f"scoring every model: {note}")
    teacher = None
    if eval_args.teacher and to_score:  # a student scored now needs the teacher's logits
        teacher_tokenizer = tokenizers.get(eval_args.teacher) or ensure_chat_template(
            load_tokenizer(eval_args.teacher, eval_args.trust_remote_code, "teacher"), "teacher",
            eval_args.chat_template)
        teacher_model = freeze(load_model(eval_args.teacher, eval_args.dtype,
                                          eval_args.trust_remote_code, "teacher")).to(device)
        check_vocab_fits(teacher_model, teacher_tokenizer, f"teacher {eval_args.teacher}")
        teacher_encoder, teacher_examples = encode_for(
            teacher_tokenizer, samples, scoring_length(teacher_model, data_args.max_length),
            eval_args.teacher)
        teacher = TeacherContext(eval_args.teacher, teacher_model, teacher_tokenizer,
                                 teacher_examples, teacher_encoder)

    results = []
    for model_name, is_teacher, name in entries:
        role = " (teacher)" if is_teacher else ""
        shown = f"{name}{role}" + ("" if name == model_name else f": {model_name}")
        if (model_name, is_teacher) in reused:
            gone = model_fingerprint(model_name) == "missing"
            log(f"reusing the row of {shown} from an earlier run with the same settings"
                + (" (its directory is gone)" if gone else "") + "; --rescore to score it again")
            results.append(reused[model_name, is_teacher])
            continue
        log(f"scoring {shown}")
        try:
            model = teacher.model if is_teacher else freeze(load_model(
                model_name, eval_args.dtype, eval_args.trust_remote_code)).to(device)
            result = evaluate_model(model_name, model, tokenizers[model_name], samples,
                                    eval_args, data_args, teacher, is_teacher, row_name=name)
            result["model_fingerprint"] = model_fingerprint(model_name)
            results.append(result)
        except BaseException as exc:
            # Keep what the models before this one cost: their rows go out before the error.
            if results:
                partial = f"{model_name} failed ({type(exc).__name__}); rows of the models " \
                          f"before it"
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
