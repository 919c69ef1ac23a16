"""Cross-tokenizer distillation (ULD, Boizard et al. 2024): the teacher and the student may have
different vocabularies, tokenizers and chat templates.

Each model reads the conversation in its own chat template, tokenized by its own tokenizer; token
ids never cross over. Every student reply token is paired with a teacher reply token by character
offsets in the reply text (common/align.py: the overlapping teacher token whose end is closest),
and the two distributions that predict the paired tokens (the logits one position earlier, on each
side) are compared by their shape only: both sorted descending, top --top-k ranks, which needs no
shared vocabulary.

    --uld-loss kl   KL(q_teacher ‖ q_student) between the sorted top-K probabilities, each
                    renormalized to sum 1 (default)
    --uld-loss l1   Σ_r |p_teacher(r) − p_student(r)| over the sorted ranks, the original ULD's
                    closed-form Wasserstein-1 (with --top-k 0: whole vocabularies, the shorter
                    zero-padded, as in the paper)
    --hybrid        also an exact KL over the tokens both vocabularies share, at positions whose
                    paired tokens are the same string in both

Loss per aligned student token = (1 - alpha) * T² * (ULD (+ the hybrid KL)) + alpha * cross-entropy
on the student's own reply token, token_level.py's formula with ULD as the divergence. What this
loses: the token identity (a teacher sure of "Paris" and one sure of "London" look the same), the
exactness of the pairing (tokens that do not share boundaries are paired approximately) and the
tail of the distributions beyond --top-k.

Memory: both output layers run only at the positions that predict an aligned token or its partner,
--loss-chunk-size of them at a time (see make_loss_fn): at a 262,144-token vocabulary full logits
at every position would dwarf the models.

The log's tok/s (tokens_per_second in metrics.jsonl) counts the student's input tokens only: the
shared loop sums the batch's `attention_mask`, and the teacher's own rendering of each conversation
(`teacher_attention_mask`, often longer or shorter) is not in it.

Examples:
    python cross_tokenizer.py --teacher meta-llama/Llama-3.2-3B-Instruct \
        --student Qwen/Qwen2.5-0.5B-Instruct --dataset train.jsonl --output-dir runs/uld \
        --uld-loss kl --top-k 64 --batch-size 4 --grad-accum 8 --max-length 1024

    accelerate launch --num_processes 4 cross_tokenizer.py --teacher ... --student ... \
        --dataset train.jsonl --output-dir runs/uld --mixed-precision bf16

    # offline, on tiny local models (a byte-level BPE teacher with a Llama-3-style template and a
    # Mistral student with a SentencePiece-style tokenizer and a ChatML template):
    python examples/tiny_setup.py runs/tiny --with-chatml-student
    python cross_tokenizer.py --teacher runs/tiny/teacher --student runs/tiny/student_chatml \
        --dataset runs/tiny/train.jsonl --output-dir runs/tiny/uld --top-k 16 --max-steps 12
"""

import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F

from common.align import check_offsets, encode_pair, shared_vocabulary
from common.args import (DataArguments, ModelArguments, TrainingArguments, parse_args,
                         require_flags, shared_checks, shared_field)
from common.chat import (ChatEncoder, collate, encode_datasets, encode_each, ensure_chat_template,
                         num_supervised_tokens)
from common.checkpoint import (check_output_dir, finish_run, make_run_config,
                               prepare_output_dir)
from common.errors import UserError, run_cli
from common.lora import LoraArguments, load_trainable_student
from common.losses import (combine_kd_and_ce, cross_entropy, shared_vocab_kl, temperature_scale,
                           uld_loss)
from common.models import check_vocab_fits, freeze, load_model, load_tokenizer, real_vocab_size
from common.sharding import prepare_teacher


