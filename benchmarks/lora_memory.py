"""Trainable parameters and peak memory of a LoRA student against full fine-tuning of the same
student: token_level.py run as a user runs it, once per setting, in a process of its own.

    python benchmarks/lora_memory.py --output benchmarks/results/lora_memory.json
    python benchmarks/lora_memory.py --layers 4 --steps 2     # a quick look

The student and teacher are the same randomly initialised model shaped like SmolLM2-135M (hidden
576, 30 layers, 9 heads / 3 key-value heads, MLP 1536, 49,152-token embedding, tied), so no
download is needed; only the shapes matter for memory. On a machine without a GPU the peak is the
process's peak resident memory (ru_maxrss: the teacher, the student, activations, gradients and
AdamW state, plus the Python and torch runtime); with a GPU it is torch's peak allocated memory.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Run in the child, around token_level.main: peak memory of that process alone.
CHILD = """
import json, resource, sys
import torch
sys.argv = ["token_level.py", *sys.argv[1:]]
import token_level
from common.errors import run_cli
run_cli(token_level.main)
peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
if torch.cuda.is_available():
    peak["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
print("PEAK " + json.dumps(peak))
"""


def build_models(root, layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    from examples.tiny_setup import build_bpe_tokenizer, toy_conversations, write_jsonl

    rows = toy_conversations(64, seed=0)
    tokenizer = build_bpe_tokenizer(rows)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_jsonl(root / "train.jsonl", rows)
    return sum(p.numel() for p in model.parameters())


def run(root, name, steps, batch_size, extra):
    out = root / name
    command = [sys.executable, "-c", CHILD, "--teacher", root / "model", "--student",
               root / "model", "--dataset", root / "train.jsonl", "--output-dir", out,
               "--max-steps", str(steps), "--batch-size", str(batch_size), "--save-steps", "0",
               "--log-steps", "1", "--dtype", "float32", *extra]
    started = time.perf_counter()
    done = subprocess.run(list(map(str, command)), cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
    peak = json.loads(next(line[5:] for line in done.stdout.splitlines()
                           if line.startswith("PEAK ")))
    lora = re.search(r"LoRA r=\d+: ([\d,]+) trainable parameters", done.stdout)
    return {"setting": name, "flags": " ".join(extra), **peak,
            "trainable_parameters": int(lora.group(1).replace(",", "")) if lora else None,
            "wall_seconds": round(seconds, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (default 30)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--output", help="write the rows to this JSON file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        parameters = build_models(root, args.layers)
        rows = [run(root, "full fine-tuning", args.steps, args.batch_size, []),
                run(root, f"LoRA r={args.lora_r}", args.steps, args.batch_size,
                    ["--lora-r", str(args.lora_r)])]
    rows[0]["trainable_parameters"] = parameters
    for row in rows:
        print(json.dumps(row))
    if args.output:
        Path(args.output).write_text(json.dumps(
            {"student_parameters": parameters, "layers": args.layers, "steps": args.steps,
             "batch_size": args.batch_size, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
