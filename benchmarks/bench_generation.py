"""Local-teacher generation throughput: the batched path of common/generation.py against
one-prompt-at-a-time generation, same teacher, same prompts, same run.

    python benchmarks/bench_generation.py --num-prompts 64 --max-new-tokens 32 --batch-size 16

Builds the tiny offline teacher (examples/tiny_setup.py) unless --teacher names a model. Prints one
JSON line: new tokens per second for both paths and their ratio. Decoding is greedy, so both
paths generate the same tokens (checked), and the teacher is random, so every prompt runs to
--max-new-tokens: the numbers compare the decoding machinery, not the model.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common.chat import ChatEncoder, render  # noqa: E402
from common.generation import generate  # noqa: E402
from common.models import freeze, load_model, load_tokenizer  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", help="model directory (default: build the tiny teacher)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    from examples.tiny_setup import build, toy_conversations

    teacher_dir = args.teacher or str(build(tempfile.mkdtemp(), with_sentencepiece=False) / "teacher")
    tokenizer = load_tokenizer(teacher_dir)
    model = freeze(load_model(teacher_dir, "float32"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    prompts = [row["messages"][:1] for row in toy_conversations(args.num_prompts, seed=7)]
    prompt_ids = [tokenizer(render(tokenizer, p, add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"] for p in prompts]
    stop_ids = {ChatEncoder(tokenizer, 4096).end_of_turn_token_id, tokenizer.eos_token_id}
    generate(model, tokenizer, prompt_ids[:2], 4, stop_ids, progress=False)  # warm-up

    batched, batched_s = timed(lambda: generate(
        model, tokenizer, prompt_ids, args.max_new_tokens, stop_ids,
        batch_size=args.batch_size, progress=False))
    single, single_s = timed(lambda: [generate(model, tokenizer, [ids], args.max_new_tokens,
                                               stop_ids, batch_size=1, progress=False)[0]
                                      for ids in prompt_ids])
    same = sum(a.token_ids == b.token_ids for a, b in zip(batched, single))
    batched_tokens = sum(c.num_generated for c in batched)
    single_tokens = sum(c.num_generated for c in single)
    print(json.dumps({
        "device": device, "torch_threads": torch.get_num_threads(),
        "num_prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "batched": {"new_tokens": batched_tokens, "seconds": round(batched_s, 3),
                    "tokens_per_second": round(batched_tokens / batched_s, 1)},
        "one_at_a_time": {"new_tokens": single_tokens, "seconds": round(single_s, 3),
                          "tokens_per_second": round(single_tokens / single_s, 1)},
        "speedup": round((batched_tokens / batched_s) / (single_tokens / single_s), 2),
        "identical_completions": f"{same}/{len(prompt_ids)}"}))


if __name__ == "__main__":
    main()
