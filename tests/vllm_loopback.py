"""A loopback stand-in for `vllm serve`: a tiny local model behind the two endpoints the server
teacher uses, answering in vLLM's JSON shapes (vllm/entrypoints/openai/completion/protocol.py and
serving.py, the tokenize protocol, ErrorResponse):

    POST /v1/completions  echo + max_tokens 0 + logprobs K: `choices[0].logprobs` with null at
                          position 0, top_logprobs keyed "token_id:N" (return_tokens_as_token_ids),
                          the prompt token added as a K+1-th entry when it is not in the top K,
                          log-probs clamped at -9999.0; also vLLM's `prompt_logprobs` field
    POST /tokenize        {"count", "max_model_len", "tokens", "token_strs"}
    a 400 "Requested sample logprobs of K, which is greater than max allowed: M" when K > M

Log-probs are the model's float32 log-softmax over ALL its output rows (as vLLM's, which include
padded embedding rows), written by json as the shortest repr of each float32 value: exact.
"""

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

API_KEY = "sk-loopback-0123456789"
MODEL_NAME = "teacher-served"


class LoopbackVllm:
    def __init__(self, model_dir, tokenizer_dir=None, max_logprobs=20, failures=(),
                 has_tokenize=True, stop_after=None):
        """`failures`: HTTP statuses answered, in order, to the first completion requests
        (429 / 500 test the client's retries). `stop_after`: completion requests answered before
        every later one is refused with a 400 (not retried: the client fails hard, as on a
        server gone wrong mid-build); `scored` counts the prompts answered."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
        self.max_logprobs, self.failures = max_logprobs, list(failures)
        self.has_tokenize, self.stop_after, self.scored = has_tokenize, stop_after, 0
        self.statuses, self.bytes_sent, self.logprobs_asked = Counter(), 0, Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, body):
                data = json.dumps(body).encode()
                with server.lock:
                    server.statuses[status] += 1
                    server.bytes_sent += len(data)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def error(self, status, kind, message, param=None):
                self.reply(status, {"error": {"message": message, "type": kind, "param": param,
                                              "code": status}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                    return self.error(401, "Unauthorized", "Unauthorized")
                path = self.path.split("?")[0]
                if body.get("model") != MODEL_NAME or path not in (
                        "/v1/completions", "/tokenize") or (path == "/tokenize"
                                                             and not server.has_tokenize):
                    return self.error(404, "NotFoundError", "Not Found")
                if path == "/tokenize":
                    tokens = server.tokenize(body["prompt"], body.get("add_special_tokens", True))
                    return self.reply(200, {"count": len(tokens), "max_model_len": 4096,
                                            "tokens": tokens, "token_strs": None})
                with server.lock:
                    failure = server.failures.pop(0) if server.failures else None
                if failure:
                    return self.error(failure, "InternalServerError", "try again")
                logprobs = body.get("logprobs")
                with server.lock:
                    server.logprobs_asked[logprobs] += 1
                if logprobs is not None and logprobs > server.max_logprobs:
                    return self.error(400, "BadRequestError",
                                      f"Requested sample logprobs of {logprobs}, which is greater "
                                      f"than max allowed: {server.max_logprobs}", "logprobs")
                with server.lock:
                    stopped = server.stop_after is not None and server.scored >= server.stop_after
                    server.scored += not stopped
                if stopped:
                    return self.error(400, "BadRequestError", "the loopback server has stopped")
                self.reply(200, server.complete(body))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def tokenize(self, text, add_special_tokens):
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    @torch.no_grad()
    def complete(self, body):
        """The answer to an echo-only request (max_tokens 0), as vLLM's
        request_output_to_completion_response builds it."""
        assert body["echo"] and body["max_tokens"] == 0, "only prompt scoring is served here"
        prompt = body["prompt"]
        ids = prompt if isinstance(prompt, list) else self.tokenize(
            prompt, body.get("add_special_tokens", True))
        # With another tokenizer (the mismatch tests) ids may exceed the model's rows: the
        # forward pass then sees them folded into range; the echoed ids stay as tokenized.
        model_ids = [token % self.model.config.vocab_size for token in ids]
        with self.lock:  # one forward at a time, one unpadded sequence each
            logits = self.model(input_ids=torch.tensor([model_ids])).logits[0].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        k = body.get("logprobs") or 0
        as_ids = body.get("return_tokens_as_token_ids")

        def name(token):
            return f"token_id:{token}" if as_ids else self.tokenizer.decode([token])

        tokens, token_logprobs, top_logprobs, prompt_logprobs = [name(ids[0])], [None], [None], [None]
        for j in range(1, len(ids)):
            row = log_probs[j - 1]
            ranks = torch.argsort(row, descending=True, stable=True)
            rank_of = {int(token): rank + 1 for rank, token in enumerate(ranks[:k].tolist())}
            actual = model_ids[j]
            listed = [actual] + [int(token) for token in ranks[:k] if int(token) != actual]
            listed = listed[:k + 1]
            tokens.append(name(ids[j]))
            token_logprobs.append(max(row[actual].item(), -9999.0))
            top_logprobs.append({name(token): max(row[token].item(), -9999.0) for token in listed})
            actual_rank = int((row > row[actual]).sum()) + 1
            prompt_logprobs.append({str(token): {
                "logprob": max(row[token].item(), -9999.0),
                "rank": rank_of.get(token, actual_rank),
                "decoded_token": self.tokenizer.decode([token])} for token in listed})
        text = self.tokenizer.decode(ids)
        return {
            "id": "cmpl-loopback", "object": "text_completion", "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "text": text, "finish_reason": "length", "stop_reason": None,
                         "logprobs": {"text_offset": list(range(len(ids))),
                                      "token_logprobs": token_logprobs, "tokens": tokens,
                                      "top_logprobs": top_logprobs},
                         "prompt_logprobs": prompt_logprobs, "prompt_token_ids": None,
                         "token_ids": None}],
            "usage": {"prompt_tokens": len(ids), "total_tokens": len(ids),
                      "completion_tokens": 0}}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
