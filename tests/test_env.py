"""`minillm env`: one line per check, each OK or saying what to do."""

import hashlib

from minillm import data
from minillm.env import FIX, NOTE, OK, check_data, environment_report, format_report


def test_report_covers_versions_devices_deepspeed_nltk_and_data():
    checks = {c.name.strip(): c for c in environment_report()}
    for name in (
        "python",
        "torch",
        "cpu",
        "gpu",
        "deepspeed",
        "transformers",
        "nltk wordnet",
        "data cache",
        "deepspeed_shm_comm",
    ):
        assert name in checks, name
    assert checks["python"].status == OK
    assert "accelerator" in checks["deepspeed"].detail and "backend" in checks["deepspeed"].detail
    assert all(c.status in (OK, NOTE, FIX) for c in checks.values())


def test_every_problem_line_says_what_to_do():
    for check in environment_report():
        if check.status == FIX:
            assert any(w in check.detail for w in ("run", "install", "set")), check.line()


def test_data_lines_reflect_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MINILLM_DATA", str(tmp_path))
    by_name = {c.name.strip(): c for c in check_data()}
    assert str(tmp_path) in by_name["data cache"].detail
    assert (
        by_name["tinyshakespeare"].status == NOTE
        and "minillm data download" in by_name["tinyshakespeare"].detail
    )

    path = data.cached_path("tinyshakespeare")
    path.parent.mkdir(parents=True)
    path.write_text("not shakespeare")
    assert hashlib.sha256(path.read_bytes()).hexdigest() != data.CORPORA["tinyshakespeare"].sha256
    assert {c.name.strip(): c for c in check_data()}["tinyshakespeare"].status == FIX


def test_format_report_ends_with_a_verdict():
    report = format_report(environment_report())
    assert report.splitlines()[0].startswith("[  OK] python")
    assert report.splitlines()[-1] == "all set" or "to fix" in report.splitlines()[-1]
