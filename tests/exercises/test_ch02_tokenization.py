"""Graded tests for chapter 02 (tokenization): `minillm grade ch02`.

References are hand-computed cases and the library: `minillm.tokenizer` (the same BPE, trained
and applied with its own code) and `minillm.data`; a replay of merges that recounts every pair
inside the pre-tokenizer's pieces; and, for random batches, the rule that every window lies inside
the stream. Token ids are compared exactly; the compression ratio to 1e-12.
"""

import random
import re
from collections import Counter

import numpy as np
import pytest
import torch

from minillm import data
from minillm.tokenizer import ENDOFTEXT, BPETokenizer, learn_merges, pretokenize

# What each exercise must not call: the library function it asks you to write (a call fails
# the test). A guard against the obvious shortcut; the stubs' docstrings name the same.
OFF_LIMITS = {
    "merge_pair": ("minillm.tokenizer._merge",),
    "train_bpe": (
        "minillm.tokenizer.learn_merges",
        "minillm.tokenizer.BPETokenizer.train",
        "minillm.tokenizer.train_hf_bpe",
    ),
    "encode": (
        "minillm.tokenizer.BPETokenizer.encode",
        "minillm.tokenizer.BPETokenizer._encode_piece",
    ),
    "decode": ("minillm.tokenizer.BPETokenizer.decode",),
    "train_bpe_words": (
        "minillm.tokenizer.learn_merges",
        "minillm.tokenizer.BPETokenizer.train",
        "minillm.tokenizer.train_hf_bpe",
    ),
    "encode_words": (
        "minillm.tokenizer.BPETokenizer.encode",
        "minillm.tokenizer.BPETokenizer._encode_piece",
    ),
    "train_val_split": ("minillm.data.train_val_split",),
    "sample_batch": ("minillm.data.TokenBatchSampler.__next__",),
}

CHAPTER = "ch02_tokenization"
SAMPLE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n"
)


def random_ids(n: int, alphabet: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(alphabet) for _ in range(n)]


def piece_counts(text: str, special_tokens=()) -> Counter:
    """The pre-tokenizer's pieces of `text`, as tuples of byte ids, with special tokens cut out."""
    parts = re.split("|".join(map(re.escape, special_tokens)), text) if special_tokens else [text]
    return Counter(tuple(piece.encode()) for part in parts for piece in pretokenize(part))


def replay_merges(pieces: Counter, merges) -> str | None:
    """Replay `merges` on `pieces`, recounting the pairs inside pieces before each step; what is
    wrong with the first merge that is not the most frequent pair (ties: the smallest), or None."""
    pieces = dict(pieces)
    for i, pair in enumerate(merges):
        counts = Counter()
        for piece, n in pieces.items():
            for left_right in zip(piece, piece[1:], strict=False):
                counts[left_right] += n
        if not counts:
            return f"merge {i} {pair} was learned although no piece has two tokens left"
        best = min(counts, key=lambda p: (-counts[p], p))
        if tuple(pair) != best:
            where = (
                f"occurs {counts[tuple(pair)]} times inside pieces"
                if tuple(pair) in counts
                else "occurs inside no piece (it crosses a piece boundary or a special token)"
            )
            return (
                f"merge {i} is {tuple(pair)}, which {where}; expected {best}, the most frequent "
                f"pair ({counts[best]} times, the smallest pair among equal counts)"
            )
        merged = {}
        for piece, n in pieces.items():
            out, k = [], 0
            while k < len(piece):
                if piece[k : k + 2] == best:
                    out.append(256 + i)
                    k += 2
                else:
                    out.append(piece[k])
                    k += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        pieces = merged
    return None


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


# -- pre-tokenised BPE and special tokens -------------------------------------------------------

SPACED = SAMPLE * 3 + "  Speak,  speak!\n\n\nWe are resolved.   Resolved.\n" * 4
# Printable ASCII without spaces, where GPT-2's tie order (the library's) is the byte order.
UNSPACED = "".join(SAMPLE.split()) * 3