@dataclass
class CrossTokenizerArguments:
    # Old spelling, hidden, for one release; it had no T² factor.
    RENAMED_FLAGS = {"temperature": ("loss_temperature", "which scales the divergence by T², "
                                                         "as in token_level.py")}
    # --alpha was a CE weight >= 0 beside this ULD weight; it is now token_level.py's CE share.
    REMOVED_FLAGS = {"distill_weight": "--alpha is now the cross-entropy weight in [0, 1], loss = "
                                       "(1-alpha)*T²*ULD + alpha*CE as in token_level.py; for "
                                       "the old --alpha A --distill-weight W pass --alpha "
                                       "A/(A+W) (the old loss divided by A+W; old defaults: 0.5)"}
    uld_loss: Literal["kl", "l1"] = field(default="kl", metadata={
        "help": "How the two sorted top-K probability vectors are compared: kl = KL(teacher‖"
                "student) after renormalizing each to sum 1; l1 = sum of absolute differences "
                "(the original ULD's Wasserstein-1 form)."})
    top_k: int = field(default=64, metadata={
        "help": "Ranks compared per position (0 = whole vocabularies: with l1 the shorter is "
                "zero-padded as in the original ULD; with kl the shorter length is used)."})
    loss_temperature: float = shared_field("loss_temperature", default=1.0)
    alpha: float = shared_field("alpha", default=0.5)
    hybrid: bool = field(default=False, metadata={
        "help": "Where the paired tokens are the same string in both vocabularies, add an exact "
                "KL(teacher‖student) over the tokens the vocabularies share (each distribution "
                "restricted to them and renormalized)."})
    loss_chunk_size: int = shared_field("loss_chunk_size", default=0)

    def __post_init__(self):
        checks = [*shared_checks(self),
                  (self.top_k >= 0, f"--top-k must be >= 0 (0 = whole vocabularies), got "
                                    f"{self.top_k}")]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


class PairEncoder:
    """For common.chat.encode_dataset: each conversation encoded by both models' ChatEncoders and
    aligned (common.align.encode_pair)."""

    no_usable_hint = "check that rows hold non-empty assistant replies"

    def __init__(self, student_encoder, teacher_encoder):
        self.student_encoder, self.teacher_encoder = student_encoder, teacher_encoder

    def encode_all(self, conversations, progress=True):
        return encode_each(partial(encode_pair, self.student_encoder, self.teacher_encoder),
                           conversations, "tokenizing + aligning", progress)


def collate_pairs(examples, pad_token_id, teacher_pad_token_id):
    """Student batch (common.chat.collate) plus the teacher's padded ids and the partner table."""
    batch = collate(examples, pad_token_id)
    rows, length = len(examples), max(len(e["teacher_input_ids"]) for e in examples)
    teacher_input_ids = torch.full((rows, length), teacher_pad_token_id, dtype=torch.long)
    teacher_attention_mask = torch.zeros((rows, length), dtype=torch.long)
    teacher_positions = torch.full(batch["labels"].shape, -1, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["teacher_input_ids"])
        teacher_input_ids[row, :n] = torch.tensor(example["teacher_input_ids"])
        teacher_attention_mask[row, :n] = 1
        teacher_positions[row, :len(example["teacher_positions"])] = \
            torch.tensor(example["teacher_positions"])
    return {**batch, "teacher_input_ids": teacher_input_ids,
            "teacher_attention_mask": teacher_attention_mask,
            "teacher_positions": teacher_positions}


