"""A token-level step with the teacher on a server against the same step with the teacher in
memory, on the tiny setup (examples/tiny_setup.py), and the bytes per supervised token that
cross the wire.

    python benchmarks/bench_server_teacher.py --top-k 20 --steps 20

The server is the tests' loopback stand-in for `vllm serve` (tests/vllm_loopback.py: the tiny
teacher on CPU in this process, answering in vLLM's JSON, including vLLM's duplicate
`prompt_logprobs` field). Both sides run the loss functions the script runs, forward and
backward, over the same micro-batches:

    local   common.distill.make_kd_loss_fn with the teacher loaded (dense forward KL)
    served  common.server_teacher.make_server_loss_fn (top-K forward KL + tail), requests
            --api-concurrency at a time

`tokens_per_s` counts supervised tokens. With a tiny teacher the served step measures the HTTP
and JSON overhead, not a big teacher's compute; with a real server the teacher's time moves off
the student's machine. `bytes_per_supervised_token` divides the response bytes by the supervised
tokens (every prompt position is scored and sent; only the supervised ones are used). The last
line printed is one JSON object.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--api-concurrency", type=int, default=8)
    args = parser.parse_args()

    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from common.api_client import TeacherApiArguments
    from common.chat import ChatEncoder, collate
    from common.distill import make_kd_loss_fn
    from common.models import load_tokenizer
    from common.server_teacher import ServerTeacher, make_server_loss_fn
    from examples.tiny_setup import build
    from vllm_loopback import API_KEY, MODEL_NAME, LoopbackVllm

    tiny = build(Path(tempfile.mkdtemp()) / "tiny")
    tokenizer = load_tokenizer(str(tiny / "student"), False, "student")
    rows = [json.loads(line) for line in (tiny / "train.jsonl").read_text().splitlines()]
    encoder = ChatEncoder(tokenizer, 256)
    examples = [encoder.encode(row["messages"]) for row in rows]
    batches = [collate([examples[(step * args.batch_size + i) % len(examples)]
                        for i in range(args.batch_size)], tokenizer.pad_token_id)
               for step in range(args.steps)]
    supervised = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches)
    accelerator = Accelerator(cpu=True)
    student = AutoModelForCausalLM.from_pretrained(tiny / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher", dtype=torch.float32).eval()
    teacher.requires_grad_(False)

    def time_steps(loss_fn):
        started = time.perf_counter()
        for batch in batches:
            loss, _ = loss_fn(student, batch)
            loss.backward()
            student.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    local_s = time_steps(make_kd_loss_fn(accelerator, teacher, len(tokenizer)))
    os.environ["BENCH_TEACHER_KEY"] = API_KEY
    with LoopbackVllm(tiny / "teacher", tiny / "student", max_logprobs=args.top_k) as server:
        served_teacher = ServerTeacher(
            TeacherApiArguments(server.url, MODEL_NAME, "BENCH_TEACHER_KEY",
                                api_concurrency=args.api_concurrency), args.top_k, len(tokenizer))
        served_s = time_steps(make_server_loss_fn(accelerator, served_teacher, len(tokenizer)))
        received = served_teacher.bytes_received
    result = {"top_k": args.top_k, "steps": args.steps, "batch_size": args.batch_size,
              "supervised_tokens": supervised, "threads": torch.get_num_threads(),
              "local_tokens_per_s": round(supervised / local_s, 1),
              "served_tokens_per_s": round(supervised / served_s, 1),
              "bytes_per_supervised_token": round(received / supervised, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