@pytest.mark.points(3)
def test_train_bpe_words_keeps_merges_inside_pieces(impl):
    """Catches training on the whole text as one sequence (merges such as 'e' + ' ' or '.' + '\n'
    cross the pre-tokenizer's word boundaries), counting each distinct piece once instead of as
    often as it occurs, and not recounting after a merge. References: a replay that recounts the
    pairs inside pieces at every step, and `BPETokenizer.train`, which learns the same merges where
    its tie order is the byte order (text without whitespace)."""
    ex = impl(CHAPTER)
    for text, num_merges, expected in [
        ("ab ab ab", 2, [(97, 98), (32, 256)]),  # pieces 'ab', ' ab', ' ab'
        ("a b", 3, [(32, 98)]),  # ' b' is one piece, 'a' another: nothing else to merge
        ("", 3, []),
    ]:
        got = ex.train_bpe_words(text, num_merges)
        assert got == expected, (
            f"train_bpe_words({text!r}, {num_merges}): expected {expected}, got {got}"
        )
    merges = ex.train_bpe_words(SPACED, 40)
    assert len(merges) == 40, f"expected 40 merges, got {len(merges)}"
    problem = replay_merges(piece_counts(SPACED), merges)
    assert problem is None, problem
    expected = BPETokenizer.train(UNSPACED, 256 + 30, special_tokens=()).merges
    got = ex.train_bpe_words(UNSPACED, 30)
    assert got == expected, f"expected the library's merges {expected[:8]}..., got {got[:8]}..."


@pytest.mark.points(2)
def test_train_bpe_words_never_counts_special_tokens(impl):
    """Catches counting the characters of special tokens (with many documents, '<' + '|' and
    'end' + 'of' become merges) and merging across them (the last piece of one document glued to
    the first of the next). References: hand cases and `BPETokenizer.train` with the same special
    tokens."""
    ex = impl(CHAPTER)
    for text, specials, expected in [
        ("ab ab<|endoftext|>ab", [ENDOFTEXT], [(97, 98), (32, 256)]),
        (ENDOFTEXT * 5, [ENDOFTEXT], []),  # nothing but special tokens: nothing to learn
        ("xy<|sep|>xy<|sep|>z", ["<|sep|>"], [(120, 121)]),  # no 'y<', no 'yz'
    ]:
        got = ex.train_bpe_words(text, 3, specials)  # each runs out of pairs before 3 merges
        assert got == expected, (
            f"train_bpe_words({text!r}, 3, {specials}): expected {expected}, got {got}"
        )
    documents = ENDOFTEXT.join("".join(line.split()) for line in SAMPLE.splitlines() * 4)
    specials = [ENDOFTEXT, "<|pad|>"]
    expected = BPETokenizer.train(documents, 256 + 25 + 2, special_tokens=specials).merges
    got = ex.train_bpe_words(documents, 25, specials)
    assert got == expected, f"expected the library's merges {expected[:8]}..., got {got[:8]}..."
    spaced_documents = ENDOFTEXT.join(SPACED.split("\n\n") * 3)
    got = ex.train_bpe_words(spaced_documents, 30, [ENDOFTEXT])
    problem = replay_merges(piece_counts(spaced_documents, [ENDOFTEXT]), got)
    assert problem is None, problem


@pytest.mark.points(2)
def test_encode_words_matches_the_library(impl):
    """Catches encoding a special token as its characters (or splitting it into pieces), numbering
    special tokens from 256 instead of after the merged tokens, and encoding the whole text at
    once, which merges the spaces of '  ' across the boundary of the pieces ' ' and ' speak'.
    Reference: `BPETokenizer.encode` with the same merges and special tokens."""
    ex = impl(CHAPTER)
    merges = [(97, 98), (32, 256)]
    got = ex.encode_words("ab ab<|endoftext|>", merges, [ENDOFTEXT])
    assert got == [256, 257, 258], (
        f"expected [256, 257, 258] ('ab', ' ab', then <|endoftext|> as 256 + 2 merges), got {got}"
    )
    assert ex.encode_words("", merges, [ENDOFTEXT]) == [], "the empty text has no tokens"
    specials = [ENDOFTEXT, "<|pad|>"]
    tok = BPETokenizer.train(SPACED * 2, 256 + 60 + 2, special_tokens=specials)
    texts = [
        SAMPLE,
        f"Speak,  speak.{ENDOFTEXT}First  Citizen:\n\n\nWe  proceed",
        f"<|pad|><|pad|>{ENDOFTEXT}résolved   全部 🙂<|endoftext|",
        "  leading and trailing   ",
    ]
    for text in texts:
        expected = tok.encode(text)
        got = ex.encode_words(text, tok.merges, specials)
        assert got == expected, f"{text!r}: expected {expected}, got {got}"


