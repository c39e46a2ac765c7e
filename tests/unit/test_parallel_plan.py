"""The parallel layout without processes: meshes, stage plans and key filters, sequence splits,
padded-key masking, the per-step traffic formula at the published size, flags and start-up checks."""
import numpy as np
import pytest
from mindspore import Tensor

from stepvideo import backend
from stepvideo.checkpoint import named_parameters
from stepvideo.config import NEG_MAGIC, POS_MAGIC, parse_args
from stepvideo.modules.model import StepVideoModel
from stepvideo.parallel.mesh import Layout, Mesh, check_layout, possible_layouts
from stepvideo.parallel.pipeline import plan_stages, step_traffic
from stepvideo.job import StartupError, check_startup
from stepvideo.parallel.ulysses import SequenceSplit

TINY = {"num_attention_heads": 6, "attention_head_dim": 128, "in_channels": 8, "out_channels": 8, "num_layers": 7,
        "caption_channels": [16, 8], "patch_size": 1}
PUBLISHED = {"num_attention_heads": 48, "attention_head_dim": 128, "in_channels": 64, "out_channels": 64,
             "num_layers": 48, "patch_size": 1, "caption_channels": [6144, 1024]}


# ------------------------------------------------------------------------------ mesh


def test_mesh_positions_and_neighbours():
    ranks = [Mesh(rank=r, world_size=6, ulysses_degree=2, pp_degree=3) for r in range(6)]
    assert [(m.stage, m.sp_rank) for m in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert [m.prev_rank for m in ranks] == [None, None, 0, 1, 2, 3]
    assert [m.next_rank for m in ranks] == [2, 3, 4, 5, None, None]
    assert ranks[3].sp_ranks == [2, 3] and ranks[0].last_stage_root == 4
    assert ranks[0].sp_groups() == [[0, 1], [2, 3], [4, 5]]
    assert ranks[0].link_groups() == [[0, 2], [1, 3], [2, 4], [3, 5]]
    with pytest.raises(ValueError, match="inconsistent mesh"):
        Mesh(rank=0, world_size=4, ulysses_degree=3, pp_degree=1)


def test_layout_errors_list_the_possible_layouts():
    assert possible_layouts(4, 48, 48) == [Layout(1, 1, 1, 4), Layout(1, 1, 2, 2), Layout(1, 1, 4, 1),
                                           Layout(1, 2, 1, 2), Layout(1, 2, 2, 1), Layout(2, 1, 1, 2),
                                           Layout(2, 1, 2, 1), Layout(2, 2, 1, 1), Layout(4, 1, 1, 1)]
    # heads / tensor / ulysses must be whole: 6 heads rule out 4-way head splits
    assert Layout(1, 1, 2, 2) not in possible_layouts(4, 6, 6)
    assert Layout(2, 1, 2, 1) in possible_layouts(4, 6, 6)
    check_layout(4, 2, 2, num_heads=48, num_layers=48)
    check_layout(8, 2, 2, num_heads=48, num_layers=48, tp_degree=2)
    check_layout(4, 1, 1, num_heads=6, num_layers=3, tp_degree=2, cfg_degree=2)
    with pytest.raises(ValueError) as e:
        check_layout(4, 4, 1, num_heads=6, num_layers=6)
    assert "heads / tensor_parallel_degree / ulysses_degree = 6 / 1 / 4 is not whole" in str(e.value)
    assert ("--pp_degree 1 --cfg_parallel_degree 1 --tensor_parallel_degree 2 --ulysses_degree 2"
            not in str(e.value))
    assert "--pp_degree 2 --cfg_parallel_degree 1 --tensor_parallel_degree 1 --ulysses_degree 2" in str(e.value)
    with pytest.raises(ValueError, match="6 / 2 / 2 is not whole"):
        check_layout(4, 2, 1, num_heads=6, num_layers=6, tp_degree=2)
    with pytest.raises(ValueError, match="= 8, but the job has 4 rank"):
        check_layout(4, 8, 1, num_heads=48, num_layers=48)
    with pytest.raises(ValueError, match="cfg_parallel_degree must be 1 or 2"):
        check_layout(3, 1, 1, num_heads=48, num_layers=48, cfg_degree=3)
    with pytest.raises(ValueError, match="pp_degree 4 exceeds the 3 transformer blocks"):
        check_layout(4, 1, 4, num_heads=48, num_layers=3)


def test_four_axis_mesh_rank_order_and_groups():
    """rank = ((stage * C + cfg) * T + tp) * U + sp: Ulysses innermost, then tensor, CFG, pipeline."""
    ranks = [Mesh(rank=r, world_size=16, ulysses_degree=2, pp_degree=2, tp_degree=2, cfg_degree=2)
             for r in range(16)]
    assert [(m.stage, m.cfg_rank, m.tp_rank, m.sp_rank) for m in ranks[:8]] == [
        (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 0, 1, 1), (0, 1, 0, 0), (0, 1, 0, 1), (0, 1, 1, 0),
        (0, 1, 1, 1)]
    assert ranks[0].sp_groups()[:2] == [[0, 1], [2, 3]]
    assert ranks[0].tp_groups()[:3] == [[0, 2], [1, 3], [4, 6]]
    assert ranks[0].link_groups()[:2] == [[0, 8], [1, 9]]
    assert [m.next_rank for m in ranks[:3]] == [8, 9, 10] and ranks[13].prev_rank == 5
    assert ranks[0].output_root(0) == 8 and ranks[0].output_root(1) == 12
    assert ranks[5].cfg_rows(2) == range(1, 2) and ranks[0].cfg_rows(2) == range(0, 1)
    assert ranks[0].cfg_rows(4) == range(0, 2) and ranks[4].cfg_rows(1) == range(1, 1)
    # every rank is in exactly one group of each axis
    for groups in (ranks[0].sp_groups(), ranks[0].tp_groups()):
        assert sorted(r for g in groups for r in g) == list(range(16))


# ------------------------------------------------------------------------------ stages


@pytest.mark.parametrize("pp, split", [(1, None), (2, None), (3, None), (3, [1, 4, 2]), (7, None)])
def test_stage_plans_partition_every_parameter(pp, split):
    model = StepVideoModel.from_config_dict(TINY)  # lazy: no weight memory
    names = list(named_parameters(model))
    plans = plan_stages(TINY["num_layers"], pp, split)
    assert [p.blocks.start for p in plans] == [0] + [p.blocks.stop for p in plans[:-1]]
    assert plans[-1].blocks.stop == TINY["num_layers"]
    if split:
        assert [len(p.blocks) for p in plans] == split
    owners = {name: [p.stage for p in plans if p.owns(name)] for name in names}
    assert all(len(o) == 1 for o in owners.values()), {n: o for n, o in owners.items() if len(o) != 1}
    first = {n for n, o in owners.items() if o == [0] and not n.startswith("transformer_blocks.")}
    last = {n for n, o in owners.items() if o == [pp - 1] and not n.startswith("transformer_blocks.")}
    assert {n.split(".")[0] for n in first} >= {"pos_embed", "adaln_single", "caption_projection", "clip_projection"}
    assert {"scale_shift_table", "proj_out.weight", "proj_out.bias"} <= last
    for p in plans:
        assert {int(n.split(".")[1]) for n, o in owners.items()
                if n.startswith("transformer_blocks.") and o == [p.stage]} == set(p.blocks)


def test_stage_plan_descriptions_and_errors():
    plans = plan_stages(48, 2, [20, 28])
    assert [p.describe() for p in plans] == ["input embeddings + blocks 0-19", "blocks 20-47 + output layer"]
    with pytest.raises(ValueError, match="summing to 48"):
        plan_stages(48, 2, [20, 20])
    with pytest.raises(ValueError, match="belongs to no pipeline stage"):
        plans[0].owns("some_new_module.weight")


# ------------------------------------------------------------------------------ sequence split


@pytest.mark.parametrize("tokens, degree", [(35, 2), (35, 3), (12, 3), (1, 2), (75888, 48)])
def test_sequence_split_shards_cover_the_tokens(tokens, degree):
    split = SequenceSplit(tokens, degree)
    assert split.padded % degree == 0 and 0 <= split.padding < degree and split.padded >= tokens
    if tokens > 1000:
        assert split.padding == 0  # the published size needs no padding
        return
    x = np.arange(tokens * 4, dtype=np.float32).reshape(1, tokens, 4)
    shards = [split.shard(Tensor(x), i).asnumpy() for i in range(degree)]
    assert all(s.shape == (1, split.local, 4) for s in shards)
    gathered = np.concatenate(shards, axis=1)
    np.testing.assert_array_equal(split.unpad(Tensor(gathered)).asnumpy(), x)
    assert not gathered[0, tokens:].any()
    grid = np.arange(tokens * 3, dtype=np.int32).reshape(tokens, 3)
    np.testing.assert_array_equal(np.concatenate([split.shard(Tensor(grid), i, axis=0).asnumpy()
                                                  for i in range(degree)])[:tokens], grid)
    mask = split.key_mask()
    assert (mask is None) == (split.padding == 0)
    if mask is not None:
        assert mask.shape == (1, 1, split.padded) and int(mask.asnumpy().sum()) == tokens


def test_sequence_split_errors():
    split = SequenceSplit(35, 2)
    with pytest.raises(ValueError, match="should have 35 tokens"):
        split.shard(Tensor(np.zeros((1, 36, 2), np.float32)), 0)
    with pytest.raises(ValueError, match="index 2 outside"):
        split.shard(Tensor(np.zeros((1, 35, 2), np.float32)), 2)
    with pytest.raises(ValueError, match="should have 36 positions"):
        split.unpad(Tensor(np.zeros((1, 35, 2), np.float32)))


def test_padded_keys_masked_out_give_the_unpadded_attention():
    """What Ulysses relies on: zero-padded keys/values under the key mask change no real query's result."""
    rng = np.random.default_rng(0)
    n, heads, d = 35, 2, 16
    q, k, v = (rng.standard_normal((1, n, heads, d), dtype=np.float32) for _ in range(3))
    split = SequenceSplit(n, 3)
    pad = lambda a: np.concatenate([a, np.zeros((1, split.padding, heads, d), np.float32)], 1)  # noqa: E731
    full = backend.attention(Tensor(q), Tensor(k), Tensor(v)).asnumpy()
    padded = backend.attention(Tensor(pad(q)), Tensor(pad(k)), Tensor(pad(v)), mask=split.key_mask()).asnumpy()
    assert np.abs(padded[:, :n] - full).max() <= 1e-6


# ------------------------------------------------------------------------------ traffic


def test_step_traffic_at_the_published_size():
    """sp 2 x pp 2, 544x992x204 (36 x 34 x 62 latents), 48 blocks, 48 heads, bf16, CFG batch 2."""
    stages = step_traffic(PUBLISHED, (1, 36, 64, 34, 62), text_tokens=397, ulysses_degree=2, pp_degree=2)
    n, dim, blocks_per_stage, micro = 36 * 34 * 62, 48 * 128, 24, 2
    qkv = n // 2 * 3 * dim * 2  # (1, n/2, 3, 48, 128) bf16, per block
    out = n * 24 * 128 * 2  # (1, n, 24, 128) bf16, per block
    handoff = n // 2 * dim * 2 + n // 2 * 3 * 4 + 397 * dim * 2 + 397 + 7 * dim * 2 + 12
    prediction = 2 * 36 * 64 * 34 * 62 * 2
    assert stages[0] == {"sp_all_to_all": micro * blocks_per_stage * (qkv + out), "send": micro * handoff,
                         "broadcast": prediction}
    assert stages[1] == {"sp_all_to_all": micro * blocks_per_stage * (qkv + out), "recv": micro * handoff,
                         "sp_all_gather": micro * n // 2 * dim * 2, "broadcast": prediction}
    for s, ops_bytes in enumerate(stages):
        print(f"stage {s}: " + ", ".join(f"{op} {b / 2**20:.1f} MiB" for op, b in ops_bytes.items()) +
              f"; total {sum(ops_bytes.values()) / 2**30:.2f} GiB per rank per step")


# ------------------------------------------------------------------------------ flags and start-up


def test_flags_keep_the_original_names_and_defaults():
    args = parse_args(["--prompt", "x"])
    assert (args.model_dir, args.vae_url, args.caption_url) == ("./ckpts", "127.0.0.1", "127.0.0.1")
    assert (args.infer_steps, args.cfg_scale, args.time_shift) == (50, 9.0, 13.0)
    assert (args.num_frames, args.height, args.width, args.seed) == (204, 544, 992, 1234)
    assert (args.ulysses_degree, args.pp_degree, args.layer_split) == (8, 1, None)
    assert (args.pos_magic, args.neg_magic) == (POS_MAGIC, NEG_MAGIC)
    assert (args.output_type, args.device, args.local_models, args.latents_out) == ("mp4", "auto", False, None)
    assert parse_args(["--layer_split", "20,28"]).layer_split == [20, 28]
    for bad in ("20,x", "0,48"):
        with pytest.raises(SystemExit):
            parse_args(["--layer_split", bad])


def _model_folder(tmp_path):
    import json
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(TINY))
    return str(tmp_path)


def test_startup_checks_run_before_joining_a_job(tmp_path, monkeypatch):
    folder = _model_folder(tmp_path)
    monkeypatch.delenv("MS_ROLE", raising=False)
    with pytest.raises(StartupError, match="--prompt is required"):
        check_startup(parse_args(["--model_dir", folder]))
    with pytest.raises(StartupError, match="config.json not found"):
        check_startup(parse_args(["--model_dir", str(tmp_path / "nope"), "--prompt", "x"]))
    with pytest.raises(StartupError, match="run under msrun"):
        check_startup(parse_args(["--model_dir", folder, "--prompt", "x", "--ulysses_degree", "2"]))
    assert check_startup(parse_args(["--model_dir", folder, "--prompt", "x", "--ulysses_degree", "1"])) == TINY

    # Inside an msrun job of 6 ranks (msrun's environment), before init():
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")
    monkeypatch.setenv("MS_WORKER_NUM", "6")
    check_startup(parse_args(["--model_dir", folder, "--prompt", "x", "--ulysses_degree", "3", "--pp_degree", "2",
                              "--layer_split", "3,4"]))
    with pytest.raises(StartupError, match="layer split \\[3, 3\\] must have 2 positive entries summing to 7"):
        check_startup(parse_args(["--model_dir", folder, "--prompt", "x", "--ulysses_degree", "3",
                                  "--pp_degree", "2", "--layer_split", "3,3"]))
    with pytest.raises(StartupError, match="possible layouts are: --pp_degree 1 --cfg_parallel_degree 1 "
                                           "--tensor_parallel_degree 1 --ulysses_degree 6; --pp_degree 1 "
                                           "--cfg_parallel_degree 1 --tensor_parallel_degree 2 --ulysses_degree 3;"):
        check_startup(parse_args(["--model_dir", folder, "--prompt", "x", "--ulysses_degree", "4",
                                  "--pp_degree", "1"]))
    check_startup(parse_args(["--model_dir", folder, "--prompt", "x", "--ulysses_degree", "1",
                              "--tensor_parallel_degree", "3", "--cfg_parallel_degree", "2"]))
    with pytest.raises(SystemExit):  # argparse: CFG has two rows
        parse_args(["--cfg_parallel_degree", "3"])
    with pytest.raises(StartupError, match="--offload blocks streams whole blocks"):
        check_startup(parse_args(["--model_dir", folder, "--prompt", "x", "--ulysses_degree", "1",
                                  "--tensor_parallel_degree", "2", "--pp_degree", "3", "--offload", "blocks"]))


def test_distributed_dit_has_the_model_call_signature():
    """The pipeline calls the DiT by keyword, but positional callers must see the same order too."""
    import inspect

    from stepvideo.parallel.pipeline import DistributedDiT

    model = inspect.signature(StepVideoModel.construct).parameters
    dit = inspect.signature(DistributedDiT.__call__).parameters
    assert list(dit) == list(model)
    assert [p.default for p in dit.values()] == [p.default for p in model.values()]
