"""A teacher behind an inference server (vLLM's OpenAI-compatible API), scored per position.

Every request sends one conversation as TOKEN IDS to the completions endpoint with
    echo: true, max_tokens: 0, logprobs: K, return_tokens_as_token_ids: true
and reads `choices[0].logprobs`: `top_logprobs[j]` holds the teacher's top-K log-probabilities of
token j given tokens < j (keys "token_id:N", up to K + 1 entries: the prompt token itself is added
when it is not among the K), `token_logprobs[j]` that of the token actually there; position 0 has
null for both. vLLM reads `echo` with `max_tokens: 0` as "score the prompt, generate nothing" and
turns `logprobs` into its `prompt_logprobs` extension; it refuses K above its --max-logprobs
(default 20) with a 400 that names the limit. Written against vLLM's completion protocol
(vllm/entrypoints/openai/completion/protocol.py and serving.py) as of 2025; not run here against a
real vLLM server (see docs/token_level.md).

Teacher and student positions are the same tokens, so the rows line up with the student's logits
exactly as the offline teacher cache's rows do (common/teacher_cache.py): the same sparse loss
(top K plus one tail bucket) reads them.
"""

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor

import torch

from common.api_client import api_error, error_message, make_client, redact_url, split_query
from common.chat import IGNORE_INDEX
from common.errors import UserError

TOKEN_ID_PREFIX = "token_id:"
# Tokenized by the server and by the student tokenizer before training: words, digits, spaces,
# accents, CJK and an emoji exercise the pre-tokenizer, byte fallback and merges.
PROBE_TEXT = "Hello, world! 1234567 +  spaces\tand tabs; café, naïve, 東京, 🙂.\nSecond line."


