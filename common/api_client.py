"""A teacher behind an OpenAI-compatible server: the options, the client and its one-line errors,
shared by sequence_level.py (chat completions) and the server teacher of token_level.py and
on_policy.py (common/server_teacher.py).

The official `openai` client does the transport: retries with exponential backoff on 429 / 5xx /
connection errors (honouring Retry-After), timeouts, and typed 401 / 404 errors. The key is read
from an environment variable only; it is never logged or written, and URLs are redacted
(user:password@ and query values become ***) wherever they are printed or saved.
"""

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from common.errors import UserError


@dataclass
class TeacherApiArguments:
    """The server options every script with a served teacher takes (a script's own argument
    dataclass lists them first by deriving from this one, so they stay in its run_config group)."""

    teacher_api_base: Optional[str] = field(default=None, metadata={
        "help": "Base URL of an OpenAI-compatible API (e.g. http://localhost:8000/v1); used "
                "instead of a local --teacher. Logs and saved configs show it with "
                "user:password@ and query values as ***."})
    teacher_api_model: Optional[str] = field(default=None, metadata={
        "help": "Model name to request from --teacher-api-base."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "Environment variable holding the API key (never logged or written to disk)."})
    api_concurrency: int = field(default=8, metadata={"help": "Requests in flight at once."})
    api_timeout: float = field(default=120.0, metadata={"help": "Seconds per API request."})
    api_max_retries: int = field(default=6, metadata={
        "help": "Retries per request on 429 / 5xx / connection errors, with exponential backoff."})

    def __post_init__(self):
        if (self.teacher_api_base is None) != (self.teacher_api_model is None):
            raise UserError("--teacher-api-base and --teacher-api-model go together; pass both")
        checks = [
            (self.api_concurrency >= 1, f"--api-concurrency must be >= 1, got {self.api_concurrency}"),
            (self.api_timeout > 0, f"--api-timeout must be > 0, got {self.api_timeout}"),
            (self.api_max_retries >= 0, f"--api-max-retries must be >= 0, got {self.api_max_retries}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def redact_url(url):
    """`url` fit for logs and saved configs: user:password@ and every query value become ***.

    The request itself uses the URL as given; only what is printed or written is redacted.
    """
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:  # malformed (e.g. an unclosed IPv6 bracket): show nothing of it
        return "<the --teacher-api-base URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(f"{name}=***" if sep else "***"
                     for name, sep, _ in (item.partition("=")
                                          for item in parts.query.split("&") if item))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_urls_in(text):
    """Any user:password@ and query value of any URL in `text` (an exception's message may show
    the client's own normalised form of the URL, or a request URL) becomes ***."""
    text = re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)
    return re.sub(r"([?&][^=&\s/]+=)[^&\s'\"]+", r"\1***", text)


def redacted_command(argv, api_args):
    """The command line as run, fit for run_config.json: the API URL redacted."""
    command = " ".join(argv)
    if api_args.teacher_api_base:
        command = command.replace(api_args.teacher_api_base, redact_url(api_args.teacher_api_base))
    return command


def redacted_args(api_args):
    """A copy of the options dataclass fit for run_config.json (saved in every checkpoint): the
    API URL redacted; the key is never among the arguments."""
    if not api_args.teacher_api_base:
        return api_args
    return dataclasses.replace(api_args, teacher_api_base=redact_url(api_args.teacher_api_base))


def split_query(url):
    """(URL without its query, {name: value}): the openai client appends paths to base_url, so a
    query left in it would end up inside the path; it is sent as default_query instead."""
    from urllib.parse import parse_qsl, urlsplit, urlunsplit

    parts = urlsplit(url)
    return (urlunsplit((parts.scheme, parts.netloc, parts.path, "", parts.fragment)),
            dict(parse_qsl(parts.query)))


def make_client(api_args, log=print):
    """An `openai.OpenAI` client for --teacher-api-base, the key from $--api-key-env."""
    import openai

    api_key = os.environ.get(api_args.api_key_env)
    if not api_key:
        log(f"warning: ${api_args.api_key_env} is not set; sending requests without a key")
    base_url, query = split_query(api_args.teacher_api_base)  # e.g. Azure's ?api-version=...
    return openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", default_query=query,
                         max_retries=api_args.api_max_retries, timeout=api_args.api_timeout)


def api_error(exc, api_args):
    """The one-line UserError for an exception the openai client raised (after its retries)."""
    import openai

    api_base = redact_url(api_args.teacher_api_base)
    where = f"{api_base} (model {api_args.teacher_api_model})"
    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return UserError(f"the API at {where} rejected the key ({exc.status_code}); put a valid "
                         f"key in ${api_args.api_key_env}")
    if isinstance(exc, openai.NotFoundError):
        return UserError(f"the API at {where} answered 404: check --teacher-api-base (it usually "
                         f"ends in /v1) and --teacher-api-model")
    if isinstance(exc, openai.APITimeoutError):
        return UserError(f"the API at {where} gave no answer within --api-timeout "
                         f"{api_args.api_timeout:g} s ({api_args.api_max_retries} retries); raise "
                         f"--api-timeout (long requests take a while), or lower "
                         f"--api-concurrency if the server is overloaded")
    if isinstance(exc, openai.APIConnectionError):
        return UserError(f"cannot reach the API at {api_base} after "
                         f"{api_args.api_max_retries} retries; check the URL and that the server "
                         f"is up")
    if isinstance(exc, openai.BadRequestError):  # 400: not retried, the request itself is wrong
        return UserError(f"the API at {where} refused the request (400): "
                         f"{one_line(error_message(exc), api_args)}")
    if isinstance(exc, openai.APIStatusError):
        return UserError(f"the API at {where} kept failing ({exc.status_code}) after "
                         f"{api_args.api_max_retries} retries; rerun later to continue")
    return UserError(f"the API at {where} failed: {type(exc).__name__}: "
                     f"{one_line(str(exc), api_args)}")


def error_message(exc):
    """The server's own message in an APIStatusError: {"error": {"message"}} (OpenAI, current
    vLLM) or {"message"} (older vLLM), else the client's text."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        if isinstance(inner.get("message"), str):
            return inner["message"]
    return str(exc)


def one_line(text, api_args):
    text = text.replace(api_args.teacher_api_base, redact_url(api_args.teacher_api_base))
    return " ".join(redact_urls_in(text).split())
