"""minillm.tokenizer: round trips, hand-computed merges, special tokens, files, bad input, and
agreement with Hugging Face `tokenizers` (the same merges, the same ids once exported)."""

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from minillm.data import load_text
from minillm.errors import InputError, InputTypeError
from minillm.tokenizer import (
    ENDOFTEXT,
    BPETokenizer,
    CharTokenizer,
    bytes_to_unicode,
    hf_byte_merges,
    learn_merges,
    load,
    pretokenize,
    train_hf_bpe,
)

MIXED_TEXT = "Hello wörld, naïve café! 你好世界 🙂👍🏽\n\n  tabs\tand 42<|endoftext|>KING: 'tis"
TRAIN_LIMIT_S = 30.0
_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _hf_bytes(token: str) -> bytes:
    """The bytes of a token as `tokenizers` writes it (one GPT-2 character per byte)."""
    return bytes(_TO_BYTE[c] for c in token)


def _file(**fields) -> str:
    return json.dumps({"format": "minillm-tokenizer", "version": 1, **fields})


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return load_text("tinyshakespeare", progress=False)


@pytest.fixture(scope="module")
def trained(shakespeare) -> tuple[BPETokenizer, float]:
    """Ours on all of tiny Shakespeare to 512 tokens, and how long training took."""
    start = time.perf_counter()
    tok = BPETokenizer.train(shakespeare, 512)
    return tok, time.perf_counter() - start


@pytest.fixture(scope="module")
def small_bpe(shakespeare) -> BPETokenizer:
    return BPETokenizer.train(shakespeare[:50_000], 300)


def test_pretokenize_splits_like_gpt2_and_like_tokenizers():
    assert pretokenize("Hello world's 42!!  x\n") == [
        "Hello",
        " world",
        "'s",
        " 42",
        "!!",
        " ",
        " x",
        "\n",
    ]
    hf_split = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(MIXED_TEXT)
    hf_pieces = [_hf_bytes(piece).decode() for piece, _ in hf_split]
    assert pretokenize(MIXED_TEXT) == hf_pieces
    assert "".join(pretokenize(MIXED_TEXT)) == MIXED_TEXT


def test_bytes_to_unicode_is_gpt2s_byte_alphabet():
    table = bytes_to_unicode()
    assert sorted(table.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    assert (table[ord(" ")], table[ord("\n")], table[ord("a")]) == ("Ġ", "Ċ", "a")


def test_char_tokenizer_round_trip_and_vocabulary():
    tok = CharTokenizer.train("hello world")
    assert tok.chars == [" ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.decode(tok.encode("low world")) == "low world"
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_char_tokenizer_names_an_unknown_character():
    with pytest.raises(InputError, match=r"'z' at position 2 is not in the vocabulary"):
        CharTokenizer.train("hello").encode("hoz")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(), st.just(ENDOFTEXT), st.just("<|endoftext"))).map("".join))
def test_bpe_round_trips_any_text(small_bpe, text):
    """Any valid Unicode (hypothesis draws every plane, combining marks, controls, emoji), with or
    without special tokens in it, decodes back to itself."""
    assert small_bpe.decode(small_bpe.encode(text)) == text
    assert small_bpe.decode(small_bpe.encode(text, allow_special=False)) == text


def test_bpe_learns_the_hand_computed_merges():
    """'aaabdaaabac': aa occurs 4 times (overlaps count); then 'ab' and 'Za' tie at 2 and 'ab'
    wins (97 ranks before the new token 256); then 'Z' + 'ab' occurs twice."""
    merges = learn_merges({b"aaabdaaabac": 1}, 3)
    assert [(m.pair, m.token, m.count) for m in merges] == [
        ((97, 97), 256, 4),
        ((97, 98), 257, 2),
        ((256, 257), 258, 2),
    ]
    tok = BPETokenizer.train("aaabdaaabac", 260)
    assert tok.merges == [(97, 97), (97, 98), (256, 257)]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.vocab_size == 260 and tok.special_tokens == {ENDOFTEXT: 259}


def test_merges_never_cross_pieces_and_training_stops_when_no_pair_is_left():
    """'ab ab ab' is the pieces 'ab' and ' ab' (twice): 'ab' (3) then ' ab' (2); 'b a' is never
    counted, and after two merges every piece is one token."""
    tok = BPETokenizer.train("ab ab ab", 300)
    assert tok.byte_merges() == [(b"a", b"b"), (b" ", b"ab")]
    assert tok.vocab_size == 256 + 2 + 1


def test_ties_follow_gpt2_token_order_like_tokenizers():
    """In ' a bc' every pair occurs once. By byte value (32, 97) would come first; in GPT-2's
    order the space byte ranks after all printable bytes, so 'bc' comes first, as in tokenizers."""
    text = " a bc"
    tok = BPETokenizer.train(text, 260)
    assert tok.byte_merges() == [(b"b", b"c"), (b" ", b"a"), (b" ", b"bc")]
    assert hf_byte_merges(train_hf_bpe(text, 260)) == tok.byte_merges()


def test_encode_applies_merges_in_learned_order_not_longest_match():
    """Merges bc, ab, abc: in 'abc' the pair (b, c) was learned first, so the result is a + bc;
    a longest-match tokenizer would wrongly return the single token 'abc'."""
    tok = BPETokenizer([(98, 99), (97, 98), (257, 99)])
    assert tok.encode("abc") == [97, 256]
    assert tok.encode("abd") == [257, 100]
    assert tok.to_hf_tokenizer().encode("abc").ids == [97, 256]


