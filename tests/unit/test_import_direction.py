"""Dependencies inside stepvideo/ point one way: foundations <- models <- pipeline <- parallel / serving <- entry.

Read from the source by scripts/import_graph.py (imports inside functions count too)."""
from import_graph import graph
from support import ROOT

LEVELS = {
    **dict.fromkeys(("__init__", "backend", "dtypes", "contracts", "utils", "layers", "checkpoint", "streaming",
                     "config"), 0),
    **dict.fromkeys(("modules", "text_encoder", "vae"), 1),
    "diffusion": 2,
    **dict.fromkeys(("parallel", "serving"), 3),
    "job": 4,
}
# The one arrow against the direction: `StepVideoPipeline.setup_api(vae_url, caption_url)`, the original's API
# for the remote services, imports the HTTP clients inside the method.
KNOWN_LAZY = {("diffusion", "serving")}


def test_every_part_has_a_level():
    assert set(graph(ROOT / "stepvideo")) <= set(LEVELS), "a new part of stepvideo/: give it a level here"


def test_imports_point_down():
    wrong = []
    for src, dsts in graph(ROOT / "stepvideo").items():
        for dst, at_top in dsts.items():
            down = LEVELS[dst] < LEVELS[src] or LEVELS[dst] == LEVELS[src] == 0
            if not down and not ((src, dst) in KNOWN_LAZY and not at_top):
                wrong.append(f"{src} -> {dst}" + ("" if at_top else " (inside a function)"))
    assert not wrong, ("imports against the direction foundations <- models <- pipeline <- parallel/serving <- job: "
                       f"{wrong}")
