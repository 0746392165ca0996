"""WordNet 3.0 from Debian's packages is readable by NLTK once `lexnames` is written; a missing
database gives an error that names the setup step."""

from pathlib import Path

import nltk
import pytest

from minillm import wordnet


def test_lexnames_lists_the_45_lexicographer_files_with_categories():
    lines = [line.split("\t") for line in wordnet.lexnames_text().splitlines()]
    assert len(lines) == 45
    assert lines[0] == ["00", "adj.all", "3"]
    assert lines[3] == ["03", "noun.Tops", "1"]
    assert lines[18] == ["18", "noun.person", "1"]
    assert lines[43] == ["43", "verb.weather", "2"]
    assert lines[44] == ["44", "adj.ppl", "3"]


@pytest.mark.skipif(
    not (wordnet.DEBIAN_WORDNET_DIR / "data.noun").is_file(),
    reason="Debian's wordnet-base is not installed (setup used nltk.download)",
)
def test_debian_files_plus_lexnames_give_nltk_a_working_wordnet(tmp_path, monkeypatch):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # NLTK reads only from its data path
    target = wordnet.install_from_debian(root=tmp_path)
    assert (target / "lexnames").is_file() and not (
        tmp_path / "corpora" / "wordnet.partial"
    ).exists()
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    reader = WordNetCorpusReader(nltk.data.find("corpora/wordnet"), None)
    assert reader.get_version() == "3.0"
    assert reader.synsets("dog")[0].lexname() == "noun.animal"
    assert reader.synset("dog.n.01").offset() == 2084071  # its offset in WordNet 3.0
    assert reader.morphy("geese") == "goose"


def test_missing_wordnet_names_the_setup_step(monkeypatch, tmp_path):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    assert wordnet.wordnet_status() is None
    with pytest.raises(wordnet.WordNetMissingError, match="minillm setup-nltk"):
        wordnet.require_wordnet()


def test_debian_install_without_the_packages_says_what_to_install(tmp_path):
    with pytest.raises(wordnet.WordNetMissingError, match="apt-get install wordnet-base"):
        wordnet.install_from_debian(wordnet_dir=tmp_path / "nowhere", root=tmp_path)


def test_installed_wordnet_lemmatises_with_and_without_pos():
    wordnet.require_wordnet()
    from nltk.stem import WordNetLemmatizer

    lemmatize = WordNetLemmatizer().lemmatize
    assert lemmatize("mice") == "mouse"
    assert lemmatize("running") == "running"  # read as a noun without a part of speech
    assert lemmatize("running", pos="v") == "run"
    assert lemmatize("better", pos="a") == "good"


def test_setup_is_idempotent():
    assert wordnet.setup_wordnet(allow_download=False).startswith("WordNet already installed")


def test_nltk_data_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    assert wordnet.nltk_data_root() == Path(tmp_path)
    monkeypatch.delenv("NLTK_DATA")
    assert wordnet.nltk_data_root() == Path.home() / "nltk_data"
