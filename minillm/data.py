"""Course corpora: a registry, a checksummed download cache, and loading.

Files live in a cache folder, `$MINILLM_DATA` if set, else the user's cache directory
(`~/.cache/minillm/data` on Linux). A download goes to a `.part` file beside its target, is hashed
while it streams, and is renamed into place only once its size and sha256 match, so an interrupted
download never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from minillm.errors import (
    InputError,
    InputTypeError,
    MiniLLMError,
    require_positive,
    unknown_name,
)
from minillm.utils import progress_bar

if TYPE_CHECKING:
    import torch

    from minillm.tokenizer import Tokenizer


@dataclass(frozen=True)
class Corpus:
    name: str
    url: str
    sha256: str
    size: int  # bytes
    filename: str
    description: str


CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in [
        Corpus(
            name="tinyshakespeare",
            url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            size=1_115_394,
            filename="input.txt",
            description="excerpts of Shakespeare's plays, 1.1 MB of ASCII, 65 distinct characters "
            "(public domain)",
        ),
    ]
}

_CHUNK = 1 << 16


class DownloadError(MiniLLMError):
    """A corpus could not be fetched or did not match its checksum."""


def data_dir() -> Path:
    """The cache folder: `$MINILLM_DATA`, else `<user cache dir>/minillm/data`."""
    if os.environ.get("MINILLM_DATA"):
        return Path(os.environ["MINILLM_DATA"]).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("minillm")) / "data"


def get_corpus(name: str) -> Corpus:
    """The registry entry for `name`, or an error listing the known corpora."""
    if name not in CORPORA:
        raise unknown_name("corpus", name, CORPORA)
    return CORPORA[name]


def cached_path(name: str) -> Path:
    """Where corpus `name` lives in the cache (whether or not it is there yet)."""
    corpus = get_corpus(name)
    return data_dir() / corpus.name / corpus.filename


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_cached(name: str) -> bool:
    """True when the corpus is in the cache with the right checksum."""
    path = cached_path(name)
    return path.is_file() and sha256_of(path) == get_corpus(name).sha256


def fetch(name: str, *, progress: bool = True) -> Path:
    """Return the path of corpus `name`, downloading it into the cache first if needed.

    A cached file whose checksum does not match (edited, truncated) is fetched again.
    """
    corpus = get_corpus(name)
    path = cached_path(name)
    if path.is_file():
        if sha256_of(path) == corpus.sha256:
            return path
        print(f"{path} does not match its sha256; downloading it again")
    download(corpus.url, path, sha256=corpus.sha256, size=corpus.size, progress=progress)
    return path


def load_text(name: str = "tinyshakespeare", *, progress: bool = True) -> str:
    """The corpus as one string (downloaded and verified on first use)."""
    return fetch(name, progress=progress).read_text(encoding="utf-8")


def download(
    url: str,
    dest: Path,
    *,
    sha256: str,
    size: int | None = None,
    progress: bool = True,
    timeout_s: float = 30.0,
) -> Path:
    """Stream `url` to `dest`, verifying `size` (if given) and `sha256` before it appears there."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")  # several ranks may download at once
    how_to = (
        f"Download it by hand from {url} and save it as {dest} (sha256 {sha256}), "
        "or set MINILLM_DATA to a folder that already holds it."
    )
    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(part, "wb") as out:
            total = size or int(response.headers.get("Content-Length") or 0) or None
            with progress_bar(
                total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        if isinstance(exc, urllib.error.HTTPError):
            reason = f"HTTP {exc.code} {exc.reason}"
        else:
            reason = getattr(exc, "reason", None) or exc
        raise DownloadError(f"could not download {url} ({reason}). {how_to}") from None
    if size is not None and received != size:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"download of {url} stopped after {received:,} of {size:,} bytes; nothing was saved. "
            f"Run it again. {how_to}"
        )
    if digest.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{url} has sha256 {digest.hexdigest()}, expected {sha256}; the file was not saved "
            f"(the server sent something else). {how_to}"
        )
    os.replace(part, dest)
    return dest


