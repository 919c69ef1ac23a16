"""The README stays a first page, and the README's and docs/' links and commands match the code.

Flags are read from each script's own argument parser, caught at the moment the script parses
its command line (no `--help` subprocess, no training), so a renamed or removed flag that a
documented command still uses fails here.
"""

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_BYTES = 15 * 1024
MAIN_SCRIPTS = ["token_level.py", "sequence_level.py", "on_policy.py", "cross_tokenizer.py",
                "eval.py"]

# Options of the launchers and tools shown around the scripts (accelerate, torchrun, pip, Slurm),
# which the scripts themselves do not take.
OTHER_TOOLS_FLAGS = {"--config_file", "--num_processes", "--cpu", "--mpirun_hostfile",
                     "--nproc_per_node", "--shutdown-timeout", "--signal", "--index-url", "--logdir"}

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9_-]*)")


def prose(text):
    """The page without fenced code blocks (links and headings inside them are not real)."""
    return FENCE.sub("", text)


def github_anchor(heading):
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page):
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*$", prose(page.read_text()), re.MULTILINE)
    return {github_anchor(heading) for heading in headings}


def links(page):
    text = INLINE_CODE.sub("code", prose(page.read_text()))
    return LINK.findall(text)


def shell_commands(page):
    """Each command of the page's ```bash blocks, as a token list (continuations joined)."""
    for language, body in FENCE.findall(page.read_text()):
        if language.strip() not in ("bash", "sh", "shell"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            command = []
            for token in shlex.split(line, comments=True):
                if token in ("&&", "||", ";", "|"):
                    yield command
                    command = []
                else:
                    command.append(token)
            yield command


def script_invocations():
    """(page, script path, flags given to it) for every repository script the pages run."""
    found = []
    for page in PAGES:
        for command in shell_commands(page):
            scripts = [i for i, token in enumerate(command) if token.endswith(".py")]
            if not scripts or "pytest" in command:  # a test file is pytest's argument
                continue
            position = scripts[0]  # launcher options (accelerate, torchrun) come before it
            flags = {token.split("=")[0] for token in command[position + 1:]
                     if token.startswith("--")}
            found.append((page.relative_to(REPO), command[position], flags))
    return found


class _Parsed(Exception):
    """Raised in place of parsing, once the script's parser is complete."""


def accepted_flags(script):
    """Every option string the script's argument parser accepts, without running the script."""
    seen = {}

    def capture(parser, *args, **kwargs):
        seen["flags"] = set(parser._option_string_actions)
        raise _Parsed

    environment = dict(os.environ)  # some benchmarks set variables on import (TQDM_DISABLE)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
            patch.setattr(sys, "argv", [str(REPO / script)])
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(_Parsed):
                runpy.run_path(str(REPO / script), run_name="__main__")
    finally:
        for name in set(os.environ) - set(environment):
            del os.environ[name]
        os.environ.update(environment)
    assert "flags" in seen, f"{script} never parsed a command line"
    return seen["flags"]


@pytest.fixture(scope="module")
def flags_by_script():
    scripts = sorted({script for _, script, _ in script_invocations()} | set(MAIN_SCRIPTS))
    missing = [script for script in scripts if not (REPO / script).is_file()]
    assert not missing, f"the docs run scripts that do not exist: {missing}"
    return {script: accepted_flags(script) for script in scripts}


def test_readme_is_a_first_page():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes, over {README_MAX_BYTES}: move the longer part to docs/")


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in links(page):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            destination = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)}: ({target})"
            if not destination.exists():
                broken.append(f"{where} names a missing file")
            elif fragment and (destination.suffix != ".md" or fragment not in anchors(destination)):
                broken.append(f"{where} names a missing heading")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in links(README)}
    orphans = [str(page.relative_to(REPO)) for page in PAGES[1:] if page.resolve() not in linked]
    assert not orphans, f"docs pages no README link reaches: {orphans}"


def test_documented_commands_use_real_flags(flags_by_script):
    unknown = [f"{page}: {script} {flag}"
               for page, script, flags in script_invocations()
               for flag in sorted(flags - flags_by_script[script])]
    assert not unknown, "flags the scripts do not accept:\n" + "\n".join(unknown)


def test_flags_named_in_the_text_exist(flags_by_script):
    every_flag = set().union(*flags_by_script.values()) | OTHER_TOOLS_FLAGS
    unknown = []
    for page in PAGES:
        for code in INLINE_CODE.findall(prose(page.read_text())):
            unknown += [f"{page.relative_to(REPO)}: {flag}" for flag in FLAG.findall(code)
                        if flag not in every_flag]
    assert not unknown, "flags no script accepts:\n" + "\n".join(unknown)


def test_the_placeholders_for_the_rerun_results_are_in_place():
    readme = README.read_text()
    assert "<!-- QUICKSTART TABLE -->" in readme
    assert "<!-- RESULTS TABLE -->" in readme
    assert "<!-- FULL RESULTS -->" in (REPO / "docs" / "results.md").read_text()


def test_the_link_checker_catches_broken_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) `[not a link](nowhere.md)`\n"
                    "```\n[in a block](nowhere.md)\n```\n")
    assert links(page) == ["#title", "missing.md"]
    assert github_anchor("Offline teacher: `--teacher-cache`") == "offline-teacher---teacher-cache"
