"""Graded tests for chapter 02 (tokenization): `minillm grade ch02`.

References are hand-computed cases and the library: `minillm.tokenizer` (the same BPE, trained
and applied with its own code) and `minillm.data`. Token ids are compared exactly; the
compression ratio to 1e-12.
"""

import random
from collections import Counter

import numpy as np
import pytest
import torch

from minillm import data
from minillm.tokenizer import BPETokenizer, learn_merges, pretokenize

# What each exercise must not call: the library function it asks you to write (a call fails
# the test). A guard against the obvious shortcut; the stubs' docstrings name the same.
OFF_LIMITS = {
    "merge_pair": ("minillm.tokenizer._merge",),
    "train_bpe": (
        "minillm.tokenizer.learn_merges",
        "minillm.tokenizer.BPETokenizer.train",
        "minillm.tokenizer.train_hf_bpe",
    ),
    "encode": ("minillm.tokenizer.BPETokenizer.encode",),
    "decode": ("minillm.tokenizer.BPETokenizer.decode",),
    "train_val_split": ("minillm.data.train_val_split",),
}

CHAPTER = "ch02_tokenization"
SAMPLE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n"
)


def random_ids(n: int, alphabet: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(alphabet) for _ in range(n)]


@pytest.mark.points(1)
def test_count_pairs_counts_every_position(impl):
    """Catches stepping two positions at a time (pairs (0,1), (2,3), ... only), which misses
    overlapping pairs such as the second (7, 7) in [7, 7, 7]."""
    ex = impl(CHAPTER)
    assert ex.count_pairs([7, 7, 7]) == {(7, 7): 2}
    assert ex.count_pairs([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert ex.count_pairs([5]) == {} and ex.count_pairs([]) == {}
    for seed in range(3):
        ids = random_ids(500, 6, seed)
        assert ex.count_pairs(ids) == Counter(zip(ids, ids[1:], strict=False))


@pytest.mark.points(2)
def test_merge_pair_scans_left_to_right_and_uses_each_occurrence_once(impl):
    """Catches merging overlapping occurrences twice ([7, 7, 7] -> [N, N]), merging from the
    right ([7, N]), and dropping or duplicating the last id. Reference: str.replace, which also
    scans left to right without overlaps."""
    ex = impl(CHAPTER)
    assert ex.merge_pair([7, 7, 7], (7, 7), 300) == [300, 7]
    assert ex.merge_pair([7, 7, 7, 7], (7, 7), 300) == [300, 300]
    assert ex.merge_pair([1, 2, 3, 1, 2], (1, 2), 99) == [99, 3, 99]
    assert ex.merge_pair([1, 2, 1], (2, 1), 99) == [1, 99]
    assert ex.merge_pair([3, 4], (1, 2), 99) == [3, 4]
    assert ex.merge_pair([], (1, 2), 99) == []
    for seed in range(5):
        ids = random_ids(300, 3, seed)
        as_text = "".join(map(chr, ids)).replace(chr(0) + chr(1), chr(99))
        assert ex.merge_pair(ids, (0, 1), 99) == [ord(c) for c in as_text]


@pytest.mark.points(3)
def test_train_bpe_learns_the_same_merges_as_the_library(impl):
    """Catches breaking ties by first occurrence instead of by the smallest pair (the hand case
    'aaabdaaabac' has a tie at its second merge), counting without overlaps, not recounting after
    a merge, and numbering new tokens from anything but 256. Reference: `learn_merges` on the
    whole text as one piece; for printable ASCII its tie order is the byte order asked for here."""
    ex = impl(CHAPTER)
    assert ex.train_bpe("aaabdaaabac", 3) == [(97, 97), (97, 98), (256, 257)]
    assert ex.train_bpe("ab", 5) == [(97, 98)], "stop when one token is left"
    assert ex.train_bpe("", 3) == []
    no_spaces = "".join(SAMPLE.split()) * 3
    rng = random.Random(0)
    for text in (no_spaces, "".join(rng.choice("abcd!") for _ in range(400))):
        expected = [m.pair for m in learn_merges({text.encode(): 1}, 30)]
        assert ex.train_bpe(text, 30) == expected


@pytest.mark.points(2)
def test_encode_applies_merges_in_the_order_learned(impl):
    """Catches longest-match tokenisation and merging the leftmost mergeable pair first: with
    merges bc, ab, abc the text 'abc' must come out as a + bc. Reference: `BPETokenizer` with
    the same merges, piece by piece (the exercise does not pre-tokenise; inside a piece both
    must agree)."""
    ex = impl(CHAPTER)
    assert ex.encode("abc", [(98, 99), (97, 98), (257, 99)]) == [97, 256]
    assert ex.encode("abd", [(98, 99), (97, 98), (257, 99)]) == [257, 100]
    assert ex.encode("", [(97, 98)]) == []
    tok = BPETokenizer.train(SAMPLE * 5, 320, special_tokens=())
    merges = tok.merges
    for piece in pretokenize(SAMPLE + " Citizens résolved, 全部 🙂!"):
        assert ex.encode(piece, merges) == tok.encode(piece), f"piece {piece!r}"


@pytest.mark.points(2)
def test_decode_joins_bytes_before_decoding_utf8(impl):
    """Catches decoding each token on its own: '世' is three bytes, so three byte tokens decoded
    one by one give '\\ufffd' three times. Also catches building merged tokens in the wrong
    order (right + left). Reference: `BPETokenizer.decode`."""
    ex = impl(CHAPTER)
    text = "héllo 世界 🙂"
    assert ex.decode(list(text.encode()), []) == text
    assert ex.decode([104, 256, 32, 226, 130, 172], [(105, 33)]) == "hi! €"
    tok = BPETokenizer.train(SAMPLE * 5 + text * 5, 330, special_tokens=())
    for sample in (SAMPLE, text, "ünïcode ünïcode"):
        ids = tok.encode(sample)
        assert ex.decode(ids, tok.merges) == sample
    cut = list("世".encode())[:2]
    assert ex.decode(cut, []) == tok.decode(cut)


@pytest.mark.points(1)
def test_compression_ratio_counts_utf8_bytes(impl):
    """Catches counting characters instead of bytes (non-ASCII characters take 2-4 bytes) and
    dividing tokens by bytes."""
    ex = impl(CHAPTER)
    assert ex.compression_ratio("héllo", [104, 256, 108, 108, 111]) == pytest.approx(1.2, abs=1e-12)
    tok = BPETokenizer.train(SAMPLE * 5, 300, special_tokens=())
    text = SAMPLE + "多字节文字"
    ids = tok.encode(text)
    expected = len(text.encode()) / len(ids)
    assert ex.compression_ratio(text, ids) == pytest.approx(expected, abs=1e-12)


@pytest.mark.points(1)
def test_train_val_split_keeps_order_and_rounds(impl):
    """Catches putting the validation part first, shuffling, and flooring instead of rounding
    (7 * 0.7 is 4.8999... in floating point, so int() keeps 4 tokens for training, not 5).
    Reference: `minillm.data.train_val_split`."""
    ex = impl(CHAPTER)
    for n, fraction in [(1000, 0.1), (10, 0.2), (7, 0.3), (123, 0.25)]:
        ids = np.arange(n, dtype=np.uint16)
        train, val = ex.train_val_split(ids, fraction)
        ref_train, ref_val = data.train_val_split(ids, fraction)
        np.testing.assert_array_equal(train, ref_train)
        np.testing.assert_array_equal(val, ref_val)
    train, val = ex.train_val_split(np.arange(50))
    assert (len(train), len(val)) == (45, 5), "default val_fraction is 0.1"


@pytest.mark.points(2)
def test_get_batch_shifts_targets_by_one(impl):
    """Catches targets equal to the inputs (no shift), shifted the wrong way, one token short,
    or left in the input's dtype instead of int64. Reference: numpy slicing, row by row."""
    ex = impl(CHAPTER)
    x, y = ex.get_batch(np.array([5, 6, 7, 8, 9]), [0, 2], 2)
    assert x.tolist() == [[5, 6], [7, 8]] and y.tolist() == [[6, 7], [8, 9]]
    ids = np.random.default_rng(0).integers(0, 65_000, size=2_000).astype(np.uint16)
    starts = [0, 17, 1_000, 2_000 - 65]
    x, y = ex.get_batch(ids, starts, 64)
    assert isinstance(x, torch.Tensor) and x.dtype == y.dtype == torch.int64
    assert x.shape == y.shape == (4, 64)
    for b, s in enumerate(starts):
        assert x[b].tolist() == ids[s : s + 64].tolist()
        assert y[b].tolist() == ids[s + 1 : s + 65].tolist()