def make_loss_fn(accelerator, teacher, student_vocab_size, teacher_vocab_size, uld_args,
                 shared=None):
    """Per-batch loss: sums over aligned student positions, as the shared loop expects.

    `shared` (for --hybrid) is (student_to_teacher (Vs,), shared student ids, shared teacher ids):
    student_to_teacher[s] is the teacher id of the same string as student id s, or -1.

    Memory: every term is a function of one aligned position's two rows of logits, so neither
    model's output layer runs anywhere else. Both bodies run as usual with their output layers
    passing the final hidden states through (common/distill.py); the hidden states that predict
    each aligned token and its teacher partner are gathered, and both output layers then run on
    --loss-chunk-size of them at a time (0 = about 128 MiB of float32 logits of the larger
    vocabulary per chunk), each chunk recomputed in backward (common.distill.make_head_loss_fn),
    so the gradients are autograd's own. At a 262,144-token vocabulary the full logits at every
    position were the largest tensors of a step by far. Full logits instead under FSDP / ZeRO-3,
    with --loss-chunk-size -1, and for a model whose output layer is not a plain projection of
    its hidden states (soft-capped logits): that model's logits at the aligned positions.
    """
    from common.align import aligned_partners
    from common.chunked import auto_chunk_size
    from common.distill import (OutputLayerCheck, make_head_loss_fn,
                                output_layer_passes_hidden_states, weights_are_sharded)

    loss_chunk_size = uld_args.loss_chunk_size
    if loss_chunk_size == 0:  # the teacher's vocabulary may be the larger: size chunks by it
        loss_chunk_size = auto_chunk_size(max(student_vocab_size, teacher_vocab_size))
    teacher_hidden_allowed = loss_chunk_size > 0 and not weights_are_sharded(accelerator)
    has_plain_output_layer = OutputLayerCheck(accelerator)

    def teacher_rows_are_hidden(inputs=None):
        """Whether the teacher's rows are its final hidden states (else its logits): probed on the
        first batch's `inputs`, remembered by OutputLayerCheck for every batch after."""
        return teacher_hidden_allowed and has_plain_output_layer(teacher, inputs, "teacher")

    def teacher_logits_of(teacher_rows):
        if not teacher_rows_are_hidden():
            return teacher_rows[:, :teacher_vocab_size]
        layer = teacher.get_output_embeddings()
        bias = None if layer.bias is None else layer.bias[:teacher_vocab_size]
        with torch.no_grad(), accelerator.autocast():
            return F.linear(teacher_rows, layer.weight[:teacher_vocab_size], bias)

    def terms(student_logits, targets, teacher_rows, same_string=None):
        """The summed loss of some aligned positions (all or one chunk) and its statistics."""
        teacher_logits = teacher_logits_of(teacher_rows)
        temperature = uld_args.loss_temperature
        uld = uld_loss(student_logits, teacher_logits, uld_args.uld_loss, uld_args.top_k,
                       temperature) * temperature_scale(temperature)
        ce = cross_entropy(student_logits, targets)
        distill, stats = uld, {"uld": uld.sum().detach(), "ce": ce.sum().detach()}
        if shared is not None:
            _, shared_student_ids, shared_teacher_ids = shared
            index = same_string.nonzero(as_tuple=True)[0]
            exact = shared_vocab_kl(student_logits[index], teacher_logits[index],
                                    shared_student_ids, shared_teacher_ids,
                                    temperature) * temperature_scale(temperature)
            # Scatter out of place: the hybrid term exists only where the strings match.
            exact = torch.zeros_like(uld).index_put((index,), exact)
            distill = uld + exact
            stats.update(hybrid=exact.sum().detach(), same_string=same_string.sum().float())
        loss = combine_kd_and_ce(distill.sum(), ce.sum(), uld_args.alpha)
        return loss, stats

    student_loss_fn = make_head_loss_fn(
        accelerator, student_vocab_size, terms, loss_chunk_size,
        row_keys=("teacher_rows",) + (("same_string",) if shared is not None else ()))

    def teacher_rows_for(batch):
        """One row per aligned student token, in the order of make_head_loss_fn's: what predicts
        its partner (the teacher's final hidden state (H,) when its output layer is plain, else
        its logits) and, with --hybrid, whether the two tokens are the same string."""
        inputs = {"input_ids": batch["teacher_input_ids"],
                  "attention_mask": batch["teacher_attention_mask"]}
        mask, batch_rows, partners = aligned_partners(batch["labels"],
                                                      batch["teacher_positions"])
        with torch.no_grad(), accelerator.autocast():
            # Probed under the autocast its forward runs under: under bf16 a float32 probe's
            # logits would not match the bf16 rebuilt ones, a false "not plain".
            if teacher_rows_are_hidden(inputs):
                with output_layer_passes_hidden_states(teacher):
                    outputs = teacher(**inputs).logits
            else:
                outputs = teacher(**inputs).logits
        rows = {"teacher_rows": outputs[batch_rows, partners - 1]}
        if shared is not None:  # the student's target and its partner: the same string?
            student_to_teacher = shared[0]
            rows["same_string"] = (student_to_teacher[batch["labels"][:, 1:][mask]]
                                   == batch["teacher_input_ids"][batch_rows, partners])
        return rows

    def loss_fn(student, batch):
        return student_loss_fn(student, {**batch, **teacher_rows_for(batch)})

    return loss_fn


