"""Regression tests for reported bugs that have no better home."""

import pytest

from examples.tiny_setup import build_sentencepiece_tokenizer, toy_conversations


def test_tiny_sentencepiece_tokenizer_keeps_non_ascii_text_when_decoding():
    """Byte-fallback <0x..> tokens are vocabulary, not special tokens: skipping specials on
    decode must not drop the bytes of "é" or "日本" (they are not in the toy vocabulary)."""
    tokenizer = build_sentencepiece_tokenizer(toy_conversations(16))
    text = "héllo 日本"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "<0xE6>" in tokenizer.convert_ids_to_tokens(ids)  # the test goes through byte fallback
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert "<0xE6>" not in tokenizer.all_special_tokens


def test_padless_student_tokenizer_is_exported_without_the_borrowed_pad(tmp_path):
    """Training pads with EOS when the student has no pad token; the exported tokenizer must
    still be the user's own (pad None), or every tool reloading it sees a different tokenizer."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from common.checkpoint import export_student
    from common.models import load_tokenizer
    from examples.tiny_setup import build_bpe_tokenizer, build_model

    padless = build_bpe_tokenizer(toy_conversations(16))
    padless.pad_token = None
    padless.save_pretrained(tmp_path / "student")
    tokenizer = load_tokenizer(str(tmp_path / "student"))
    assert tokenizer.pad_token == tokenizer.eos_token  # batches can still be padded
    model = build_model(tokenizer, hidden_size=32, num_layers=1)
    out = tmp_path / "out"
    out.mkdir()
    export_student(Accelerator(cpu=True), model, tokenizer, out, {"finished": True})
    exported = AutoTokenizer.from_pretrained(out)
    assert exported.pad_token is None
    assert exported.get_vocab() == padless.get_vocab()
    assert tokenizer.pad_token == tokenizer.eos_token  # the in-memory one is left as it was


@pytest.mark.parametrize("rank, expected", [(None, "error: bad flag\n"), ("0", "error: bad flag\n"),
                                            ("3", "error: [rank 3] bad flag\n")])
def test_user_error_names_the_rank_that_raised_it(monkeypatch, capsys, rank, expected):
    """Under torchrun every process that fails prints its error; ranks > 0 say who they are, so
    copies are recognisable and an error raised on one rank only is never hidden."""
    from common.errors import UserError, run_cli

    def main():
        raise UserError("bad flag")

    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    if rank is not None:
        monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == expected

    def interrupted():
        raise KeyboardInterrupt  # Ctrl-C hits every process at once: only rank 0 says so

    with pytest.raises(SystemExit) as exit_info:
        run_cli(interrupted)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == ("" if rank == "3" else "interrupted\n")


def test_misspelled_flag_names_the_closest_one():
    from common.args import DataArguments, ModelArguments, TrainingArguments, parse_args
    from common.errors import UserError

    groups = (ModelArguments, DataArguments, TrainingArguments)
    cases = [(["--output-dir", "o", "--learnig-rate", "1e-3"],
              "unknown flag --learnig-rate; did you mean --learning-rate? (see --help)"),
             (["--output-dir", "o", "--max_stpes=3"],
              "unknown flag --max_stpes; did you mean --max-steps? (see --help)"),
             (["--output-dir", "o", "--zzzzzz"], "unknown flag --zzzzzz (see --help)"),
             (["--output-dir", "o", "--max-steps", "3", "4"],
              "unexpected argument '4': every value follows its flag (see --help)"),
             # the typo is named even when another value is bad too
             (["--max-steps", "0", "--learnig-rate", "1e-3"], "did you mean --learning-rate?"),
             # a prefix is a typo too, not a silent abbreviation
             (["--output-dir", "o", "--max-step", "3"],
              "unknown flag --max-step; did you mean --max-steps? (see --help)")]
    for argv, expected in cases:
        with pytest.raises(UserError) as error:
            parse_args(groups, argv)
        assert expected in str(error.value)


@pytest.mark.parametrize("flag, value", [("--learning-rate", "inf"), ("--learning-rate", "nan"),
                                         ("--weight-decay", "inf"), ("--weight-decay", "-0.1"),
                                         ("--num-epochs", "inf")])
def test_optimizer_values_must_be_finite(flag, value):
    from common.args import TrainingArguments, parse_args
    from common.errors import UserError

    with pytest.raises(UserError, match=f"{flag} must be"):
        parse_args((TrainingArguments,), ["--output-dir", "o", flag, value])


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0", "-1"])
def test_temperatures_must_be_finite_and_positive(value):
    """A temperature of inf gave NaN losses for a whole run (and a saved, untrained student)."""
    from cross_tokenizer import CrossTokenizerArguments
    from common.errors import UserError
    from on_policy import OnPolicyArguments
    from sequence_level import SequenceLevelArguments
    from token_level import TokenLevelArguments

    temperature = float(value)
    options = [(TokenLevelArguments, "loss_temperature"),
               (OnPolicyArguments, "sampling_temperature"),
               (OnPolicyArguments, "loss_temperature"),
               (CrossTokenizerArguments, "loss_temperature"),
               (SequenceLevelArguments, "sampling_temperature")]  # 0 = greedy there
    for options_class, name in options:
        if options_class is SequenceLevelArguments and temperature == 0:
            options_class(**{name: temperature})
            continue
        flag = "--" + name.replace("_", "-")
        with pytest.raises(UserError, match=f"{flag} must be >=? ?0 and finite"):
            options_class(**{name: temperature})
    for options_class in (CrossTokenizerArguments, TokenLevelArguments):  # NaN fails no <=
        for alpha in (float("inf"), float("nan"), -0.5, 1.5):
            with pytest.raises(UserError, match=r"--alpha must be in \[0, 1\]"):
                options_class(alpha=alpha)


def test_float16_student_on_a_machine_without_a_gpu_is_refused(monkeypatch):
    """A float16 student on CPU trained to NaN within two steps (AdamW's eps is 0 in float16)."""
    import torch

    from common.args import ModelArguments
    from common.errors import UserError

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    for options in ({"dtype": "float16"}, {"student_dtype": "float16"}):
        with pytest.raises(UserError, match="use --dtype float32"):
            ModelArguments(**options)
    ModelArguments(dtype="float16", student_dtype="float32")  # a float16 teacher only infers
    ModelArguments(dtype="bfloat16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ModelArguments(dtype="float16")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # `accelerate launch --cpu` on a GPU box
    with pytest.raises(UserError):
        ModelArguments(dtype="float16")


def test_max_length_beyond_the_model_context_warns_once(tiny, monkeypatch, capsys):
    from transformers import AutoTokenizer

    import common.chat as chat

    monkeypatch.setattr(chat, "_CONTEXT_WARNINGS", set())
    monkeypatch.delenv("RANK", raising=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny / "student")  # max_position_embeddings 1024
    chat.ChatEncoder(tokenizer, 1024)
    assert capsys.readouterr().err == ""
    for _ in range(2):  # training and held-out data each make an encoder: one warning
        chat.ChatEncoder(tokenizer, 4096)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and err.count("\n") == 1
    assert "--max-length 4096 is beyond the 1024-token context" in err
    assert "lower --max-length to 1024" in err
