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
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from minillm.errors import MiniLLMError, unknown_name


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
    url: str, dest: Path, *, sha256: str, size: int | None = None, progress: bool = True,
    timeout_s: float = 30.0,
) -> Path:
    """Stream `url` to `dest`, verifying `size` (if given) and `sha256` before it appears there."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    how_to = (
        f"Download it by hand from {url} and save it as {dest} (sha256 {sha256}), "
        "or set MINILLM_DATA to a folder that already holds it."
    )
    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(part, "wb") as out:
            total = size or int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
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