class ServerTeacher:
    """The teacher at --teacher-api-base: top-K rows and sampled-token log-probs for a batch."""

    def __init__(self, api_args, top_k, vocab_size, log=print):
        self.api_args, self.top_k, self.vocab_size = api_args, top_k, vocab_size
        self.client = make_client(api_args, log)
        self.pool = ThreadPoolExecutor(api_args.api_concurrency)
        self.bytes_received = 0  # response bodies, for the wire-cost benchmark

    # --- requests --------------------------------------------------------------------------------

    def _post(self, path, body, missing_ok=False):
        """The JSON answer to a POST (the client retries 429 / 5xx); None for a 404 when
        `missing_ok`, a one-line UserError for any other failure."""
        import openai

        try:
            data = self.client.post(path, body=body, cast_to=bytes)
        except openai.NotFoundError as exc:
            if missing_ok:
                return None
            raise self._refusal(exc) from None
        except openai.APIError as exc:
            raise self._refusal(exc) from None
        self.bytes_received += len(data)
        return json.loads(data)

    def _refusal(self, exc):
        """The one-line UserError for a failed request; K above the server's maximum names it."""
        import openai

        if isinstance(exc, openai.BadRequestError):
            limit = re.search(r"greater than max allowed:\s*(-?\d+)", error_message(exc))
            if limit:
                return UserError(
                    f"--teacher-top-k {self.top_k} is more than the server at "
                    f"{redact_url(self.api_args.teacher_api_base)} returns per position (at most "
                    f"{limit.group(1)}, vLLM's --max-logprobs); lower --teacher-top-k to "
                    f"{limit.group(1)}, or restart the server with --max-logprobs {self.top_k}")
        return api_error(exc, self.api_args)

    def score(self, prompt, num_logprobs):
        """`choices[0].logprobs` of one echo-only request: the teacher's view of every position."""
        response = self._post("/completions", {
            "model": self.api_args.teacher_api_model, "prompt": prompt, "echo": True,
            "max_tokens": 0, "logprobs": num_logprobs, "return_tokens_as_token_ids": True,
            "add_special_tokens": False})
        choices = response.get("choices") or [{}]
        logprobs = choices[0].get("logprobs")
        if not isinstance(logprobs, dict) or not isinstance(logprobs.get("top_logprobs"), list):
            raise UserError(f"the server at {redact_url(self.api_args.teacher_api_base)} answered "
                            f"an echo request without `logprobs.top_logprobs`; it needs a "
                            f"completions endpoint that scores the prompt (vLLM's `vllm serve`)")
        return logprobs

    def _score_all(self, sequences, num_logprobs):
        # Requests run `api_concurrency` at a time; answers come back in the order asked.
        return list(self.pool.map(lambda ids: self.score(ids, num_logprobs), sequences))

    # --- checks before training ------------------------------------------------------------------

    def check(self, tokenizer):
        """One-line UserErrors before any training: the server's tokenizer must split text as the
        student's does (vLLM's /tokenize, else the ids an echoed text prompt comes back as), and it
        must return --teacher-top-k log-probs per position."""
        expected = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        served = self._tokenize(PROBE_TEXT)
        if served is None:  # no /tokenize: the echo of a text prompt shows the server's ids
            served = [_token_id(token, self.api_args) for token in
                      self.score(PROBE_TEXT, 1)["tokens"]]
        if served != expected:
            first = next((i for i, (a, b) in enumerate(zip(served, expected)) if a != b),
                         min(len(served), len(expected)))
            raise UserError(
                f"the server's tokenizer is not the student's: {PROBE_TEXT!r} becomes "
                f"{len(served)} tokens there and {len(expected)} here, first different at token "
                f"{first}; serve a teacher that shares the student's tokenizer (or use "
                f"cross_tokenizer.py with a local teacher)")
        self.score(expected, self.top_k)  # a K above the server's maximum is refused here

    def _tokenize(self, text):
        """The server's ids for `text` from vLLM's /tokenize (at the server root, next to /v1);
        None when the server has no such endpoint."""
        root = re.sub(r"/v1/?$", "", split_query(self.api_args.teacher_api_base)[0].rstrip("/"))
        response = self._post(root + "/tokenize", {
            "model": self.api_args.teacher_api_model, "prompt": text, "add_special_tokens": False},
            missing_ok=True)
        tokens = (response or {}).get("tokens")
        return tokens if isinstance(tokens, list) else None

    # --- rows for the loss -----------------------------------------------------------------------

    def top_k_rows(self, batch, width=None):
        """teacher_ids (N, K) long, teacher_logprobs (N, K) float32, teacher_tail (N,) float32 at
        the batch's N supervised positions, in the order `shift_for_next_token` selects them
        (row-major): the offline cache's row format. K is `width` when given, else the longest
        row's (a row can be shorter than --teacher-top-k where padded-vocabulary ids dropped out)."""
        rows = []
        for (ids, labels), logprobs in zip(*self._ask(batch, self.top_k)):
            top = logprobs["top_logprobs"]
            self._check_length(top, ids)
            for j in range(1, len(ids)):  # entry j: the distribution position j - 1 predicts
                if labels[j] != IGNORE_INDEX:
                    rows.append(sparse_row(self._entries(top[j], j), self.top_k, self.vocab_size))
        width = width or max((len(row[0]) for row in rows), default=1)
        teacher_ids = torch.zeros(len(rows), width, dtype=torch.long)
        teacher_logprobs = torch.full((len(rows), width), float("-inf"))
        for index, (ids, logprobs, _) in enumerate(rows):
            # Padding repeats a listed id with probability 0: no new token enters the top K.
            teacher_ids[index] = torch.tensor(ids + [ids[0]] * (width - len(ids)))
            teacher_logprobs[index, :len(logprobs)] = torch.tensor(logprobs)
        teacher_tail = torch.tensor([row[2] for row in rows], dtype=torch.float32)
        return teacher_ids, teacher_logprobs, teacher_tail

    def cache_rows(self, batch):
        """A row source for the offline cache's build (teacher_cache.build_cache): every batch's
        rows min(K, V) wide, as a local teacher's, so the shards' rows all have one width."""
        return self.top_k_rows(batch, width=min(self.top_k, self.vocab_size))

    def sampled_logprobs(self, batch):
        """(N,) float32: the teacher's log-probability of the token actually at each of the batch's
        N supervised positions (what the sampled reverse-KL estimator needs; one number each)."""
        values = []
        # 1, not 0: some servers read a falsy `logprobs` as "no log-probs".
        for (ids, labels), logprobs in zip(*self._ask(batch, 1)):
            token_logprobs = logprobs["token_logprobs"]
            self._check_length(token_logprobs, ids)
            for j in range(1, len(ids)):
                if labels[j] != IGNORE_INDEX:
                    if token_logprobs[j] is None:
                        self._no_logprobs(j)
                    values.append(float(token_logprobs[j]))
        return torch.tensor(values, dtype=torch.float32)

    def _ask(self, batch, num_logprobs):
        sequences = []
        for ids, mask, labels in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(),
                                     batch["labels"].tolist()):
            length = sum(mask)  # right-padded (common.chat.collate)
            sequences.append((ids[:length], labels[:length]))
        return sequences, self._score_all([ids for ids, _ in sequences], num_logprobs)

    def _entries(self, entry, position):
        if entry is None:
            self._no_logprobs(position)
        return {_token_id(token, self.api_args): value for token, value in entry.items()}

    def _check_length(self, values, ids):
        if len(values) != len(ids):
            raise UserError(f"the server echoed {len(values)} positions for a prompt of "
                            f"{len(ids)} token ids; it must score the ids as sent (vLLM's "
                            f"completions endpoint does)")

    def _no_logprobs(self, position):
        raise UserError(f"the server gave no log-probs for prompt position {position}; start it "
                        f"with --no-enable-prefix-caching (cached prefixes may have none)")


def _token_id(token, api_args):
    if not token.startswith(TOKEN_ID_PREFIX):
        raise UserError(f"the server at {redact_url(api_args.teacher_api_base)} named a token "
                        f"{token[:20]!r} instead of 'token_id:N': it ignores "
                        f"return_tokens_as_token_ids; use a vLLM version that has it")
    return int(token[len(TOKEN_ID_PREFIX):])