# Token streams: a corpus as one array of token ids, split in two, and cut into training batches.


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype the ids of a vocabulary fit in: uint16 up to 65,536 ids, else int32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def tokens_path(name: str, tokenizer: Tokenizer) -> Path:
    """Where corpus `name`'s token ids under `tokenizer` are cached: beside the corpus, named by
    the corpus's sha256 and the tokenizer's fingerprint, so a changed corpus or tokenizer never
    reads a stale file."""
    corpus = get_corpus(name)
    return cached_path(name).with_name(
        f"tokens-{corpus.sha256[:16]}-{tokenizer.fingerprint[:16]}.npy"
    )


def load_tokens(name: str, tokenizer: Tokenizer, *, progress: bool = True) -> np.ndarray:
    """Corpus `name` as one 1-D array of token ids (dtype `token_dtype(tokenizer.vocab_size)`).

    The first call encodes the corpus and saves the array beside it in the data cache; later calls
    with the same corpus and tokenizer only read that file. The text is streamed through
    `tokenizer.encode_file`, so memory holds the ids (2 bytes each) but never the whole text.
    """
    path = tokens_path(name, tokenizer)
    if path.is_file():
        return np.load(path)
    ids = np.fromiter(
        tokenizer.encode_file(fetch(name, progress=progress)),
        dtype=token_dtype(tokenizer.vocab_size),
    )
    # Renamed into place once whole, like downloads; named per process, since every rank of a
    # multi-process run may tokenise at once.
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    with open(part, "wb") as f:
        np.save(f, ids)
    os.replace(part, path)
    return ids


