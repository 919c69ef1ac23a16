"""How much does the teacher's distribution say beyond the reference token? Per task family of a
toy-task dataset (examples/toy_task.py), over every supervised reply token (the reply and its end
of turn) of the dataset's ground truth, the teacher's:

- mean entropy (nats) of its next-token distribution,
- mean probability of the reference token, and the fraction of tokens where it exceeds 0.99,
- mean probability mass off its own top token.

Near-zero entropy with the reference on top means its soft targets equal the hard labels there:
token-level distillation then gives the same gradient as fine-tuning on the ground truth.

    python benchmarks/teacher_targets.py --teacher T --dataset test.jsonl --output targets.json
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="model directory")
    parser.add_argument("--dataset", required=True,
                        help="JSONL of toy-task rows (messages and family)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", default=None, help="JSON file for the measurements")
    return parser.parse_args(argv)


def teacher_targets(teacher, tokenizer, rows, batch_size=64):
    """{family: {"tokens", "entropy", "reference_prob", "reference_above_0.99",
    "mass_off_top"}}, means over the family's supervised tokens."""
    import torch

    from common.chat import ChatEncoder, collate, ensure_chat_template

    encoder = ChatEncoder(ensure_chat_template(tokenizer, "teacher"), max_length=256)
    sums = defaultdict(lambda: defaultdict(float))
    encoded = [(row["family"], encoder.encode(row["messages"])) for row in rows]
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            part = encoded[start:start + batch_size]
            batch = collate([example for _, example in part], tokenizer.pad_token_id)
            logits = teacher(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            log_probs = torch.log_softmax(logits[..., :len(tokenizer)], dim=-1)
            probs = log_probs.exp()
            entropy = -(probs * log_probs).sum(-1)
            top = probs.max(-1).values
            for row, (family, _) in enumerate(part):
                supervised = labels[row] != -100
                reference = probs[row][supervised].gather(
                    -1, labels[row][supervised].unsqueeze(-1)).squeeze(-1)
                stats = sums[family]
                stats["tokens"] += int(supervised.sum())
                stats["entropy"] += entropy[row][supervised].sum().item()
                stats["reference_prob"] += reference.sum().item()
                stats["reference_above_0.99"] += (reference > 0.99).sum().item()
                stats["mass_off_top"] += (1 - top[row][supervised]).sum().item()
    return {family: {"tokens": int(stats["tokens"]),
                     **{key: round(value / stats["tokens"], 4) for key, value in stats.items()
                        if key != "tokens"}}
            for family, stats in sorted(sums.items())}


def main(argv=None):
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from examples.toy_task import read_jsonl

    teacher = AutoModelForCausalLM.from_pretrained(args.teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    result = {"teacher": args.teacher, "dataset": args.dataset,
              "families": teacher_targets(teacher, tokenizer, read_jsonl(args.dataset),
                                          args.batch_size)}
    print(f"| family | tokens | teacher entropy (nats) | p(reference) | share p(reference) > 0.99 "
          f"| mass off its top token |")
    print("|---|---:|---:|---:|---:|---:|")
    for family, stats in result["families"].items():
        print(f"| {family} | {stats['tokens']} | {stats['entropy']:.3f} | "
              f"{stats['reference_prob']:.3f} | {stats['reference_above_0.99']:.3f} | "
              f"{stats['mass_off_top']:.3f} |")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
