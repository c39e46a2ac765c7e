import os

import pytest

os.environ.setdefault("GLOG_v", "3")


# The folders of the tests that start msrun jobs or several services (marked `distributed`).
PROCESS_FOLDERS = ("tests/distributed/", "tests/e2e/")


def pytest_collection_modifyitems(config, items):
    """The scheduler below groups by folder, so a `distributed` test elsewhere would run beside another msrun job."""
    for item in items:
        if item.get_closest_marker("distributed") and not item.nodeid.startswith(PROCESS_FOLDERS):
            raise pytest.UsageError(f"{item.nodeid} is marked distributed: it belongs in one of {PROCESS_FOLDERS}")


def pytest_xdist_make_scheduler(config, log):
    """`scripts/test.sh` runs two pytest workers (pytest-xdist). The multi-process tests form one work unit, so
    they run one after another on one worker (two msrun jobs at once overload this 2-core machine and hit the
    collectives' timeouts); every other test module is a unit of its own, so its module fixtures are built once.
    (xdist's own `--dist loadgroup` does not group under pytest 9.2: it renames `item._nodeid`, which pytest no
    longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ProcessTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "multi-process tests" if nodeid.startswith(PROCESS_FOLDERS) else nodeid.split("::", 1)[0]

    return ProcessTestsTogether(config, log)


@pytest.fixture(scope="session", autouse=True)
def _backend():
    """Every test process runs on the backend the environment selects (CPU here)."""
    from stepvideo import backend

    return backend.init()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a temporary directory: failed graph compiles write rank_0/ into the cwd."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The demo's tiny checkpoint (real layout, random weights), built once per session, CLIP converted."""
    import sys

    from support import ROOT

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny_checkpoint import convert_clip, make_tiny_checkpoint

    out = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "stepvideo-tiny")
    convert_clip(out)
    return out
