"""Regression tests for reported bugs that have no better home."""

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
