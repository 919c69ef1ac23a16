"""Peak memory of eval.py's forward-pass metrics (perplexity, KL to the teacher) at a large vocabulary.

    python benchmarks/bench_eval_memory.py --vocab 262144 --batch-size 2 --length 512
    python benchmarks/bench_eval_memory.py --repo /tmp/old_checkout ...   # the same, older eval.py

Builds a random teacher and student (Llama, 2 layers; --hidden wide) with a --vocab vocabulary in
float32 on the CPU, and --batch-size conversations of --length tokens whose last three quarters
are scored, then runs eval.py's `score_references` (the model against the teacher) once over them.
The models are small on purpose: what is measured is the logits, which at a 262,144-token
vocabulary outweigh a model of this size many times over. Prints one JSON line: peak RSS of the
process (ru_maxrss), the RSS just before scoring (`inputs_mb`: Python, torch, both models), their
difference and the seconds taken. Run each side in its own process (peak RSS only grows).
"""

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=262144, help="vocabulary size")
    parser.add_argument("--batch-size", type=int, default=2, help="conversations per batch")
    parser.add_argument("--length", type=int, default=512, help="tokens per conversation")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of both models")
    parser.add_argument("--repo", default=str(REPO), help="checkout whose eval.py is measured")
    cli = parser.parse_args()
    sys.path.insert(0, cli.repo)
    sys.path.insert(1, str(REPO))

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import eval as eval_script
    from benchmarks.memory import peak_rss_mb, rss_mb

    torch.manual_seed(0)
    models = []
    for _ in range(2):
        config = LlamaConfig(vocab_size=cli.vocab, hidden_size=cli.hidden,
                             intermediate_size=2 * cli.hidden, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=cli.length, tie_word_embeddings=False)
        models.append(LlamaForCausalLM(config).eval())
    student, teacher = models
    prompt = cli.length // 4
    examples = []
    for _ in range(cli.batch_size):
        ids = torch.randint(0, cli.vocab, (cli.length,)).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    inputs_mb = rss_mb()
    started = time.perf_counter()
    totals = eval_script.score_references(student, examples, cli.vocab, cli.batch_size, 0,
                                          teacher=teacher, progress=False)
    seconds = time.perf_counter() - started
    print(json.dumps({"repo": cli.repo, "vocab": cli.vocab, "batch_size": cli.batch_size,
                      "length": cli.length, "scored_tokens": totals["tokens"],
                      "nll_per_token": round(totals["nll"] / totals["tokens"], 6),
                      "kl_per_token": round(totals["kl"] / totals["tokens"], 6),
                      "peak_mb": round(peak_rss_mb(), 1), "inputs_mb": round(inputs_mb, 1),
                      "scoring_mb": round(peak_rss_mb() - inputs_mb, 1),
                      "seconds": round(seconds, 2)}))


if __name__ == "__main__":
    main()