# -- random batches ------------------------------------------------------------------------------


def call_sample_batch(ex, ids, block_size, batch_size, seed):
    try:
        return ex.sample_batch(ids, block_size, batch_size, np.random.default_rng(seed))
    except NotImplementedError:
        raise
    except Exception as exc:
        pytest.fail(
            f"sample_batch(ids of length {len(ids)}, block_size={block_size}) raised "
            f"{type(exc).__name__}: {exc}\nThe usual cause is an offset past the last valid one, "
            f"len(ids) - block_size - 1 = {len(ids) - block_size - 1}: its target would run off "
            "the end of the stream.",
            pytrace=False,
        )


def window_starts(ids, x, y, block_size) -> list[int]:
    """The offset of each row of x in ids (ids holds distinct values); checks y against it."""
    position = {int(v): i for i, v in enumerate(ids)}
    starts = []
    for b in range(x.shape[0]):
        start = position.get(int(x[b, 0]))
        assert start is not None, f"row {b} of x starts with {int(x[b, 0])}, not a token of ids"
        assert start + block_size < len(ids), (
            f"row {b} starts at offset {start}; the last valid offset is "
            f"len(ids) - block_size - 1 = {len(ids) - block_size - 1} (its target needs one "
            "token more than its input)"
        )
        assert x[b].tolist() == ids[start : start + block_size].tolist(), f"row {b} of x"
        assert y[b].tolist() == ids[start + 1 : start + block_size + 1].tolist(), (
            f"row {b} of y must be x's window moved one token on, ids[{start + 1}:"
            f"{start + block_size + 1}]"
        )
        starts.append(start)
    return starts


@pytest.mark.points(2)
def test_sample_batch_never_runs_past_the_stream(impl):
    """Catches drawing offsets up to len(ids) - block_size (one too many: that window's target
    runs past the end), targets not shifted by one, and the wrong shape or dtype. With only two
    valid offsets and 64 rows per batch, an overrunning draw shows up at once. Reference: every
    row is checked against the window of ids it starts."""
    ex = impl(CHAPTER)
    block_size = 8
    for n in (block_size + 2, block_size + 5, 300):
        ids = np.random.default_rng(n).permutation(1000)[:n].astype(np.uint16)  # distinct values
        for seed in range(4):
            x, y = call_sample_batch(ex, ids, block_size, 64, seed)
            assert isinstance(x, torch.Tensor) and x.dtype == y.dtype == torch.int64, (
                f"expected two int64 tensors, got {type(x).__name__} {getattr(x, 'dtype', '')}"
            )
            assert x.shape == y.shape == (64, block_size), (
                f"expected shapes (64, {block_size}), got {tuple(x.shape)} and {tuple(y.shape)}"
            )
            window_starts(ids, x, y, block_size)


@pytest.mark.points(1)
def test_sample_batch_reaches_the_last_window(impl):
    """Catches the opposite off-by-one, offsets drawn below len(ids) - block_size - 1 only (the
    stream's last token is then never a target), and randomness that ignores `rng` (the same
    seed must give the same batch, different seeds different ones)."""
    ex = impl(CHAPTER)
    block_size = 6
    ids = np.arange(100, 100 + block_size + 3)  # valid offsets: 0, 1 and 2
    seen = set()
    for seed in range(4):
        x, y = call_sample_batch(ex, ids, block_size, 64, seed)
        seen.update(window_starts(ids, x, y, block_size))
    assert seen == {0, 1, 2}, f"expected offsets 0, 1 and 2 in 256 draws, got {sorted(seen)}"
    long_ids = np.arange(5_000)
    first, again = (call_sample_batch(ex, long_ids, 16, 8, seed=7) for _ in range(2))
    other = call_sample_batch(ex, long_ids, 16, 8, seed=8)
    assert torch.equal(first[0], again[0]), "the same rng seed must give the same batch"
    assert not torch.equal(first[0], other[0]), "different rng seeds gave the same batch"
