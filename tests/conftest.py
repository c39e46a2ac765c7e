import os

import pytest

os.environ.setdefault("GLOG_v", "3")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    """Under xdist (`scripts/test.sh` runs `-n 2 --dist loadgroup`) the multi-process tests form one group, so
    they run one after another on one worker: two msrun jobs at once would overload this 2-core machine. The
    other tests share the remaining worker time."""
    for item in items:
        if item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.xdist_group("processes"))


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
