"""--config FILE.yaml for every script, and run_config.json back into such a file."""

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from common.args import (DataArguments, ModelArguments, TrainingArguments, parse_args,
                         recipe_yaml)
from common.errors import UserError
from conftest import REPO, run_script

GROUPS = (ModelArguments, DataArguments, TrainingArguments)


def settings(run_dir):
    """run_config.json without "command": the command line is the one thing that must differ
    (`--config recipe.yaml` against the flags it stands for); there are no timestamps in it."""
    run_config = json.loads((run_dir / "run_config.json").read_text())
    return {key: value for key, value in run_config.items() if key != "command"}


@pytest.mark.slow
def test_a_yaml_config_run_equals_the_command_line_and_run_config_round_trips(tiny, tmp_path):
    out = tmp_path / "out"
    flags = ["--teacher", tiny / "teacher", "--student", tiny / "student", "--dataset",
             tiny / "train.jsonl", "--output-dir", out, "--max-steps", "3", "--batch-size", "4",
             "--learning-rate", "1e-3", "--kl", "reverse", "--log-steps", "1"]
    run_script("token_level.py", *flags)
    from_flags, weights = settings(out), load_file(out / "model.safetensors")
    shutil.rmtree(out)

    # The same settings as a file: dashed and underscored keys, YAML's own types.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"teacher: {tiny / 'teacher'}\nstudent: {tiny / 'student'}\n"
                      f"dataset: {tiny / 'train.jsonl'}\noutput-dir: {out}\nmax_steps: 3\n"
                      f"batch_size: 4\nlearning-rate: 1e-3\nkl: reverse\nlog_steps: 1\n"
                      f"eval_dataset: null\n")
    run_script("token_level.py", "--config", recipe)
    assert settings(out) == from_flags
    assert json.loads((out / "run_config.json").read_text())["command"].endswith(
        f"--config {recipe}")
    reproduced = load_file(out / "model.safetensors")
    assert all((reproduced[name] == weights[name]).all() for name in weights)

    # run_config.json -> YAML -> the same run again
    done = subprocess.run([sys.executable, "-m", "common.args", str(out / "run_config.json")],
                          cwd=REPO, capture_output=True, text=True, check=True)
    (tmp_path / "again.yaml").write_text(done.stdout)
    shutil.rmtree(out)
    run_script("token_level.py", "--config", tmp_path / "again.yaml")
    assert settings(out) == from_flags


def test_command_line_flags_override_the_file(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_dir: from_file\nmax_steps: 7\nlearning_rate: 1e-4\n"
                      "resume: true\ndataset: '-odd-name.jsonl'\n")
    model_args, data_args, train_args = parse_args(
        GROUPS, ["--max-steps", "9", "--config", str(recipe), "--resume", "false"])
    assert train_args.max_steps == 9 and train_args.resume is False  # the command line wins
    assert train_args.learning_rate == 1e-4 and train_args.output_dir == "from_file"
    assert data_args.dataset == "-odd-name.jsonl"  # a value that looks like a flag stays a value
    # values from the file are checked like typed ones
    recipe.write_text("output_dir: o\nlr_scheduler: cosinus\n")
    with pytest.raises(UserError, match="invalid choice: 'cosinus'"):
        parse_args(GROUPS, ["--config", str(recipe)])
    recipe.write_text("output_dir: o\nmax_steps: 0\n")
    with pytest.raises(UserError, match="--max-steps must be positive"):
        parse_args(GROUPS, ["--config", str(recipe)])


def test_eval_takes_a_config_too(tmp_path):
    import eval as eval_script

    recipe = tmp_path / "eval.yaml"
    recipe.write_text("models: [runs/a, runs/b]\nnames: [a, b]\ndataset: test.jsonl\n"
                      "max_new_tokens: 12\n")
    eval_args, data_args = parse_args((eval_script.EvalArguments, eval_script.EvalDataArguments),
                                      ["--config", str(recipe), "--models", "runs/c", "--names",
                                       "c"])
    assert eval_args.models == ["runs/c"] and eval_args.names == ["c"]  # a list is replaced
    assert eval_args.max_new_tokens == 12 and data_args.dataset == "test.jsonl"