def train_val_split(ids: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The first part of a token stream for training and the last `val_fraction` for validation.

    Not shuffled: neighbouring windows overlap, so a random split would put almost every
    validation token in the training set too. The validation part has
    `round(len(ids) * val_fraction)` tokens.
    """
    require_positive(val_fraction, "val_fraction")
    if val_fraction >= 1:
        raise InputError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n_val = round(len(ids) * val_fraction)
    if n_val == 0 or n_val == len(ids):
        raise InputError(
            f"{len(ids)} tokens are too few to split with val_fraction={val_fraction}: one part "
            "would be empty"
        )
    return ids[: len(ids) - n_val], ids[len(ids) - n_val :]


class TokenBatchSampler:
    """Random (input, target) batches from a token stream, for next-token prediction.

    Each batch holds `batch_size` windows of `block_size + 1` consecutive tokens that start at
    uniformly random offsets: the input is a window's first `block_size` tokens, the target its
    last `block_size` (the input shifted by one), both `(batch_size, block_size)` int64 tensors
    on `device`. Batch number k draws its offsets from a generator seeded with `(seed, k)`, so
    the sampler's whole state is two integers: after `load_state_dict(state_dict())` it gives
    exactly the batches an uninterrupted sampler would have given next.

    >>> x, y = next(TokenBatchSampler(np.arange(100), block_size=8, batch_size=4))
    >>> x.shape, bool((y[:, :-1] == x[:, 1:]).all())
    (torch.Size([4, 8]), True)
    """

    def __init__(
        self,
        ids: np.ndarray,
        block_size: int,
        batch_size: int,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        import torch  # here, not at the top: `minillm data` should not wait for torch

        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise InputTypeError(
                f"ids must be a 1-D array of integer token ids, got shape {ids.shape} and "
                f"dtype {ids.dtype}"
            )
        require_positive(block_size, "block_size", integer=True)
        require_positive(batch_size, "batch_size", integer=True)
        if block_size >= len(ids):
            raise InputError(
                f"block_size ({block_size}) must be smaller than the number of tokens "
                f"({len(ids)}): a window needs block_size + 1 tokens; use a shorter block_size "
                "or more text"
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InputTypeError(f"seed must be an int >= 0, got {seed!r}")
        self.ids = ids
        self.block_size = int(block_size)
        self.batch_size = int(batch_size)
        self.seed = seed
        self.device = torch.device(device)
        self.step = 0  # batches drawn so far

    def __iter__(self) -> TokenBatchSampler:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        rng = np.random.default_rng([self.seed, self.step])
        starts = rng.integers(0, len(self.ids) - self.block_size, size=self.batch_size)
        self.step += 1
        window = starts[:, None] + np.arange(self.block_size)
        x = torch.from_numpy(self.ids[window].astype(np.int64))
        y = torch.from_numpy(self.ids[window + 1].astype(np.int64))
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict[str, int]:
        """Where the sampler is: the seed and the number of batches drawn, plus the shape of
        what it samples (checked on load)."""
        return {
            "seed": self.seed,
            "step": self.step,
            "num_tokens": len(self.ids),
            "block_size": self.block_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state`; the token count, block and batch sizes must match this one's."""
        mine = self.state_dict()
        if set(state) != set(mine):
            raise InputError(f"a sampler state has the keys {sorted(mine)}, got {sorted(state)}")
        for key in ("num_tokens", "block_size", "batch_size"):
            if state[key] != mine[key]:
                raise InputError(
                    f"the saved sampler had {key}={state[key]}, this one has {mine[key]}; resume "
                    "with the same data and batch shape, or the batches would not continue the run"
                )
        self.seed, self.step = int(state["seed"]), int(state["step"])


# Packing: documents end to end in fixed-length rows, each attending only to itself.


@dataclass(frozen=True)
class PackedRows:
    """Documents packed into rows of one length (`pack_documents`); all tensors `(rows, T)`.

    `input_ids` the tokens; `targets` each token's successor within its document (-100 at a
    document's last token and at padding); `doc_ids` numbers the documents of each row from 0
    (padding is one more). `GPT.forward(input_ids, targets, doc_ids=doc_ids)` gives every
    document the logits it would have alone.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions restarting at 0 at each document (`minillm.attention.document_positions`)."""
        from minillm.attention import document_positions

        return document_positions(self.doc_ids)

    @property
    def attention_mask(self) -> torch.Tensor:
        """The block-diagonal causal mask `(rows, 1, T, T)`, True = may attend
        (`minillm.attention.document_mask`)."""
        from minillm.attention import document_mask

        return document_mask(self.doc_ids)


def pack_documents(documents: Iterable[Sequence[int]], block_size: int, eot_id: int) -> PackedRows:
    """Each document's token ids followed by `eot_id`, laid end to end into rows of `block_size`.

    A document starts a new row when it does not fit in what is left of the current one, so no
    document is split between rows, except one longer than a row: that one is cut into pieces
    of `block_size` tokens, each packed as a document of its own. The end of a row is padded
    with `eot_id` (targets -100). Packing wastes only that padding, where one document per row
    would pad every row to the longest.
    """
    import torch

    from minillm.model import IGNORE_INDEX

    require_positive(block_size, "block_size", integer=True)
    if isinstance(eot_id, bool) or not isinstance(eot_id, int) or eot_id < 0:
        raise InputTypeError(f"eot_id must be a token id (an int >= 0), got {eot_id!r}")
    if isinstance(documents, (str, bytes)):
        raise InputTypeError("documents must be an iterable of token id sequences, not text")
    segments: list[list[int]] = []
    for i, doc in enumerate(documents):
        ids = np.asarray(doc)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise InputTypeError(
                f"document {i} must be a 1-D sequence of integer token ids, got shape "
                f"{ids.shape} and dtype {ids.dtype}"
            )
        tokens = [*ids.tolist(), eot_id]
        segments += [tokens[k : k + block_size] for k in range(0, len(tokens), block_size)]
    if not segments:
        raise InputError("pack_documents needs at least one document")
    rows: list[tuple[list[int], list[int], list[int]]] = []  # input_ids, targets, doc_ids
    for segment in segments:
        if not rows or len(rows[-1][0]) + len(segment) > block_size:
            rows.append(([], [], []))
        inputs, targets, docs = rows[-1]
        doc = docs[-1] + 1 if docs else 0
        inputs += segment
        targets += [*segment[1:], IGNORE_INDEX]
        docs += [doc] * len(segment)
    for inputs, targets, docs in rows:
        pad = block_size - len(inputs)
        if pad:
            inputs += [eot_id] * pad
            targets += [IGNORE_INDEX] * pad
            docs += [docs[-1] + 1] * pad
    return PackedRows(*(torch.tensor([row[k] for row in rows]) for k in range(3)))
