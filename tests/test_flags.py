"""One name, one meaning: a flag that several scripts take has one help text in all of them, and
the hidden old spellings (RENAMED_FLAGS, REMOVED_FLAGS) are taken but never shown in --help.

Each script's parser is built from the argument groups its main() parses (its ARGUMENT_GROUPS),
by the same function parse_args uses, so what is checked here is what `SCRIPT.py --help` prints.
"""

import argparse
import importlib
import json
from collections import defaultdict

import pytest

from common.args import SHARED_HELP, make_parser, parse_args
from common.errors import UserError

SCRIPTS = ("token_level", "sequence_level", "on_policy", "cross_tokenizer", "eval")


def argument_groups(script):
    return importlib.import_module(script).ARGUMENT_GROUPS


def shown_help(parser):
    """{--flag: help text} of every flag --help shows, in its dashed spelling."""
    return {option.replace("_", "-"): action.help for action in parser._actions
            if action.help is not argparse.SUPPRESS
            for option in action.option_strings if option.startswith("--")}


@pytest.fixture(scope="module")
def help_by_flag():
    """{--flag: {script: help text}} over every script's parser."""
    helps = defaultdict(dict)
    for script in SCRIPTS:
        for flag, text in shown_help(make_parser(argument_groups(script))).items():
            helps[flag][script] = text
    return helps


def test_a_flag_several_scripts_take_has_one_help_text(help_by_flag):
    differing = {flag: by_script for flag, by_script in help_by_flag.items()
                 if len(set(by_script.values())) > 1}
    report = "\n".join(f"{flag}:\n" + "\n".join(f"  {script}: {text}"
                                                for script, text in by_script.items())
                       for flag, by_script in sorted(differing.items()))
    assert not differing, f"flags whose help differs between scripts:\n{report}"


def test_each_shared_help_text_is_used_under_its_own_name_by_several_scripts(help_by_flag):
    """A SHARED_HELP text describes the flag of its key; a text only one script uses belongs in
    that script's dataclass."""
    for name, text in SHARED_HELP.items():
        flag = "--" + name.replace("_", "-")
        users = {script for script, shown in help_by_flag[flag].items() if shown == text}
        assert len(users) >= 2, f"{flag}: SHARED_HELP text used by {sorted(users) or 'no script'}"
        elsewhere = [other for other, by_script in help_by_flag.items()
                     if other != flag and text in by_script.values()]
        assert not elsewhere, f"SHARED_HELP[{name!r}] is the help of {elsewhere}"


def old_spellings(groups):
    """(old --flag, kind) of every hidden spelling the groups keep."""
    for group in groups:
        for kind in ("RENAMED_FLAGS", "REMOVED_FLAGS"):
            for old in getattr(group, kind, {}):
                yield "--" + old.replace("_", "-"), kind


@pytest.mark.parametrize("script", SCRIPTS)
def test_old_spellings_are_taken_but_not_shown_in_help(script):
    parser = make_parser(argument_groups(script))
    help_text = parser.format_help()
    for flag, kind in old_spellings(argument_groups(script)):
        assert flag in parser._option_string_actions, (script, flag)
        assert flag not in help_text and flag not in shown_help(parser), (script, kind, flag)
    if script in ("token_level", "cross_tokenizer"):
        assert list(old_spellings(argument_groups(script)))  # the loop above checked something


@pytest.mark.parametrize("how", ["command line", "config key", "flag alone"])
def test_the_removed_distill_weight_is_refused_with_the_conversion(tmp_path, how):
    """--alpha A --distill-weight W (alpha*CE + W*ULD) is --alpha A/(A+W) now; a run that still
    passes --distill-weight stops before anything is loaded instead of training another loss."""
    import cross_tokenizer

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("alpha: 1\ndistill_weight: 3\n")
    argv = {"command line": ["--alpha", "1", "--distill-weight", "3"],
            "config key": ["--config", str(recipe)],
            "flag alone": ["--distill-weight"]}[how]
    with pytest.raises(UserError) as error:
        parse_args(cross_tokenizer.ARGUMENT_GROUPS, ["--output-dir", str(tmp_path), *argv])
    message = str(error.value)
    assert message.startswith("--distill-weight was removed: --alpha is now the cross-entropy "
                              "weight in [0, 1]") and "A/(A+W)" in message and "\n" not in message


def test_an_unset_cache_top_k_means_the_same_in_on_policy_and_token_level(tmp_path):
    """Unset: the K of the cache already there, else 32. on_policy.py defaulted to 32, so a
    cache token_level.py built with another K was refused there for a flag nobody passed."""
    from common import teacher_cache
    from on_policy import OnPolicyArguments
    from token_level import TokenLevelArguments

    assert OnPolicyArguments().cache_top_k is None and TokenLevelArguments().cache_top_k is None
    assert teacher_cache.top_k_to_keep(None, tmp_path / "new") == 32
    (tmp_path / "meta.json").write_text(json.dumps(
        {"identity": {"format": teacher_cache.FORMAT_VERSION, "top_k": 16}}))
    assert teacher_cache.top_k_to_keep(None, tmp_path) == 16
    assert teacher_cache.top_k_to_keep(8, tmp_path) == 8  # given: checked against the cache later
