import pytest

from msrun_support import no_leftovers


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, request):
    """A temp folder per test module for its jobs; no process whose command line names it may outlive the module."""
    with no_leftovers(tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))) as path:
        yield path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(layers) -> the demo's tiny checkpoint with that many DiT blocks, CLIP converted.

    Built in this process (it has imported MindSpore already; a subprocess would pay that again), once per
    session and block count, shared by every test module asking for it.
    """
    import sys

    from support import ROOT

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny_checkpoint import convert_clip, make_tiny_checkpoint

    built = {}

    def build(layers: int):
        if layers not in built:
            out = make_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny{layers}") / "tiny", layers=layers)
            convert_clip(out)
            built[layers] = out
        return built[layers]

    return build


@pytest.fixture(scope="session")
def parity_runs(tmp_path_factory, tiny_checkpoint):
    """The parity runs of tests/distributed/parity_runs.py, shared by the modules that check them."""
    from parity_runs import ParityRuns

    with no_leftovers(tmp_path_factory.mktemp("parity_runs")) as path:
        yield ParityRuns(path, tiny_checkpoint)
