"""Tokenizers: text to integer ids and back.

Two tokenizers share one interface (`Tokenizer`): `vocab_size`, `encode(str) -> list[int]`,
`decode(list[int]) -> str`, `save(path)`, and the module's `load(path)`, which returns the right
class. The training code only ever talks to that interface.

- `CharTokenizer`: one id per character seen in the training text. Tiny vocabulary, long
  sequences, and any character it has not seen is an error.
- `BPETokenizer`: byte-level byte-pair encoding, as in GPT-2. Text is UTF-8 encoded, so the 256
  byte values are the first 256 tokens and nothing is ever unknown; training then repeatedly fuses
  the most frequent adjacent pair of tokens into a new token.

Pre-tokenisation. Before BPE counts pairs, text is cut into pieces with GPT-2's regular expression
(`GPT2_PATTERN`): contractions (`'s`, `'ll`, ...), a run of letters, a run of digits or a run of
other symbols (each optionally led by one space), and whitespace. Merges never cross a piece
boundary, so " the" can become one token but "e t" never does.

Training. Pair counts are kept over the *unique* pieces weighted by how often each occurs, and
after each merge only the pieces that contained the merged pair are recounted; a heap finds the
most frequent pair. Ties go to the pair whose left token (then right token) comes first in GPT-2's
token order: printable bytes in byte order, then the other bytes, then merged tokens in the order
they were made. That is the rule of the Hugging Face `tokenizers` trainer, so both learn the same
merges from the same text (`train_hf_bpe` builds that trainer).

Special tokens (e.g. `<|endoftext|>`) take the ids after the merged tokens. Training ignores them;
`encode` turns each occurrence in the text into its single id unless `allow_special=False`.

Streaming. `encode_iterable(chunks)` and `encode_file(path)` give exactly `encode(whole text)`
while holding only the current chunk and a short tail: a BPE piece is emitted once the text after
it can no longer change it (see `BPETokenizer._settled`), so no piece or special token is ever cut
at a chunk boundary. Chunks may be `str` or UTF-8 `bytes` (decoded incrementally, so a character
split between two byte chunks is joined first).

File format (JSON, UTF-8)::

    {"format": "minillm-tokenizer", "version": 1, "type": "bpe",
     "merges": [[104, 101], [32, 116], ...],     # pairs of token ids, in the order learned
     "special_tokens": ["<|endoftext|>"]}
    {"format": "minillm-tokenizer", "version": 1, "type": "char", "chars": ["\\n", " ", "!", ...]}

Version 1 implies byte-level BPE with `GPT2_PATTERN`; merged ids are rebuilt by replaying merges.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import heapq
import json
import os
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import regex

from minillm.errors import InputError, InputTypeError, require_positive, require_text
from minillm.utils import progress_bar

if TYPE_CHECKING:
    import tokenizers
    from transformers import PreTrainedTokenizerFast

FORMAT = "minillm-tokenizer"
VERSION = 1
ENDOFTEXT = "<|endoftext|>"

# GPT-2's pre-tokenisation (also the `tokenizers` ByteLevel pre-tokenizer's default).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_GPT2_SPLIT = regex.compile(GPT2_PATTERN)

# Encoded pieces kept per tokenizer; cleared when full, which a normal corpus never reaches.
_CACHE_SIZE = 1 << 18


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (how `tokenizers` writes byte tokens).

    Printable bytes map to themselves; the other 68 (controls, space, ...) map to U+0100 onwards
    in byte order, so the space byte 32 is written `Ġ` and newline `Ċ`.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


_BYTE_TO_UNICODE = bytes_to_unicode()
_UNICODE_TO_BYTE = {c: b for b, c in _BYTE_TO_UNICODE.items()}
# Bytes in GPT-2's token order (byte b is GPT-2's token _GPT2_BYTE_ORDER.index(b)); breaks ties.
_GPT2_BYTE_ORDER = sorted(range(256), key=lambda b: ord(_BYTE_TO_UNICODE[b]))
_BYTE_RANK = [_GPT2_BYTE_ORDER.index(b) for b in range(256)]


def pretokenize(text: str) -> list[str]:
    """Cut `text` into the pieces BPE works inside (GPT-2's pattern); they join back to `text`.

    >>> pretokenize("Hello world's 42!!")
    ['Hello', ' world', "'s", ' 42', '!!']
    """
    return _GPT2_SPLIT.findall(require_text(text))


class Tokenizer(ABC):
    """What every tokenizer offers: ids in `range(vocab_size)`, `encode`, `decode`, `save`."""

    kind: ClassVar[str]  # the "type" field of the file

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids; every id is in `range(vocab_size)`."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids `ids` (a list, a 1-D array or tensor)."""

    def encode_iterable(self, chunks: Iterable[str | bytes]) -> Iterator[int]:
        """The ids of the concatenated `chunks`, yielded chunk by chunk: equal to
        `encode("".join(chunks))`. Here each chunk is encoded on its own, which is exact for a
        tokenizer with one id per character; `BPETokenizer` carries a tail across chunks."""
        for text in decoded_chunks(chunks):
            yield from self.encode(text)

    def encode_file(self, path: str | os.PathLike, *, chunk_chars: int = 1 << 16) -> Iterator[int]:
        """The ids of the UTF-8 text file at `path`, read `chunk_chars` characters at a time (in
        memory: one chunk and the tokenizer's tail, whatever the file's size)."""
        require_positive(chunk_chars, "chunk_chars", integer=True)
        with open(path, encoding="utf-8") as f:  # newlines as `Path.read_text` reads them
            yield from self.encode_iterable(iter(functools.partial(f.read, chunk_chars), ""))

    @abstractmethod
    def _fields(self) -> dict[str, Any]:
        """The type-specific part of the file."""

    @classmethod
    @abstractmethod
    def _from_fields(cls, fields: dict[str, Any]) -> Tokenizer:
        """Rebuild from `_fields()`, raising `InputError` on anything malformed."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON document `save` writes."""
        return {"format": FORMAT, "version": VERSION, "type": self.kind, **self._fields()}

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical file content: equal fingerprints, equal tokenizers."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer as JSON (format in the module docstring); return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")
        return path

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        if isinstance(ids, (str, bytes)):
            raise InputTypeError(f"ids must be a sequence of ints, got {type(ids).__name__}")
        if hasattr(ids, "tolist"):  # numpy arrays, torch tensors
            ids = ids.tolist()
        try:
            ids = list(ids)
        except TypeError:
            raise InputTypeError(
                f"ids must be a sequence of ints, got {type(ids).__name__}"
            ) from None
        for pos, i in enumerate(ids):
            if isinstance(i, bool) or not isinstance(i, int):
                raise InputTypeError(f"ids[{pos}] must be an int, got {type(i).__name__}")
            if not 0 <= i < self.vocab_size:
                raise InputError(
                    f"ids[{pos}] = {i} is not a token id; ids run from 0 to {self.vocab_size - 1}"
                )
        return ids


