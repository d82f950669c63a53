"""Tokenizer round trips: save -> load keeps every id, and transformers reads the same tokenizer."""

from __future__ import annotations

import pytest

from commonlm.data.tokenizer import EOT, Tokenizer
from commonlm.errors import UserError


@pytest.fixture(params=["bpe", "byte"])
def tok_dir(request, bpe_dir, byte_dir):
    return bpe_dir if request.param == "bpe" else byte_dir


def test_save_load_gives_identical_ids(tok_dir, samples, tmp_path):
    tok = Tokenizer.load(tok_dir)
    tok.save(tmp_path / "again")
    again = Tokenizer.load(tmp_path / "again")
    assert again.hash == tok.hash
    for text in samples:
        assert again.encode(text) == tok.encode(text)
    assert again.encode_batch(samples) == tok.encode_batch(samples)


def test_decode_inverts_encode(tok_dir, samples):
    tok = Tokenizer.load(tok_dir)
    for text, ids in zip(samples, tok.encode_batch(samples)):
        assert tok.decode(ids) == text


def test_literal_special_token_is_plain_text_in_corpus_encoding(tok_dir):
    tok = Tokenizer.load(tok_dir)
    text = f"a {EOT} b"
    [corpus_ids] = tok.encode_batch([text])
    assert tok.eot_id not in corpus_ids
    assert tok.decode(corpus_ids) == text
    assert tok.eot_id in tok.encode(text, allow_special=True)  # prompts may use special tokens


def test_byte_tokenizer_maps_bytes_to_ids(byte_dir, samples):
    tok = Tokenizer.load(byte_dir)
    assert tok.kind == "byte"
    for text in samples:
        assert tok.encode_batch([text])[0] == list(text.encode("utf-8"))
    assert tok.eot_id == 256


def test_bpe_compresses_code(bpe_dir):
    tok = Tokenizer.load(bpe_dir)
    text = "def f(x):\n    return x\n"
    assert tok.kind == "bpe"
    assert tok.vocab_size == 600
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2


def test_autotokenizer_gives_the_same_ids(tok_dir, samples):
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.load(tok_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    for text in samples:
        assert hf.encode(text, add_special_tokens=False, split_special_tokens=True) == tok.encode(text), repr(text)
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text, allow_special=True), repr(text)
        assert hf.decode(tok.encode(text)) == text
    assert hf.eos_token_id == tok.eot_id
    assert hf.pad_token_id == tok.pad_id


def test_load_missing_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
