"""Chapter 02 exercises: byte-level BPE and token streams from Python primitives. Replace each
`raise NotImplementedError`.

Token ids are Python ints: 0-255 are the UTF-8 byte values, and merge number i (counting from 0)
makes token 256 + i. The first exercises work on the whole text as one sequence of bytes;
`train_bpe_words` and `encode_words` then cut it into pieces first, as GPT-2 does, with
`minillm.tokenizer.pretokenize` (the one library function you may call here). Otherwise use
Python, numpy and torch; the tests compare your answers with `minillm.tokenizer` and
`minillm.data`, so do not call those here.

Grade with `minillm grade ch02`, or
`pytest tests/exercises/test_ch02_tokenization.py --impl exercises`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from minillm.tokenizer import pretokenize  # noqa: F401 -- for train_bpe_words, encode_words


def count_pairs(ids: Sequence[int]) -> dict[tuple[int, int], int]:
    """How often each pair of neighbouring ids occurs in `ids`.

    Every position counts, so overlapping pairs count more than once: in [7, 7, 7] the pair
    (7, 7) occurs twice.

    Args:
        ids: `(n,)` token ids.

    Returns:
        `{(left, right): count}` with counts summing to n - 1 (empty when n < 2).

    Example:
        >>> count_pairs([1, 2, 3, 1, 2])
        {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    """
    raise NotImplementedError


def merge_pair(ids: Sequence[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each occurrence of `pair` in `ids` by `new_id`, scanning left to right.

    An occurrence, once merged, is used up: with pair (7, 7), [7, 7, 7] becomes [new_id, 7].

    Args:
        ids: `(n,)` token ids.
        pair: the two neighbouring ids to fuse.
        new_id: the id of the fused token.

    Returns:
        `(m,)` ids, m <= n.

    Example:
        >>> merge_pair([1, 2, 3, 1, 2], (1, 2), 99)
        [99, 3, 99]

    Off limits: `minillm.tokenizer._merge` (this exercise asks you to write it; a call fails the
    test).
    """
    raise NotImplementedError


def train_bpe(text: str, num_merges: int) -> list[tuple[int, int]]:
    """Learn `num_merges` byte-level BPE merges from `text`.

    Start from the UTF-8 bytes of `text`. Then, `num_merges` times: count the neighbouring pairs,
    take the most frequent one (ties: the smallest pair, comparing left ids then right ids), give
    it the next id (256, 257, ...), and merge it everywhere. Stop early when fewer than two
    tokens are left.

    Args:
        text: the training text, one sequence (no pre-tokenisation).
        num_merges: how many merges to learn.

    Returns:
        The merged pairs in the order learned; pair i made token 256 + i.

    Example:
        >>> train_bpe("aaabdaaabac", 3)  # 'aa' (4 times), then 'ab' beats 'Za' (256, 97) in a tie
        [(97, 97), (97, 98), (256, 257)]

    Off limits: `minillm.tokenizer.learn_merges`, `minillm.tokenizer.BPETokenizer.train`,
    `minillm.tokenizer.train_hf_bpe` (this exercise asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def encode(text: str, merges: Sequence[tuple[int, int]]) -> list[int]:
    """Encode `text` with learned merges (pair i made token 256 + i).

    Start from the UTF-8 bytes and apply merges in the order they were learned: while some
    neighbouring pair is a merge, fuse the pair that was learned first. That is not the same as
    matching the longest token in the vocabulary.

    Args:
        text: any text.
        merges: pairs as returned by `train_bpe`.

    Returns:
        `(n,)` token ids.

    Example:
        >>> encode("abc", [(98, 99), (97, 98), (257, 99)])  # bc, ab, abc
        [97, 256]

        'bc' was learned before 'ab', so "abc" becomes a + bc: token 258 ('abc') is not used.

    Off limits: `minillm.tokenizer.BPETokenizer.encode`, `BPETokenizer._encode_piece` (this exercise
    asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def decode(ids: Sequence[int], merges: Sequence[tuple[int, int]]) -> str:
    """The text of token ids: token 256 + i stands for the bytes of merges[i][0] then merges[i][1].

    Join the bytes of all tokens, then decode them as UTF-8 once; bytes that do not form a
    character (a token sequence cut mid-character) become '\\ufffd' (`errors="replace"`).

    Args:
        ids: `(n,)` token ids.
        merges: pairs as returned by `train_bpe`.

    Returns:
        The text.

    Example:
        >>> decode([104, 256, 32, 226, 130, 172], [(105, 33)])  # 256 = 'i!'; '€' is 3 bytes
        'hi! €'

    Off limits: `minillm.tokenizer.BPETokenizer.decode` (this exercise asks you to write it; a call
    fails the test).
    """
    raise NotImplementedError


def train_bpe_words(
    text: str, num_merges: int, special_tokens: Sequence[str] = ()
) -> list[tuple[int, int]]:
    """Learn `num_merges` byte-level BPE merges inside the pre-tokenizer's pieces.

    1. Cut every occurrence of a special token out of `text`: its characters are never counted.
    2. Cut what is left into pieces with `minillm.tokenizer.pretokenize` (GPT-2's pattern).
    3. Count pairs inside each piece only, each piece as often as it occurs; merge as in
       `train_bpe` (most frequent pair, ties to the smallest pair, ids from 256), everywhere in
       every piece. Stop early when no piece has two tokens left.

    Args:
        text: the training text.
        num_merges: how many merges to learn.
        special_tokens: strings such as "<|endoftext|>" that are not text.

    Returns:
        The merged pairs in the order learned; pair i made token 256 + i.

    Example:
        >>> train_bpe_words("ab ab<|endoftext|>ab", 2, ["<|endoftext|>"])  # "ab", " ab", "ab"
        [(97, 98), (32, 256)]

    Off limits: `minillm.tokenizer.learn_merges`, `minillm.tokenizer.BPETokenizer.train`,
    `minillm.tokenizer.train_hf_bpe` (this exercise asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def encode_words(
    text: str, merges: Sequence[tuple[int, int]], special_tokens: Sequence[str] = ()
) -> list[int]:
    """Encode `text` as a tokenizer trained by `train_bpe_words` does.

    Special token i is the single id 256 + len(merges) + i wherever it occurs (the longest one
    wins where two overlap); the text between special tokens is cut by `pretokenize`, and each
    piece is encoded on its own with `encode`, so no token spans two pieces.

    Args:
        text: any text.
        merges: pairs as returned by `train_bpe_words`.
        special_tokens: as given to `train_bpe_words`.

    Returns:
        `(n,)` token ids.

    Example:
        >>> encode_words("ab ab<|endoftext|>", [(97, 98), (32, 256)], ["<|endoftext|>"])
        [256, 257, 258]

    Off limits: `minillm.tokenizer.BPETokenizer.encode`, `BPETokenizer._encode_piece` (this exercise
    asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def compression_ratio(text: str, ids: Sequence[int]) -> float:
    """How many bytes of UTF-8 text each token stands for on average.

    Args:
        text: the text that was encoded.
        ids: `(n,)` its token ids, n >= 1.

    Returns:
        bytes / tokens.

    Example:
        >>> compression_ratio("héllo", [104, 256, 108, 108, 111])  # 'é' is 2 bytes
        1.2
    """
    raise NotImplementedError


def train_val_split(ids: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Split a token stream: the last `round(len(ids) * val_fraction)` tokens for validation,
    everything before them for training. No shuffling.

    Args:
        ids: `(n,)` token ids.
        val_fraction: share of the tokens for validation, 0 < val_fraction < 1.

    Returns:
        `(train, val)`, `(n - n_val,)` and `(n_val,)`.

    Example:
        >>> train_val_split(np.arange(10), 0.2)
        (array([0, 1, 2, 3, 4, 5, 6, 7]), array([8, 9]))

    Off limits: `minillm.data.train_val_split` (this exercise asks you to write it; a call fails the
    test).
    """
    raise NotImplementedError


def get_batch(
    ids: np.ndarray, starts: Sequence[int], block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for the windows that begin at `starts`.

    Row b of the input is ids[starts[b] : starts[b] + block_size]; row b of the target is the
    same window moved one token on, ids[starts[b] + 1 : starts[b] + block_size + 1].

    Args:
        ids: `(n,)` token ids (any integer dtype).
        starts: `(batch,)` offsets, each <= n - block_size - 1.
        block_size: tokens per row.

    Returns:
        `(x, y)`, both `(batch, block_size)` int64 tensors.

    Example:
        >>> x, y = get_batch(np.array([5, 6, 7, 8, 9]), [0, 2], 2)
        >>> x.tolist(), y.tolist()
        ([[5, 6], [7, 8]], [[6, 7], [8, 9]])
    """
    raise NotImplementedError


def sample_batch(
    ids: np.ndarray, block_size: int, batch_size: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random training batch: `batch_size` windows at offsets drawn uniformly by `rng`.

    A window needs block_size + 1 tokens (the target runs one token past the input), so the
    offsets are 0 .. len(ids) - block_size - 1, every one of them possible. Draw them with
    `rng.integers` (the same generator state gives the same batch), then cut the windows as
    `get_batch` does.

    Args:
        ids: `(n,)` token ids, n > block_size.
        block_size: tokens per row.
        batch_size: rows.
        rng: where the randomness comes from.

    Returns:
        `(x, y)`, both `(batch_size, block_size)` int64 tensors, y the input shifted by one.

    Example:
        >>> x, y = sample_batch(np.arange(10), 4, 2, np.random.default_rng(0))
        >>> bool((y == x + 1).all()), int(x.max()) <= 8
        (True, True)

    Off limits: `minillm.data.TokenBatchSampler` (this exercise asks you to write it; a call fails
    the test).
    """
    raise NotImplementedError