def decoded_chunks(chunks: Iterable[str | bytes]) -> Iterator[str]:
    """`chunks` as text: `str` chunks as they are, `bytes` chunks decoded as UTF-8 incrementally
    (a character whose bytes straddle two chunks comes out whole with the second)."""
    if isinstance(chunks, (str, bytes)):
        raise InputTypeError(
            f"chunks must be an iterable of str or bytes chunks, got one {type(chunks).__name__}; "
            "pass [text], or call encode(text)"
        )
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes decoded so far, for the error message
    for i, chunk in enumerate(chunks):
        if isinstance(chunk, str):
            yield chunk
            continue
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise InputTypeError(f"chunk {i} must be str or bytes, got {type(chunk).__name__}")
        pending = len(decoder.getstate()[0])  # bytes of a character the last chunk began
        try:
            yield decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            raise InputError(
                f"chunk {i} is not UTF-8: byte {offset - pending + exc.start} of the stream cannot "
                f"be decoded ({exc.reason}); decode it with its own encoding and pass str chunks"
            ) from None
        offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise InputError(
            "the byte chunks end inside a UTF-8 character (the stream was cut mid-character)"
        ) from None


def load(path: str | os.PathLike) -> Tokenizer:
    """Read a tokenizer written by `save`, returning a `CharTokenizer` or `BPETokenizer`."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"no tokenizer file at {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not a tokenizer file: it is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(f'{path} is not a tokenizer file: it lacks "format": "{FORMAT}"')
    if doc.get("version") != VERSION:
        raise InputError(
            f"{path} has tokenizer file version {doc.get('version')!r}; this minillm reads "
            f"version {VERSION}. Re-train or re-save the tokenizer with this version."
        )
    kinds = {cls.kind: cls for cls in (CharTokenizer, BPETokenizer)}
    if doc.get("type") not in kinds:
        raise InputError(
            f"{path} has unknown tokenizer type {doc.get('type')!r}; known: {', '.join(kinds)}"
        )
    fields = {k: v for k, v in doc.items() if k not in ("format", "version", "type")}
    try:
        return kinds[doc["type"]]._from_fields(fields)
    except InputError as exc:
        raise InputError(f"{path} is a corrupt tokenizer file: {exc}") from None


class CharTokenizer(Tokenizer):
    """One id per distinct character of the training text, in code-point order.

    >>> tok = CharTokenizer.train("hello")
    >>> tok.vocab_size, tok.encode("hell"), tok.decode([1, 0])
    (4, [1, 0, 2, 2], 'he')
    """

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars:
            raise InputError("a character vocabulary needs at least one character")
        for i, c in enumerate(chars):
            if not isinstance(c, str) or len(c) != 1:
                raise InputError(f"chars[{i}] must be a single character, got {c!r}")
        if len(set(chars)) != len(chars):
            raise InputError("the character vocabulary lists a character twice")
        self.chars = chars
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        """The vocabulary of every character in `text`, sorted."""
        return cls(sorted(set(require_text(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        require_text(text)
        try:
            return [self._ids[c] for c in text]
        except KeyError as exc:
            pos = text.index(exc.args[0])
            raise InputError(
                f"character {exc.args[0]!r} at position {pos} is not in the vocabulary of "
                f"{self.vocab_size} characters; train on text that contains it, or use a BPE "
                "tokenizer, which can encode any text"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in self._check_ids(ids))

    def _fields(self) -> dict[str, Any]:
        return {"chars": self.chars}

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> CharTokenizer:
        if not isinstance(fields.get("chars"), list):
            raise InputError('"chars" must be a list of characters')
        return cls(fields["chars"])


class Merge(NamedTuple):
    """One learned merge: `pair` of ids became token `token`; the pair occurred `count` times."""

    pair: tuple[int, int]
    token: int
    count: int


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each occurrence of `pair` in `ids`, scanning left to right ("aaa" -> "X a")."""
    a, b = pair
    out = []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] == a and i + 1 < n and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def learn_merges(
    word_counts: Mapping[bytes, int], num_new_tokens: int, *, progress: bool = False
) -> list[Merge]:
    """Learn BPE merges over pre-tokenised pieces until `num_new_tokens` tokens were made.

    `word_counts` maps each distinct piece (UTF-8 bytes) to how often it occurs. Stops early when
    no adjacent pair is left. Each step merges the most frequent pair (ties: GPT-2 token order, see
    the module docstring) and recounts only the pieces that contained it.
    """
    words = [list(w) for w in word_counts]
    freqs = list(word_counts.values())
    rank = list(_BYTE_RANK)  # rank[id] orders tokens for tie-breaking; merged tokens rank by id

    pair_counts: Counter[tuple[int, int]] = Counter()
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> pieces (or stale)
    for wi, (word, freq) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(word):
            pair_counts[pair] += freq
            where[pair].add(wi)
    # Max-heap by count, then smallest rank pair; entries go stale and are checked when popped.
    heap = [(-c, rank[p[0]], rank[p[1]], p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[Merge] = []
    with progress_bar(total=num_new_tokens, desc="BPE merges", disable=not progress) as bar:
        while len(merges) < num_new_tokens and heap:
            neg_count, _, _, pair = heapq.heappop(heap)
            count = pair_counts.get(pair, 0)
            if count != -neg_count:
                if count > 0:
                    heapq.heappush(heap, (-count, rank[pair[0]], rank[pair[1]], pair))
                continue
            new_id = len(rank)
            rank.append(new_id)
            merges.append(Merge(pair, new_id, count))
            bar.update()

            delta: Counter[tuple[int, int]] = Counter()
            for wi in where.pop(pair):
                old = words[wi]
                new = _merge(old, pair, new_id)
                if len(new) == len(old):  # stale entry: the pair left this piece earlier
                    continue
                freq = freqs[wi]
                for p in pairwise(old):
                    delta[p] -= freq
                for p in pairwise(new):
                    delta[p] += freq
                    where[p].add(wi)
                words[wi] = new
            for p, d in delta.items():
                if d == 0:
                    continue
                pair_counts[p] += d
                if pair_counts[p] <= 0:
                    del pair_counts[p]
                elif d > 0:  # counts only grow for new pairs: give them a heap entry
                    heapq.heappush(heap, (-pair_counts[p], rank[p[0]], rank[p[1]], p))
    return merges


class BPETokenizer(Tokenizer):
    """Byte-level BPE: ids 0-255 are bytes, then one id per merged token, then special tokens.

    >>> tok = BPETokenizer.train("low lower lowest " * 20, vocab_size=262)
    >>> tok.decode(tok.encode("lowly🙂")) == "lowly🙂"
    True
    """

    kind = "bpe"

    def __init__(self, merges: Sequence[tuple[int, int]], special_tokens: Sequence[str] = ()):
        self.merges: list[tuple[int, int]] = []
        self._tokens = [bytes([b]) for b in range(256)]  # id -> bytes, regular tokens
        token_ids = {t: i for i, t in enumerate(self._tokens)}
        self._merge_rank: dict[tuple[int, int], int] = {}  # pair -> when it was learned
        for rank, pair in enumerate(merges):
            if (
                not isinstance(pair, (list, tuple))
                or len(pair) != 2
                or not all(type(i) is int and 0 <= i < len(self._tokens) for i in pair)
            ):
                raise InputError(
                    f"merge {rank} is {pair!r}; each merge must be a pair of ids of tokens that "
                    f"exist before it (0 to {len(self._tokens) - 1})"
                )
            a, b = pair
            merged = self._tokens[a] + self._tokens[b]
            # Training cannot make the same bytes twice: once made, a token is never split again.
            if merged in token_ids:
                raise InputError(
                    f"merge {rank} {[a, b]} makes {merged!r} again, which is "
                    f"already token {token_ids[merged]}"
                )
            token_ids[merged] = len(self._tokens)
            self._tokens.append(merged)
            self.merges.append((a, b))
            self._merge_rank[a, b] = rank

        specials = _check_special_tokens(special_tokens)
        self.special_tokens = {s: len(self._tokens) + i for i, s in enumerate(specials)}
        self._id_bytes = self._tokens + [s.encode("utf-8") for s in specials]
        self._special_split = _special_splitter(specials)
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        *,
        special_tokens: Sequence[str] = (ENDOFTEXT,),
        progress: bool = False,
    ) -> BPETokenizer:
        """Learn merges on `text` until `vocab_size` ids exist (256 bytes + merges + specials).

        Special tokens in `text` are cut out and take no part in the counts. With too little text
        there may be no pair left to merge, and the vocabulary ends up smaller than asked.
        """
        require_text(text)
        vocab_size = int(require_positive(vocab_size, "vocab_size", integer=True))
        specials = _check_special_tokens(special_tokens)
        if vocab_size < 256 + len(specials):
            raise InputError(
                f"vocab_size must be at least 256 (one token per byte) + {len(specials)} special "
                f"token(s) = {256 + len(specials)}, got {vocab_size}"
            )
        split = _special_splitter(specials)
        chunks = split.split(text)[::2] if split else [text]
        pieces = Counter(piece for chunk in chunks for piece in _GPT2_SPLIT.findall(chunk))
        try:
            word_counts = {piece.encode("utf-8"): n for piece, n in pieces.items()}
        except UnicodeEncodeError as exc:
            raise _surrogate_error(text, exc) from None
        merges = learn_merges(word_counts, vocab_size - 256 - len(specials), progress=progress)
        return cls([m.pair for m in merges], specials)

    @property
    def vocab_size(self) -> int:
        return len(self._id_bytes)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for (a special token: its UTF-8 text)."""
        return self._id_bytes[self._check_ids([token_id])[0]]

    def byte_merges(self) -> list[tuple[bytes, bytes]]:
        """The merges as pairs of byte strings: comparable across tokenizers whatever their ids."""
        return [(self._tokens[a], self._tokens[b]) for a, b in self.merges]

    def _encode_piece(self, piece: bytes) -> list[int]:
        ids = list(piece)
        never = len(self.merges)
        while len(ids) > 1:
            # The earliest-learned merge among the adjacent pairs goes first, as in training.
            pair = min(pairwise(ids), key=lambda p: self._merge_rank.get(p, never))
            if pair not in self._merge_rank:
                break
            ids = _merge(ids, pair, 256 + self._merge_rank[pair])
        return ids

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of `text`; a special token in it becomes its one id if `allow_special`.

        With `allow_special=False`, "<|endoftext|>" is encoded as the ordinary characters it is.
        """
        require_text(text)
        if allow_special and self._special_split:
            parts = self._special_split.split(text)  # text, special, text, special, ..., text
        else:
            parts = [text]
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.special_tokens[part])
            else:
                self._encode_pieces(_GPT2_SPLIT.findall(part), ids, text)
        return ids

    def _encode_pieces(self, pieces: Iterable[str], ids: list[int], text: str) -> None:
        """Append the ids of pre-tokenised `pieces` of `text` to `ids` (through the cache)."""
        try:
            for piece in pieces:
                piece_ids = self._cache.get(piece)
                if piece_ids is None:
                    if len(self._cache) >= _CACHE_SIZE:
                        self._cache.clear()
                    piece_ids = self._cache[piece] = self._encode_piece(piece.encode("utf-8"))
                ids.extend(piece_ids)
        except UnicodeEncodeError as exc:
            raise _surrogate_error(text, exc) from None

    def encode_iterable(
        self, chunks: Iterable[str | bytes], *, allow_special: bool = True
    ) -> Iterator[int]:
        """The ids of the concatenated `chunks` (str, or UTF-8 bytes), exactly
        `encode("".join(chunks), allow_special=...)`, yielded as they settle.

        Only the current chunk and a tail of unsettled text are held: a few pieces normally. (A
        single piece is never cut, so text without whitespace or punctuation, one long run of
        letters, is held whole until it ends.)
        """
        tail = ""
        for chunk in decoded_chunks(chunks):
            tail += chunk
            ids, settled = self._settled(tail, allow_special)
            yield from ids
            tail = tail[settled:]
        yield from self.encode(tail, allow_special=allow_special)

    def _settled(self, text: str, allow_special: bool) -> tuple[list[int], int]:
        r"""The ids of the longest prefix of `text` whose ids no continuation of `text` can
        change, and that prefix's length.

        Special tokens: none may start at or after `hold`, the first place from which the end of
        `text` could be the beginning of one; before it, the splitter's matches are final. Pieces:
        GPT-2's pattern decides a piece from its own characters and at most the two after it
        (the 3-character contractions `'ll`, `'re`, `'ve`; the look-ahead of `\s+(?!\S)`), so a
        piece with two characters after it, none past `hold`, is final.
        """
        hold = len(text)
        if allow_special and self._special_split:
            longest = max(map(len, self.special_tokens))
            for start in range(max(0, len(text) - longest + 1), len(text)):
                if any(s.startswith(text[start:]) for s in self.special_tokens):
                    hold = start
                    break
            parts = self._special_split.split(text)
        else:
            parts = [text]
        ids: list[int] = []
        start = 0  # of parts[k] in text
        for k, part in enumerate(parts):
            end = start + len(part)
            if k % 2:  # a special token
                if start >= hold:
                    break
                ids.append(self.special_tokens[part])
            elif k + 1 < len(parts) and end < hold:  # text ended by a settled special token
                self._encode_pieces(_GPT2_SPLIT.findall(part), ids, text)
            else:  # the open end: the settled pieces only
                stop = max(start, min(end, hold))
                pieces = []
                for match in _GPT2_SPLIT.finditer(text, start, stop):
                    if match.end() > stop - 2:
                        break
                    pieces.append(match.group())
                    start = match.end()
                self._encode_pieces(pieces, ids, text)
                return ids, start
            start = end
        return ids, start

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 (half a character) become '\\ufffd'."""
        return b"".join(self._id_bytes[i] for i in self._check_ids(ids)).decode(
            "utf-8", errors="replace"
        )

    def _fields(self) -> dict[str, Any]:
        return {
            "merges": [list(p) for p in self.merges],
            "special_tokens": list(self.special_tokens),
        }

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> BPETokenizer:
        merges, specials = fields.get("merges"), fields.get("special_tokens", [])
        if not isinstance(merges, list) or not isinstance(specials, list):
            raise InputError('"merges" and "special_tokens" must be lists')
        return cls(merges, specials)

    def to_hf_tokenizer(self) -> tokenizers.Tokenizer:
        """The same tokenizer as a Hugging Face `tokenizers.Tokenizer`, with the same ids.

        A BPE model holding our vocabulary and merges (bytes written as GPT-2 characters), GPT-2's
        ByteLevel pre-tokenizer and decoder, and our special tokens as added tokens. It encodes
        every text as we do, except characters newer than the Unicode tables of its regex engine
        (a handful from Unicode 16-17, e.g. U+0558), which the two pre-tokenisers classify
        differently.
        """
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        def chars(b: bytes) -> str:
            return "".join(_BYTE_TO_UNICODE[x] for x in b)

        vocab = {chars(t): i for i, t in enumerate(self._tokens)}
        merges = [(chars(a), chars(b)) for a, b in self.byte_merges()]
        hf = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        # Added after the model's vocabulary, so they get the same ids as ours.
        hf.add_special_tokens(
            [AddedToken(s, special=True, normalized=False) for s in self.special_tokens]
        )
        return hf

    def to_transformers(self) -> PreTrainedTokenizerFast:
        """The same tokenizer as a `transformers` `PreTrainedTokenizerFast` (`<|endoftext|>`, if
        present, is its end-of-sequence token)."""
        from transformers import PreTrainedTokenizerFast

        eos = ENDOFTEXT if ENDOFTEXT in self.special_tokens else None
        return PreTrainedTokenizerFast(
            tokenizer_object=self.to_hf_tokenizer(),
            eos_token=eos,
            clean_up_tokenization_spaces=False,
        )

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Save as a `transformers` tokenizer folder, which `AutoTokenizer.from_pretrained(folder)`
        loads offline; return the folder."""
        self.to_transformers().save_pretrained(str(folder))
        return Path(folder)


