"""What does a student's own output look like to the teacher? The measurements behind the choice
of protocol in benchmarks/compare_methods.py (the "diagnosis" of its results JSON).

    python benchmarks/diagnose_students.py --teacher T --students S1 S2 --dataset val.jsonl \
        --samples-per-prompt 2 --max-new-tokens 24 --output diag.json

For each student, on the dataset's prompts:
- on its own samples (temperature 1, what on_policy.py trains on): the fraction that reaches end of
  turn, the mean sampled length, the teacher's and the student's mean log-prob per sampled token,
  the exact per-token reverse KL(student ‖ teacher) there, and the fraction of samples that are a
  right answer (the row's `answers`);
- on the dataset's replies (what token_level.py trains on): the student's entropy, forward and
  reverse KL to the teacher per reply token, and the size of the gradient of each divergence with
  respect to the student's logits (mean L2 norm per token): reverse KL's is what clipping meets.
Same tokenizer for teacher and student (token-level and on-policy students).
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--students", nargs="+", required=True)
    parser.add_argument("--dataset", required=True, help="JSONL of conversations (answers field "
                                                         "optional, for the right-answer rate)")
    parser.add_argument("--max-prompts", type=int, default=250)
    parser.add_argument("--samples-per-prompt", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="JSON file for the measurements")
    return parser.parse_args(argv)


def per_token_divergences(student_logits, teacher_logits):
    """Per row: entropy of the student, forward and reverse KL, and the L2 norm of d KL / d logits
    for both directions (float32, rows are positions)."""
    import torch

    student_logits = student_logits.float().detach().requires_grad_(True)
    log_s = torch.log_softmax(student_logits, -1)
    log_t = torch.log_softmax(teacher_logits.float(), -1)
    p_s, p_t = log_s.exp(), log_t.exp()
    forward = (p_t * (log_t - log_s)).sum(-1)
    reverse = (p_s * (log_s - log_t)).sum(-1)
    (grad_forward,) = torch.autograd.grad(forward.sum(), student_logits, retain_graph=True)
    (grad_reverse,) = torch.autograd.grad(reverse.sum(), student_logits)
    entropy = -(p_s * log_s).sum(-1)
    return {"student_entropy": entropy.detach(), "forward_kl": forward.detach(),
            "reverse_kl": reverse.detach(), "forward_kl_grad_norm": grad_forward.norm(dim=-1),
            "reverse_kl_grad_norm": grad_reverse.norm(dim=-1)}


def mean(values):
    return round(sum(values) / len(values), 4) if values else None


def diagnose(student_path, teacher, tokenizer, rows, args):
    import torch

    from common.chat import ChatEncoder, collate
    from common.generation import generate
    from common.models import load_model, real_vocab_size

    student = load_model(str(student_path), "float32", what="student").eval()
    vocab = real_vocab_size(tokenizer)
    encoder = ChatEncoder(tokenizer, 256)
    stop_ids = {encoder.end_of_turn_token_id, tokenizer.eos_token_id}
    prompts = [tokenizer.apply_chat_template(row["messages"][:-1], tokenize=True,
                                             add_generation_prompt=True, return_dict=False)
               for row in rows]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    torch.manual_seed(args.seed)
    repeated = [p for p in prompts for _ in range(args.samples_per_prompt)]
    completions = generate(student, tokenizer, repeated, args.max_new_tokens, stop_ids,
                           temperature=1.0, batch_size=64, progress=False)
    sampled = {"teacher_logprob": [], "student_logprob": [], "reverse_kl": []}
    right = []
    for start in range(0, len(repeated), 64):
        examples = []
        for prompt, completion in zip(repeated[start:start + 64], completions[start:start + 64]):
            tokens = completion.token_ids + ([encoder.end_of_turn_token_id]
                                             if completion.finish_reason == "stop" else [])
            examples.append({"input_ids": prompt + tokens,
                             "labels": [-100] * len(prompt) + tokens})
        batch = collate(examples, tokenizer.pad_token_id)
        with torch.no_grad():
            student_logits = student(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).logits
            teacher_logits = teacher(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        s = torch.log_softmax(student_logits[:, :-1][mask][:, :vocab].float(), -1)
        t = torch.log_softmax(teacher_logits[:, :-1][mask][:, :vocab].float(), -1)
        ids = targets[mask]
        sampled["teacher_logprob"] += t.gather(-1, ids[:, None]).squeeze(-1).tolist()
        sampled["student_logprob"] += s.gather(-1, ids[:, None]).squeeze(-1).tolist()
        sampled["reverse_kl"] += (s.exp() * (s - t)).sum(-1).tolist()
    for index, completion in enumerate(completions):
        row = rows[index // args.samples_per_prompt]
        text = tokenizer.decode(completion.token_ids, skip_special_tokens=True).strip()
        answers = row.get("answers") or [row["messages"][-1]["content"]]
        right.append(text.lower() in {a.strip().lower() for a in answers})

    examples, _ = encoder.encode_all([row["messages"] for row in rows], progress=False)
    on_replies = {}
    for start in range(0, len(examples), 64):
        batch = collate(examples[start:start + 64], tokenizer.pad_token_id)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).logits
            student_logits = student(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).logits
        mask = batch["labels"][:, 1:] != -100
        values = per_token_divergences(student_logits[:, :-1][mask][:, :vocab],
                                       teacher_logits[:, :-1][mask][:, :vocab])
        for name, tensor in values.items():
            on_replies.setdefault(name, []).extend(tensor.tolist())
    return {
        "student": str(student_path),
        "own_samples": {
            "samples": len(completions),
            "reached_end_of_turn": mean([c.finish_reason == "stop" for c in completions]),
            "mean_length": mean([c.num_generated for c in completions]),
            "right_answer": mean(right),
            **{f"mean_{name}_per_token": mean(v) for name, v in sampled.items()}},
        "dataset_replies": {f"mean_{name}": mean(v) for name, v in on_replies.items()},
    }


def main(argv=None):
    import torch

    from common.models import load_model, load_tokenizer
    from examples.toy_task import read_jsonl

    args = parse_args(argv)
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.teacher, what="teacher")
    teacher = load_model(args.teacher, "float32", what="teacher").eval()
    rows = read_jsonl(args.dataset)[:args.max_prompts]
    results = []
    for path in args.students:
        result = diagnose(path, teacher, tokenizer, rows, args)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.output:
        Path(args.output).write_text(json.dumps({"settings": vars(args), "results": results},
                                                indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
