"""The graded-exercise harness: every test here is worth points and reaches the student's code
through the `impl` fixture, so the same test grades exercises/ or solutions/."""

import importlib

import pytest

# A hanging student function costs only its own test.
GRADED_TEST_TIMEOUT_S = 60


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/exercises/" not in item.nodeid.replace("\\", "/"):
            continue
        marker = item.get_closest_marker("points")
        if marker is None or not marker.args or marker.args[0] <= 0:
            raise pytest.UsageError(
                f"graded test {item.nodeid} needs @pytest.mark.points(n), n > 0"
            )
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(GRADED_TEST_TIMEOUT_S))


@pytest.fixture(scope="session")
def impl(request):
    """`impl("ch01_preprocessing")` imports that module from the chosen implementation."""
    package = request.config.getoption("--impl")

    def load(topic: str):
        return importlib.import_module(f"{package}.{topic}")

    return load