def _check_special_tokens(special_tokens: Sequence[str]) -> list[str]:
    if isinstance(special_tokens, str):
        raise InputTypeError(
            f"special_tokens must be a list of strings, got the str {special_tokens!r}"
        )
    specials = list(special_tokens)
    for i, s in enumerate(specials):
        if not isinstance(s, str) or not s:
            raise InputError(f"special_tokens[{i}] must be a non-empty str, got {s!r}")
    if len(set(specials)) != len(specials):
        raise InputError(f"special tokens must be distinct, got {specials}")
    return specials


def _special_splitter(specials: Sequence[str]) -> regex.Pattern | None:
    """A pattern whose `split` gives text, special, text, ..., text (None without specials)."""
    if not specials:
        return None
    # Longest first, so that a special token containing another one wins.
    alternatives = sorted(specials, key=len, reverse=True)
    return regex.compile("(" + "|".join(regex.escape(s) for s in alternatives) + ")")


def _surrogate_error(text: str, exc: UnicodeEncodeError) -> InputError:
    char = exc.object[exc.start]
    return InputError(
        f"text contains a lone surrogate U+{ord(char):04X} at position {text.index(char)}, which "
        "is not a Unicode character and has no UTF-8 bytes; fix the text (it was probably "
        "decoded with errors='surrogateescape')"
    )


def train_hf_bpe(
    text: str, vocab_size: int, *, special_tokens: Sequence[str] = (ENDOFTEXT,)
) -> tokenizers.Tokenizer:
    """Train Hugging Face `tokenizers`' BPE the way `BPETokenizer.train` trains: byte-level,
    GPT-2 pre-tokenisation without an added prefix space, all 256 bytes in the alphabet, and
    `vocab_size` counting bytes, merges and special tokens. For cross-checks and benchmarks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator([text], trainer)
    return hf


def hf_byte_merges(hf: tokenizers.Tokenizer) -> list[tuple[bytes, bytes]]:
    """The merges of a byte-level `tokenizers` BPE model as pairs of byte strings."""
    merges = json.loads(hf.to_str())["model"]["merges"]
    pairs = [m.split(" ") if isinstance(m, str) else m for m in merges]  # older files: "a b"
    return [tuple(bytes(_UNICODE_TO_BYTE[c] for c in s) for s in pair) for pair in pairs]