def test_special_tokens_are_single_ids_unless_disallowed(small_bpe):
    eot = small_bpe.special_tokens[ENDOFTEXT]
    assert eot == small_bpe.vocab_size - 1
    ids = small_bpe.encode(f"the end{ENDOFTEXT}The")
    assert ids.count(eot) == 1 and small_bpe.decode(ids[ids.index(eot) :]) == f"{ENDOFTEXT}The"
    plain = small_bpe.encode(f"the end{ENDOFTEXT}The", allow_special=False)
    assert eot not in plain and len(plain) > len(ids)


def test_training_leaves_special_tokens_out_of_the_counts():
    """Training on documents joined by <|endoftext|> learns what it learns with a newline there
    instead (a lone newline piece adds no pairs): the special token's characters are not text."""
    docs = ["The king is dead.", "Long live the king!", "O Romeo, Romeo!"] * 20
    with_eot = BPETokenizer.train(ENDOFTEXT.join(docs), 320)
    with_newline = BPETokenizer.train("\n".join(docs), 320)
    assert with_eot.merges == with_newline.merges
    assert not any(b"|" in a + b for a, b in with_eot.byte_merges())


def test_save_and_load_round_trip(tmp_path, small_bpe):
    char = CharTokenizer.train("to be or not to be")
    for tok in (small_bpe, char):
        path = tok.save(tmp_path / f"{tok.kind}.json")
        doc = json.loads(path.read_text(encoding="utf-8"))
        assert (doc["format"], doc["version"], doc["type"]) == ("minillm-tokenizer", 1, tok.kind)
        back = load(path)
        assert type(back) is type(tok) and back.fingerprint == tok.fingerprint
        assert back.vocab_size == tok.vocab_size
        assert back.encode("not to be") == tok.encode("not to be")
    assert load(tmp_path / "bpe.json").special_tokens == small_bpe.special_tokens


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "something-else"}', "not a tokenizer file"),
        (_file(type="bpe", version=99), "version 99"),
        (_file(type="wordpiece"), "unknown tokenizer type"),
        (_file(type="bpe", merges=[[300, 1]]), r"corrupt.*merge 0 is \[300, 1\]"),
        (_file(type="bpe", merges=[[97, 98], [97, 98]]), "makes b'ab' again"),
        (_file(type="bpe", merges={}), "must be lists"),
        (_file(type="char", chars=["ab"]), "single character"),
    ],
)
def test_a_corrupt_file_gives_a_clear_error(tmp_path, content, message):
    path = tmp_path / "tok.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        load(path)


def test_loading_a_missing_file_says_so(tmp_path):
    with pytest.raises(InputError, match="no tokenizer file"):
        load(tmp_path / "missing.json")


def test_training_on_all_of_tiny_shakespeare_is_fast(trained):
    tok, seconds = trained
    assert tok.vocab_size == 512
    assert seconds < TRAIN_LIMIT_S


def test_same_merges_and_encodings_as_tokenizers_on_tiny_shakespeare(trained, shakespeare):
    """Same text, vocabulary size, pre-tokenisation and tie rule: the merge lists are identical,
    so every text gets the same tokens (the ids differ: tokenizers puts special tokens first)."""
    ours, _ = trained
    hf = train_hf_bpe(shakespeare, 512)
    assert hf.get_vocab_size() == ours.vocab_size
    assert ours.byte_merges() == hf_byte_merges(hf)
    sample = shakespeare[-20_000:] + MIXED_TEXT
    hf_tokens = [t.encode() if t == ENDOFTEXT else _hf_bytes(t) for t in hf.encode(sample).tokens]
    assert [ours.token_bytes(i) for i in ours.encode(sample)] == hf_tokens


def test_hf_export_encodes_and_decodes_identically(trained, shakespeare, tmp_path):
    ours, _ = trained
    text = shakespeare[:5_000] + MIXED_TEXT
    hf = ours.to_hf_tokenizer()
    assert hf.get_vocab_size() == ours.vocab_size
    assert hf.encode(text).ids == ours.encode(text)
    assert hf.decode(ours.encode(text), skip_special_tokens=False) == text

    folder = ours.save_pretrained(tmp_path / "tokenizer")
    loaded = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert loaded.encode(text) == ours.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    assert loaded.eos_token_id == ours.special_tokens[ENDOFTEXT]


def test_bad_input_gives_clear_errors(small_bpe):
    with pytest.raises(InputTypeError, match="text must be a str, got int"):
        small_bpe.encode(123)
    with pytest.raises(InputError, match=r"ids\[1\] = 300 is not a token id; ids run from 0 to"):
        small_bpe.decode([5, 300])
    with pytest.raises(InputError, match="is not a token id"):
        small_bpe.decode([-1])
    with pytest.raises(InputTypeError, match="must be an int, got float"):
        small_bpe.decode([1.0])
    with pytest.raises(InputTypeError, match="sequence of ints, got str"):
        small_bpe.decode("abc")
    with pytest.raises(InputError, match=r"lone surrogate U\+D800 at position 3"):
        small_bpe.encode("ok \ud800")
    with pytest.raises(InputTypeError, match="text must be a str"):
        BPETokenizer.train(b"bytes", 300)
    with pytest.raises(InputError, match=r"at least 256 .* \+ 1 special token\(s\) = 257, got 256"):
        BPETokenizer.train("hello", 256)
    with pytest.raises(InputError, match="vocab_size must be > 0"):
        BPETokenizer.train("hello", -5)
    with pytest.raises(InputTypeError, match="got the str"):
        BPETokenizer.train("hello", 300, special_tokens=ENDOFTEXT)


def test_decode_accepts_arrays_and_tensors(small_bpe):
    import numpy as np
    import torch

    ids = small_bpe.encode("to be, or not to be")
    assert small_bpe.decode(np.array(ids, dtype=np.uint16)) == "to be, or not to be"
    assert small_bpe.decode(torch.tensor(ids)) == "to be, or not to be"
