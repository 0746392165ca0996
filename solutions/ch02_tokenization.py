"""Chapter 02 reference solutions: byte-level BPE and token streams from Python primitives.

Same signatures and contracts as `exercises/ch02_tokenization.py`; `minillm.tokenizer` (with
fast incremental training and GPT-2's tie order) and `minillm.data` are the library versions.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from minillm.tokenizer import pretokenize


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
    counts: dict[tuple[int, int], int] = {}
    for i in range(len(ids) - 1):
        pair = (ids[i], ids[i + 1])
        counts[pair] = counts.get(pair, 0) + 1
    return counts


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
    """
    out = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == tuple(pair):
            out.append(new_id)
            i += 2  # both ids are used up
        else:
            out.append(ids[i])
            i += 1
    return out


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
    """
    ids = list(text.encode("utf-8"))
    merges: list[tuple[int, int]] = []
    for i in range(num_merges):
        counts = count_pairs(ids)
        if not counts:
            break
        # Highest count first; among equal counts the smallest pair (hence the minus sign).
        best = min(counts, key=lambda p: (-counts[p], p))
        ids = merge_pair(ids, best, 256 + i)
        merges.append(best)
    return merges


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
    """
    rank = {tuple(pair): i for i, pair in enumerate(merges)}
    ids = list(text.encode("utf-8"))
    while len(ids) > 1:
        pairs = [(ids[i], ids[i + 1]) for i in range(len(ids) - 1)]
        first = min(pairs, key=lambda p: rank.get(p, len(merges)))
        if first not in rank:
            break
        ids = merge_pair(ids, first, 256 + rank[first])
    return ids


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
    """
    vocab = [bytes([b]) for b in range(256)]
    for left, right in merges:
        vocab.append(vocab[left] + vocab[right])
    return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


def _split_specials(text: str, special_tokens: Sequence[str]) -> list[str]:
    """text, special, text, special, ..., text (just [text] without special tokens)."""
    if not special_tokens:
        return [text]
    # Longest first: where one special token contains another, the longer one wins.
    alternatives = sorted(special_tokens, key=len, reverse=True)
    return re.split("(" + "|".join(map(re.escape, alternatives)) + ")", text)


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
    """
    parts = _split_specials(text, special_tokens)[::2]  # the text between special tokens
    pieces = Counter(piece for part in parts for piece in pretokenize(part))
    words = {tuple(piece.encode("utf-8")): count for piece, count in pieces.items()}
    merges: list[tuple[int, int]] = []
    for i in range(num_merges):
        counts: Counter[tuple[int, int]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                counts[pair] += count
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        words = {tuple(merge_pair(word, best, 256 + i)): count for word, count in words.items()}
        merges.append(best)
    return merges


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
    """
    special_ids = {s: 256 + len(merges) + i for i, s in enumerate(special_tokens)}
    ids: list[int] = []
    for k, part in enumerate(_split_specials(text, special_tokens)):
        if k % 2:  # odd positions hold the special tokens themselves
            ids.append(special_ids[part])
        else:
            for piece in pretokenize(part):
                ids.extend(encode(piece, merges))
    return ids


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
    return len(text.encode("utf-8")) / len(ids)


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
    """
    n_train = len(ids) - round(len(ids) * val_fraction)
    return ids[:n_train], ids[n_train:]


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
    ids = np.asarray(ids, dtype=np.int64)  # int64: what nn.Embedding and cross_entropy expect
    x = torch.from_numpy(np.stack([ids[s : s + block_size] for s in starts]))
    y = torch.from_numpy(np.stack([ids[s + 1 : s + block_size + 1] for s in starts]))
    return x, y


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
    """
    # integers(low, high) never draws high itself: high = len - block_size makes the last
    # offset len - block_size - 1, whose target ends at the stream's last token.
    starts = rng.integers(0, len(ids) - block_size, size=batch_size)
    return get_batch(ids, starts.tolist(), block_size)
