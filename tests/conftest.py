import os

import pytest

os.environ.setdefault("GLOG_v", "3")


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