@pytest.mark.parametrize("text, message", [
    ("learnig_rate: 1e-4\n", "unknown key 'learnig_rate' in --config {path}; did you mean "
                             "learning_rate?"),
    ("learnig-rate: 1e-4\n", "did you mean learning-rate?"),
    ("max_steps: [1, 2]\n", "key 'max_steps' in --config {path} takes one value, not a list"),
    ("max_steps: 1\n  oops: [\n", "--config {path} is not valid YAML (line 2"),
    ("- max_steps\n", "must be a mapping of flag names to values"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as error:
        parse_args(GROUPS, ["--output-dir", "o", "--config", str(path)])
    assert message.format(path=path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_a_bad_key_from_the_command_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("teacher: t\nlearnig_rate: 1e-4\n")
    done = subprocess.run([sys.executable, "token_level.py", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: unknown key 'learnig_rate' in --config {path}; did you mean learning_rate? "
        f"(keys are the flag names, see --help)"]
    done = subprocess.run([sys.executable, "token_level.py", "--config", str(tmp_path / "no")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.stderr.strip().splitlines() == [
        f"error: --config {tmp_path / 'no'} does not exist; pass a YAML file of flag names and "
        f"values"]


def test_recipe_leaves_out_credentials_and_the_run_state():
    record = {"method": "sequence_level", "command": "sequence_level.py --teacher-api-base x",
              "versions": {"torch": "2"},
              "training": {"output_dir": "runs/seq", "resume": True, "overwrite": False,
                           "allow_changed_settings": "max-steps", "max_steps": 5},
              "sequence_level": {"teacher_api_base": "https://***@api.example/v1?key=***",
                                 "teacher_api_model": "m", "api_key_env": "MY_KEY"}}
    text = recipe_yaml(record, "runs/seq/run_config.json")
    assert "python sequence_level.py --config" in text
    lines = text.splitlines()
    assert "max_steps: 5" in lines and "output_dir: runs/seq" in lines
    assert not any(line.startswith(("resume", "overwrite", "allow_changed")) for line in lines)
    api = [line for line in lines if "teacher_api_base" in line]
    assert api[0].startswith("# teacher_api_base:") and "put them back" in api[0]
    assert "api_key_env: MY_KEY" in lines and "versions" not in text and "--teacher-api" not in text
    with pytest.raises(UserError, match="neither a run_config.json"):
        recipe_yaml({"a": 1}, "x.json")


def script_options():
    """(script, its method's dataclass) of every script that renamed --temperature, and the field
    the old spelling now sets there."""
    from cross_tokenizer import CrossTokenizerArguments
    from on_policy import OnPolicyArguments
    from sequence_level import SequenceLevelArguments
    from token_level import TokenLevelArguments

    return [(TokenLevelArguments, "loss_temperature", "--loss-temperature"),
            (OnPolicyArguments, "sampling_temperature", "--sampling-temperature"),
            (CrossTokenizerArguments, "loss_temperature", "--loss-temperature"),
            (SequenceLevelArguments, "sampling_temperature", "--sampling-temperature")]


@pytest.mark.parametrize("index", range(4))
def test_the_old_temperature_flag_sets_the_renamed_field_with_a_warning(tmp_path, capsys, index):
    options_class, field, new_flag = script_options()[index]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("temperature: 0.5\n")
    for argv in (["--temperature", "2"], ["--temperature=2"], ["--config", recipe]):
        parsed = parse_args([TrainingArguments, options_class], ["--output-dir", tmp_path, *argv])
        assert getattr(parsed[1], field) == (0.5 if "--config" in argv else 2.0)
        assert not hasattr(parsed[1], "temperature")
        warnings = capsys.readouterr().err.strip().splitlines()
        assert len(warnings) == 1 and warnings[0].startswith("warning: --temperature is "
                                                             "deprecated"), warnings
        assert f"use {new_flag}" in warnings[0]
    # The command line overrides the file's old key; the new spelling alone warns of nothing.
    parsed = parse_args([TrainingArguments, options_class],
                        ["--output-dir", tmp_path, "--config", recipe, new_flag, "3"])
    assert getattr(parsed[1], field) == 3.0
    capsys.readouterr()
    parsed = parse_args([TrainingArguments, options_class],
                        ["--output-dir", tmp_path, new_flag, "3"])
    assert getattr(parsed[1], field) == 3.0
    assert "warning" not in capsys.readouterr().err
    # The old spelling is checked as the new field is (and named by its new flag).
    with pytest.raises(UserError, match=f"{new_flag} must be"):
        parse_args([TrainingArguments, options_class],
                   ["--output-dir", tmp_path, "--temperature", "inf"])


@pytest.mark.parametrize("index", range(4))
def test_help_shows_the_new_temperature_flag_only(capsys, index):
    options_class, field, new_flag = script_options()[index]
    with pytest.raises(SystemExit):
        parse_args([TrainingArguments, options_class], ["--help"])
    shown = capsys.readouterr().out
    assert new_flag in shown and "--temperature" not in shown


def test_a_misspelled_flag_is_pointed_to_the_new_name_not_the_hidden_one(tmp_path):
    from token_level import TokenLevelArguments

    with pytest.raises(UserError, match="did you mean --loss-temperature"):
        parse_args([TrainingArguments, TokenLevelArguments],
                   ["--output-dir", tmp_path, "--temperatur", "2"])
