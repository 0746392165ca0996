"""WordNet 3.0 for NLTK's lemmatiser: check for it, and install it in one step.

`minillm setup-nltk` (run by the setup script) tries `nltk.download` first. Offline on
Debian/Ubuntu it falls back to the distribution's `wordnet-base` and `wordnet-sense-index`
packages (WordNet 3.0, the same database), copies their files into an `nltk_data/corpora/wordnet`
folder and writes the one file NLTK needs that Debian does not ship: `lexnames`.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
from pathlib import Path

from minillm.errors import MiniLLMError

DEBIAN_PACKAGES = ("wordnet-base", "wordnet-sense-index")
DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")
SETUP_STEP = "minillm setup-nltk"

# The 45 lexicographer files of WordNet 3.0 (lexnames(5WN)), with their syntactic category:
# 1 noun, 2 verb, 3 adjective, 4 adverb. NLTK reads this as `lexnames`: "NN<TAB>name<TAB>cat".
_LEXNAMES = (
    ["adj.all", "adj.pert", "adv.all", "noun.Tops"]
    + [
        f"noun.{n}"
        for n in (
            "act animal artifact attribute body cognition communication event feeling food group "
            "location motive object person phenomenon plant possession process quantity relation "
            "shape state substance time"
        ).split()
    ]
    + [
        f"verb.{n}"
        for n in (
            "body change cognition communication competition consumption contact creation emotion "
            "motion perception possession social stative weather"
        ).split()
    ]
    + ["adj.ppl"]
)
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


class WordNetMissingError(MiniLLMError):
    """NLTK cannot find WordNet."""


def lexnames_text() -> str:
    return "".join(
        f"{i:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(_LEXNAMES)
    )


def nltk_data_root() -> Path:
    """Where setup writes NLTK data: the first folder of `$NLTK_DATA`, else `~/nltk_data`."""
    first = os.environ.get("NLTK_DATA", "").split(os.pathsep)[0]
    return Path(first).expanduser() if first else Path.home() / "nltk_data"


def wordnet_status() -> str | None:
    """Where NLTK finds WordNet, or None when it does not."""
    import nltk

    try:
        return str(nltk.data.find("corpora/wordnet"))
    except LookupError:
        try:
            return str(nltk.data.find("corpora/wordnet.zip"))
        except LookupError:
            return None


def require_wordnet() -> None:
    """Raise a clear error naming the setup step when WordNet is not installed."""
    if wordnet_status() is None:
        raise WordNetMissingError(
            f"NLTK's WordNet data is not installed. Run `{SETUP_STEP}` (it downloads WordNet, or "
            f"offline on Debian/Ubuntu installs the {' and '.join(DEBIAN_PACKAGES)} packages)."
        )


def install_from_debian(wordnet_dir: Path = DEBIAN_WORDNET_DIR, root: Path | None = None) -> Path:
    """Copy Debian's WordNet 3.0 files into `root/corpora/wordnet` and write `lexnames`."""
    if not (wordnet_dir / "data.noun").is_file():
        raise WordNetMissingError(
            f"no WordNet files in {wordnet_dir}; install them with "
            f"`sudo apt-get install {' '.join(DEBIAN_PACKAGES)}`, then run `{SETUP_STEP}` again"
        )
    target = (root or nltk_data_root()) / "corpora" / "wordnet"
    partial = target.with_name("wordnet.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(wordnet_dir, partial)
    (partial / "lexnames").write_text(lexnames_text())
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # appears whole or not at all
    return target


def _apt_install() -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise WordNetMissingError(
            "WordNet could not be downloaded (offline?) and is not installed. On Debian/Ubuntu run "
            f"`sudo apt-get install {' '.join(DEBIAN_PACKAGES)}`, then `{SETUP_STEP}` again; "
            "elsewhere connect to the internet and run it again."
        )
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *DEBIAN_PACKAGES]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise WordNetMissingError(f"apt-get could not install WordNet:\n{result.stderr[-800:]}")


def setup_wordnet(*, allow_download: bool = True) -> str:
    """Make WordNet available to NLTK; return a sentence saying how."""
    if where := wordnet_status():
        return f"WordNet already installed at {where}"
    if allow_download:
        import nltk

        try:
            # nltk prints its own error lines even when quiet; this function says what happened.
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                nltk.download("wordnet", quiet=True, raise_on_error=True)
            if where := wordnet_status():
                return f"WordNet downloaded by nltk to {where}"
        except (ValueError, OSError):
            pass  # offline: fall back to the distribution's packages
    if not (DEBIAN_WORDNET_DIR / "data.noun").is_file():
        _apt_install()
    return f"WordNet installed from Debian's packages at {install_from_debian()}"
