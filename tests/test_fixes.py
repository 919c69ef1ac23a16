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