# What the command line parses into, in main's order (tests/test_flags.py builds every
# script's parser from these).
ARGUMENT_GROUPS = (ModelArguments, DataArguments, TrainingArguments, CrossTokenizerArguments,
                   LoraArguments)


def main(argv=None):
    from accelerate.utils import set_seed

    from common.train import Method, make_accelerator, train

    model_args, data_args, train_args, uld_args, lora_args = parse_args(
        ARGUMENT_GROUPS, argv, description=__doc__.split("\n\n")[0])
    require_flags(("--teacher", model_args.teacher), ("--student", model_args.student),
                  ("--dataset", data_args.dataset))
    check_output_dir(train_args.output_dir, train_args.resume, train_args.overwrite)

    teacher_tokenizer = load_tokenizer(model_args.teacher, model_args.trust_remote_code, "teacher")
    tokenizer = load_tokenizer(model_args.student, model_args.trust_remote_code, "student")
    check_offsets(teacher_tokenizer, "teacher")
    check_offsets(tokenizer, "student")
    # Each model keeps its own template: its logits only make sense in the format it knows.
    ensure_chat_template(teacher_tokenizer, "teacher", model_args.chat_template)
    ensure_chat_template(tokenizer, "student", model_args.chat_template)

    accelerator = make_accelerator(train_args)
    set_seed(train_args.seed)
    if teacher_tokenizer.get_vocab() == tokenizer.get_vocab():
        accelerator.print("note: teacher and student share a vocabulary; token_level.py compares "
                          "their full distributions exactly, which ULD cannot")
    encoder = ChatEncoder(tokenizer, data_args.max_length)
    pair_encoder = PairEncoder(encoder, ChatEncoder(teacher_tokenizer, data_args.max_length))
    examples, eval_examples = encode_datasets(accelerator, pair_encoder, data_args, train_args)
    aligned = num_supervised_tokens(examples)
    reply_tokens = sum(e["num_reply_tokens"] for e in examples)
    accelerator.print(f"{len(examples)} training conversations, {aligned} of {reply_tokens} "
                      f"student reply tokens aligned with a teacher token "
                      f"({100.0 * aligned / max(reply_tokens, 1):.1f}%; only those are trained on)")

    teacher = freeze(load_model(model_args.teacher, model_args.dtype,
                                model_args.trust_remote_code, "teacher"))
    check_vocab_fits(teacher, teacher_tokenizer, "teacher")
    student = load_trainable_student(accelerator, model_args, train_args, lora_args, tokenizer)
    shared = None
    if uld_args.hybrid:
        student_ids, teacher_ids = shared_vocabulary(tokenizer, teacher_tokenizer)
        if not student_ids:
            raise UserError("--hybrid: the two vocabularies share no token string; drop --hybrid")
        student_to_teacher = torch.full((real_vocab_size(tokenizer),), -1, dtype=torch.long)
        student_to_teacher[torch.tensor(student_ids)] = torch.tensor(teacher_ids)
        shared = tuple(t.to(accelerator.device) for t in (
            student_to_teacher, torch.tensor(student_ids), torch.tensor(teacher_ids)))
        accelerator.print(f"--hybrid: {len(student_ids)} token strings shared by both "
                          f"vocabularies")
    teacher = prepare_teacher(accelerator, teacher)  # sharded under FSDP / ZeRO-3

    output_dir = prepare_output_dir(accelerator, train_args.output_dir, train_args.overwrite)
    run_config = make_run_config("cross_tokenizer", " ".join(sys.argv), model=model_args,
                                 data=data_args, training=train_args, cross_tokenizer=uld_args,
                                 lora=lora_args)
    loss_fn = make_loss_fn(accelerator, teacher, real_vocab_size(tokenizer),
                           real_vocab_size(teacher_tokenizer), uld_args, shared)
    method = Method(loss_fn, collate=partial(collate_pairs,
                                             teacher_pad_token_id=teacher_tokenizer.pad_token_id))
    student, state = train(accelerator, student, examples, train_args, method,
                           tokenizer.pad_token_id, run_config, eval_examples=eval_examples)
    finish_run(accelerator, student, tokenizer, output_dir, run_config, state,
               end_of_turn_id=encoder.end_of_turn_token_id)


if __name__ == "__main__":
    run_cli(main)
