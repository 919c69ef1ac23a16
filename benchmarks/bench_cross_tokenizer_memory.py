"""Peak memory and time of one cross_tokenizer.py training step (ULD loss + backward) at a 262,144-token
teacher vocabulary.

    python benchmarks/bench_cross_tokenizer_memory.py --batch-size 2 --length 512
    python benchmarks/bench_cross_tokenizer_memory.py --repo /tmp/old_checkout ...  # older script
    python benchmarks/bench_cross_tokenizer_memory.py --hybrid --top-k 0 ...        # other terms

Builds a random Llama teacher (--teacher-vocab, default 262,144) and student (--student-vocab,
default 49,152), 2 layers of --hidden each, in float32 on the CPU, and --batch-size conversations
of --length tokens on each side whose last three quarters are aligned (student token j paired with
teacher token j), then runs cross_tokenizer.py's loss (`make_loss_fn`, default flags unless given)
and its backward once. With --hybrid the first 40,000 student ids are the same strings as teacher
ids 0..39,999 and the teacher reads the student's ids, so the exact-token term applies at ~80% of
the aligned positions. The models are small on purpose: what is measured is the logits, which at
these vocabularies outweigh a model of this size many times over. Prints one JSON line: peak RSS
of the process (ru_maxrss), the RSS just before the step (`inputs_mb`: Python, torch, both
models), their difference, the seconds taken, the loss and the student's gradient norm (the same
before and after, up to float32 rounding). Run each side in its own process (peak RSS only grows).
"""

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher-vocab", type=int, default=262144, help="teacher vocabulary")
    parser.add_argument("--student-vocab", type=int, default=49152, help="student vocabulary")
    parser.add_argument("--batch-size", type=int, default=2, help="conversations per batch")
    parser.add_argument("--length", type=int, default=512, help="tokens per conversation")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of both models")
    parser.add_argument("--top-k", type=int, default=64, help="cross_tokenizer.py's --top-k")
    parser.add_argument("--uld-loss", default="kl", help="cross_tokenizer.py's --uld-loss")
    parser.add_argument("--hybrid", action="store_true", help="cross_tokenizer.py's --hybrid")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repo", default=str(REPO), help="checkout whose cross_tokenizer.py is "
                                                          "measured")
    cli = parser.parse_args()
    sys.path.insert(0, cli.repo)
    sys.path.insert(1, str(REPO))

    import torch
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    import cross_tokenizer
    from benchmarks.memory import peak_rss_mb, rss_mb

    torch.set_num_threads(cli.threads)
    torch.manual_seed(0)
    models = []
    for vocab in (cli.teacher_vocab, cli.student_vocab):
        config = LlamaConfig(vocab_size=vocab, hidden_size=cli.hidden,
                             intermediate_size=2 * cli.hidden, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=cli.length, tie_word_embeddings=False)
        models.append(LlamaForCausalLM(config))
    teacher, student = models
    teacher.eval().requires_grad_(False)
    rows, length, prompt = cli.batch_size, cli.length, cli.length // 4
    input_ids = torch.randint(0, cli.student_vocab, (rows, length))
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    teacher_input_ids = input_ids.clone() if cli.hybrid else \
        torch.randint(0, cli.teacher_vocab, (rows, length))
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "labels": labels, "teacher_input_ids": teacher_input_ids,
             "teacher_attention_mask": torch.ones_like(teacher_input_ids),
             "teacher_positions": torch.arange(length).expand(rows, length).clone()}
    shared = None
    if cli.hybrid:
        num_shared = min(40_000, cli.student_vocab, cli.teacher_vocab)
        student_to_teacher = torch.full((cli.student_vocab,), -1, dtype=torch.long)
        student_to_teacher[:num_shared] = torch.arange(num_shared)
        shared = (student_to_teacher, torch.arange(num_shared), torch.arange(num_shared))
    uld_args = cross_tokenizer.CrossTokenizerArguments(uld_loss=cli.uld_loss, top_k=cli.top_k,
                                                       hybrid=cli.hybrid)
    loss_fn = cross_tokenizer.make_loss_fn(Accelerator(cpu=True), teacher, cli.student_vocab,
                                           cli.teacher_vocab, uld_args, shared)
    inputs_mb = rss_mb()
    started = time.perf_counter()
    loss, stats = loss_fn(student, batch)
    loss.backward()
    seconds = time.perf_counter() - started
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in student.parameters()))
    aligned = int((labels[:, 1:] != -100).sum())
    print(json.dumps({"repo": cli.repo, "teacher_vocab": cli.teacher_vocab,
                      "student_vocab": cli.student_vocab, "batch_size": rows, "length": length,
                      "top_k": cli.top_k, "uld_loss": cli.uld_loss, "hybrid": cli.hybrid,
                      "aligned_tokens": aligned,
                      "loss_per_token": round(loss.item() / aligned, 6),
                      **{f"{name}_per_token": round(value.detach().item() / aligned, 6)
                         for name, value in stats.items()},
                      "grad_norm": float(f"{grad_norm.item():.6g}"),
                      "peak_mb": round(peak_rss_mb(), 1), "inputs_mb": round(inputs_mb, 1),
                      "step_mb": round(peak_rss_mb() - inputs_mb, 1),
                      "seconds": round(seconds, 2)}))


if __name__ == "__main__":
    main()