def sparse_row(entries, top_k, vocab_size):
    """(ids, log-probs, log tail mass) of one position from the server's {token id: log-prob}.

    The K most probable entries are kept (the server adds the prompt token as a K+1-th when it
    is not among them). A server normalises over all of its model's output rows, which may
    outnumber the tokenizer's tokens (padded embeddings); those ids are dropped and the rest is
    renormalised by the mass they held, so the row describes the same V tokens the student's
    softmax covers. The tail bucket holds the mass of the tokens not listed; it is empty (log 0)
    when every one of the V tokens is listed.
    """
    top = sorted(entries.items(), key=lambda item: -item[1])[:top_k]
    padded_mass = math.fsum(math.exp(value) for token, value in top if token >= vocab_size)
    log_real_mass = math.log1p(-padded_mass) if padded_mass < 1 else 0.0
    kept = [(token, value - log_real_mass) for token, value in top if token < vocab_size]
    listed_mass = math.fsum(math.exp(value) for _, value in kept)
    if len(kept) >= vocab_size or listed_mass >= 1.0:
        tail = float("-inf")
    else:
        tail = math.log1p(-listed_mass)
    return [token for token, _ in kept], [value for _, value in kept], tail


def make_server_loss_fn(accelerator, server, vocab_size, alpha=0.0, loss_chunk_size=0):
    """loss_fn(student, batch) for the shared loop with the teacher on a server: the batch's
    top-K rows are asked for, then scored by the offline cache's loss ((1 - alpha) * sparse
    forward KL + alpha * CE, memory-bounded the same way; see teacher_cache.make_cached_loss_fn).
    The server's log-probs are at temperature 1, so the loss is too."""
    from common.teacher_cache import make_cached_loss_fn

    cached_loss_fn = make_cached_loss_fn(accelerator, vocab_size, 1.0, alpha, loss_chunk_size)

    def loss_fn(student, batch):
        device = batch["input_ids"].device
        teacher_ids, teacher_logprobs, teacher_tail = server.top_k_rows(batch)
        return cached_loss_fn(student, {**batch, "teacher_ids": teacher_ids.to(device),
                                        "teacher_logprobs": teacher_logprobs.to(device),
                                        "teacher_tail": teacher_tail.to(device)})

    return loss_fn


def make_server_on_policy_loss_fn(accelerator, server, vocab_size, kl, loss_chunk_size=0):
    """loss_fn(student, batch) for on_policy.py with the teacher on a server.

    kl "forward": the top-K forward KL on every batch. kl "sampled_reverse": on the student's own
    samples (batches the sampler marked "on_policy") the sampled reverse-KL estimator, which needs
    one teacher log-prob per token; dataset replies (off-policy steps) are not samples of the
    student, so they get the top-K forward KL. Stats: "kd" sums the KL (estimate) per token.
    """
    from common.distill import make_head_loss_fn
    from common.losses import sampled_reverse_kl

    top_k_loss_fn = make_server_loss_fn(accelerator, server, vocab_size,
                                        loss_chunk_size=loss_chunk_size)

    def terms(logits, targets, teacher_sampled_log_probs):
        # logged: log p_s(x) − log p_t(x), the sampled reverse KL (the surrogate is not the KL)
        surrogate, estimate = sampled_reverse_kl(logits, targets, teacher_sampled_log_probs,
                                                 with_estimate=True)
        return surrogate.sum(), {"kd": estimate.sum()}

    sampled_loss_fn = make_head_loss_fn(accelerator, vocab_size, terms, loss_chunk_size,
                                        row_keys=("teacher_sampled_log_probs",))

    def loss_fn(student, batch):
        if kl != "sampled_reverse" or "on_policy" not in batch:
            return top_k_loss_fn(student, batch)
        teacher_sampled = server.sampled_logprobs(batch).to(batch["input_ids"].device)
        return sampled_loss_fn(student, {**batch, "teacher_sampled_log_probs": teacher_sampled})

    return loss_fn


def same_vocabulary_tokenizer(model_args, api_args):
    """(student tokenizer, ServerTeacher or None) for token_level.py and on_policy.py.

    With --teacher-api-base the student's template renders the ids the server scores, and the
    server is checked to tokenize as the student does (and K to be within its maximum) before
    any training; a local teacher must share the student's tokenizer and lends it its template.
    """
    from common.chat import ensure_chat_template, use_teacher_template
    from common.models import check_same_tokenizer, load_tokenizer, real_vocab_size

    tokenizer = load_tokenizer(model_args.student, model_args.trust_remote_code, "student")
    if api_args.teacher_api_base:
        ensure_chat_template(tokenizer, "student", model_args.chat_template)
        server = ServerTeacher(api_args, api_args.teacher_top_k, real_vocab_size(tokenizer))
        server.check(tokenizer)
        return tokenizer, server
    teacher_tokenizer = load_tokenizer(model_args.teacher, model_args.trust_remote_code, "teacher")
    check_same_tokenizer(teacher_tokenizer, tokenizer, model_args.teacher, model_args.student)
    use_teacher_template(tokenizer, teacher_tokenizer, model_args.chat_template)
    return tokenizer, None
