"""Training pieces that need no process group: batch order, per-rank shares, checkpoint discovery, launch flags."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser

from markup2image.config import DiffusionConfig, params_from_dict
from markup2image.training.checkpoints import COMPLETE, newest_checkpoint, prune_checkpoints, run_fingerprint
from markup2image.training.determinism import (
    BatchIndexer,
    draw_noise,
    draw_timestep,
    extras_generator,
    micro_batch_share,
)
from markup2image.training.launch import MACHINE_RANK_ENV, LaunchPlan, launch_command, launch_env, preflight
from markup2image.training.live import prune_live_after
from markup2image.training.loop import _accumulate_terms
from markup2image.training.synthetic import tiny_params_dict

REPO = Path(__file__).resolve().parents[2]


def _params(**train):
    return params_from_dict(tiny_params_dict(**train))


# -- batches ----------------------------------------------------------------------------------------------------


def test_batch_indexer_is_deterministic_and_seeded():
    a, b, other = BatchIndexer(10, seed=3), BatchIndexer(10, seed=3), BatchIndexer(10, seed=4)
    assert all(np.array_equal(a(s, 4), b(s, 4)) for s in range(7))
    assert not all(np.array_equal(a(s, 4), other(s, 4)) for s in range(3))
    assert np.array_equal(BatchIndexer(10, 3)(5, 4), a(5, 4))  # stateless in the step: a resume needs no state


def test_batch_indexer_visits_every_item_once_per_epoch():
    n, bs = 10, 4
    idx = BatchIndexer(n, seed=0)
    flat = np.concatenate([idx(s, bs) for s in range(5)])  # 20 positions = two epochs, batches straddle them
    assert sorted(flat[:n].tolist()) == list(range(n))
    assert sorted(flat[n : 2 * n].tolist()) == list(range(n))
    assert not np.array_equal(flat[:n], flat[n : 2 * n])  # a new permutation each epoch


@pytest.mark.parametrize(("world", "grad_accum"), [(2, 1), (1, 2), (2, 2), (4, 2)])
def test_shares_put_together_equal_the_one_process_batch(world, grad_accum):
    """Any split over processes and micro-steps sees the same items with the same noise as 1 process, 1 micro-step."""
    shape, t_max, step = (1, 16, 32), DiffusionConfig(num_train_timesteps=1000), 3
    one_cfg = _params(batch_size=8).train
    cfg = _params(batch_size=8, grad_accum=grad_accum, num_processes=world).train
    gidx = BatchIndexer(16, seed=0)(step, cfg.batch_size)
    whole = micro_batch_share(one_cfg, gidx, step, 0, 0, 1, shape, t_max)
    shares = [
        micro_batch_share(cfg, gidx, step, micro, rank, world, shape, t_max)
        for micro in range(grad_accum)
        for rank in range(world)
    ]
    assert all(len(s.indices) == 8 // (world * grad_accum) for s in shares)
    assert np.array_equal(whole.indices, gidx)
    assert np.array_equal(np.concatenate([s.indices for s in shares]), whole.indices)
    assert torch.equal(torch.cat([s.noise for s in shares]), whole.noise)
    assert torch.equal(torch.cat([s.timesteps for s in shares]), whole.timesteps)
    noise, timesteps = draw_noise(step, cfg.seed, np.arange(8), shape, t_max)  # the global draw
    assert torch.equal(whole.noise, noise) and torch.equal(whole.timesteps, timesteps)


@pytest.mark.parametrize(("world", "grad_accum"), [(2, 1), (4, 2)])
def test_negative_pool_is_the_global_micro_batch_holding_every_share(world, grad_accum):
    """Each process's negative pool is micro-batch ``micro`` of the global batch: the union of all processes'
    shares of it (so K may exceed a process's share); one process, or an objective without negatives, has none."""
    from types import SimpleNamespace

    from markup2image.training.loop import _negative_pool

    items = [(torch.full((1, 2, 2), float(i)), torch.tensor([i + 1]), 100 + i) for i in range(16)]
    run = SimpleNamespace(dataset=items, net=SimpleNamespace(pad_id=0))
    raw = tiny_params_dict()
    raw["train"] |= {"batch_size": 8, "grad_accum": grad_accum, "num_processes": world, "objective": "cdcd"}
    raw["train"]["num_negatives"] = 8 // grad_accum - 1
    params = params_from_dict(raw)
    cfg = params.train
    gidx = BatchIndexer(16, seed=0)(5, cfg.batch_size)
    for micro in range(grad_accum):
        pool = _negative_pool(run, params, gidx, micro, world, "cpu")
        diffusion = DiffusionConfig()
        shares = [micro_batch_share(cfg, gidx, 5, micro, r, world, (1, 2, 2), diffusion).indices for r in range(world)]
        union = np.concatenate(shares)
        assert pool.markup_keys.tolist() == [100 + int(i) for i in union]
        assert pool.images[:, 0, 0, 0].tolist() == [float(i) for i in union]
        assert cfg.num_negatives >= len(shares[0])  # more negatives than one process holds
    assert _negative_pool(run, params, gidx, 0, 1, "cpu") is None
    raw["train"]["objective"] = "ddpm"
    assert _negative_pool(run, params_from_dict(raw), gidx, 0, world, "cpu") is None


def test_noise_differs_between_steps_items_and_seeds():
    n0, t0 = draw_noise(0, 0, np.arange(64), (1, 4, 4), DiffusionConfig())
    n1, _ = draw_noise(1, 0, np.arange(64), (1, 4, 4), DiffusionConfig())
    n2, _ = draw_noise(0, 1, np.arange(64), (1, 4, 4), DiffusionConfig())
    assert not torch.equal(n0, n1) and not torch.equal(n0, n2)
    assert len({tuple(x.flatten().tolist()) for x in n0}) == 64  # every item its own noise
    assert t0.min() >= 0 and t0.max() < 1000 and len(set(t0.tolist())) > 32
    assert abs(float(n0.mean())) < 0.2 and abs(float(n0.std()) - 1) < 0.1


def _timesteps(cfg: DiffusionConfig, n: int = 4000) -> np.ndarray:
    return np.array([draw_timestep(torch.Generator().manual_seed(i), cfg) for i in range(n)])


def test_uniform_timesteps_are_ddpms_randint_stream():
    """``uniform`` draws exactly ``torch.randint(0, T)`` from the item's generator (runs before the option agree)."""
    want = [int(torch.randint(0, 1000, (1,), generator=torch.Generator().manual_seed(i))[0]) for i in range(50)]
    assert _timesteps(DiffusionConfig(), 50).tolist() == want


def test_shifted_and_logit_normal_timesteps_follow_their_densities():
    """SD3's shift: ``P(t < T x) = x / (s - (s - 1) x)`` (the inverse of ``u -> s u / (1 + (s - 1) u)``), so s = 3
    puts a quarter of the draws below T/2 where uniform puts half; logit-normal(1, 1) has its median at
    ``T sigmoid(1)``; both stay in 0..T-1 and still reach the low-noise end."""
    shifted = _timesteps(DiffusionConfig(timestep_sampling="shifted", timestep_shift=3.0))
    assert shifted.min() >= 0 and shifted.max() <= 999 and shifted.min() < 50
    for x in (0.1, 0.5, 0.9):
        assert abs((shifted < 1000 * x).mean() - x / (3 - 2 * x)) < 0.03
    same = _timesteps(DiffusionConfig(timestep_sampling="shifted", timestep_shift=1.0))
    assert abs((same < 500).mean() - 0.5) < 0.03  # s = 1 is uniform
    logit = _timesteps(DiffusionConfig(timestep_sampling="logit_normal", timestep_logit_mean=1.0))
    assert abs(np.median(logit) - 1000 / (1 + np.exp(-1.0))) < 15
    assert logit.min() >= 0 and logit.max() <= 999


def test_extras_generator_is_per_rank_and_reproducible():
    draw = lambda rank: torch.rand(8, generator=extras_generator(0, 5, 0, rank))  # noqa: E731
    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


def test_accumulated_terms_have_every_quartile_key_on_every_rank():
    acc: dict = {}
    _accumulate_terms(acc, {"loss": 1.0, "per_item": torch.tensor([2.0, 4.0])}, torch.tensor([10, 20]), 1000)
    assert set(acc) == {"loss", "loss_t_q1", "loss_t_q2", "loss_t_q3", "loss_t_q4"}  # keys line up for all-reduce
    assert acc["loss_t_q1"] == (6.0, 2) and acc["loss_t_q4"] == (0.0, 0)


# -- checkpoints --------------------------------------------------------------------------------------------------


def _fake_checkpoint(folder: Path, name: str, complete: bool) -> Path:
    p = folder / name
    p.mkdir(parents=True)
    (p / "trainer_state.json").write_text(json.dumps({"step": int(name.rsplit("_", 1)[1])}))
    (p / "model.safetensors").write_bytes(b"w" * 10)
    if complete:
        files = {f.name: f.stat().st_size for f in p.iterdir()}
        (p / COMPLETE).write_text(json.dumps({"files": files}))
    return p


def test_newest_checkpoint_ignores_half_written_ones(tmp_path):
    assert newest_checkpoint(tmp_path / "missing") is None
    _fake_checkpoint(tmp_path, "step_00000002", complete=True)
    want = _fake_checkpoint(tmp_path, "step_00000004", complete=True)
    _fake_checkpoint(tmp_path, "step_00000006", complete=False)  # renamed but no marker
    _fake_checkpoint(tmp_path, ".tmp_step_00000008", complete=True)  # never renamed
    assert newest_checkpoint(tmp_path) == want


def test_a_damaged_checkpoint_is_skipped_with_one_line(tmp_path, caplog):
    older = _fake_checkpoint(tmp_path, "step_00000002", complete=True)
    cut = _fake_checkpoint(tmp_path, "step_00000004", complete=True)
    gone = _fake_checkpoint(tmp_path, "step_00000006", complete=True)
    (cut / "model.safetensors").write_bytes(b"w")  # cut short after the save
    (gone / "model.safetensors").unlink()  # deleted
    with caplog.at_level("WARNING"):
        assert newest_checkpoint(tmp_path) == older
    lines = [r.getMessage() for r in caplog.records]
    assert any("step_00000006" in m and "model.safetensors is missing" in m for m in lines)
    assert any("step_00000004" in m and "has 1 bytes, 10 when saved" in m for m in lines)


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, f"step_{step:08d}", complete=True)
    _fake_checkpoint(tmp_path, "step_00000003", complete=False)
    _fake_checkpoint(tmp_path, ".tmp_step_00000005", complete=False)
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000006"]


def test_fingerprint_ignores_layout_and_io_but_not_the_maths():
    base = run_fingerprint(_params(), "math")
    assert run_fingerprint(_params(checkpoint_every=1, log_every=3, sample_every=2, num_processes=2), "math") == base
    assert run_fingerprint(_params(lr=0.01), "math") != base
    assert run_fingerprint(_params(mixed_precision="bf16"), "math") != base


def test_prune_live_drops_rows_and_images_after_the_resume_step(tmp_path):
    tsv = tmp_path / "plots/metrics/train/loss.tsv"
    tsv.parent.mkdir(parents=True)
    tsv.write_text("step\tloss\n1\t0.9\n2\t0.8\n3\t0.7\n")
    images = tmp_path / "plots/images/samples"
    images.mkdir(parents=True)
    for s in (2, 3):
        (images / f"step_{s:08d}.png").write_bytes(b"png")
    prune_live_after(tmp_path, 2)
    assert tsv.read_text() == "step\tloss\n1\t0.9\n2\t0.8\n"
    assert [p.name for p in images.iterdir()] == ["step_00000002.png"]


# -- launch -----------------------------------------------------------------------------------------------------


def _parsed(cmd: list[str]):
    """accelerate's own parser over the flags we build (everything after ``-m accelerate.commands.launch``)."""
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    return launch_command_parser().parse_args(cmd[3:])


def test_launch_one_cpu_process():
    params = _params()
    cmd = launch_command(params, "stages/train.py", ["--domain", "math"], plan=preflight(params, gpus=0))
    args = _parsed(cmd)
    assert args.cpu and not args.multi_gpu and args.num_processes == 1 and args.mixed_precision == "no"
    assert args.training_script == "stages/train.py" and args.training_script_args == ["--domain", "math"]


def test_launch_two_cpu_processes_use_multi_gpu_flag_with_gloo():
    params = _params(num_processes=2)
    plan = preflight(params, gpus=0)
    args = _parsed(launch_command(params, "train.py", [], plan=plan))
    assert args.multi_gpu and not args.cpu and args.num_processes == 2 and args.main_process_port == 0
    assert plan.cpu and launch_env(plan, {})["CUDA_VISIBLE_DEVICES"] == ""


def test_launch_gpus_with_bf16():
    params = _params(num_processes=4, mixed_precision="bf16")
    plan = preflight(params, gpus=8, bf16_supported=True)
    args = _parsed(launch_command(params, "train.py", [], plan=plan))
    assert args.multi_gpu and args.num_processes == 4 and args.mixed_precision == "bf16"
    assert not plan.cpu and "CUDA_VISIBLE_DEVICES" not in launch_env(plan, {})
    one = _parsed(launch_command(_params(), "train.py", [], plan=preflight(_params(), gpus=1)))
    assert not one.cpu and not one.multi_gpu and one.num_processes == 1


def test_launch_from_config_file_passes_machine_rank(monkeypatch):
    config = REPO / "configs/accelerate/2_nodes_8_gpus.yaml"
    params = _params(accelerate_config=str(config), batch_size=64)
    monkeypatch.setenv(MACHINE_RANK_ENV, "1")
    plan = preflight(params, gpus=8, bf16_supported=True)
    assert plan == LaunchPlan(processes=16, machines=2, cpu=False, mixed_precision="no", config_file=str(config))
    args = _parsed(launch_command(params, "train.py", ["--x"], plan=plan))
    assert args.config_file == str(config) and args.machine_rank == 1 and args.num_processes is None
    assert args.mixed_precision == "no"  # params decide, not the file


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs/accelerate").glob("*.yaml")))
def test_example_accelerate_configs_load(name):
    cfg = load_config_from_file(str(REPO / "configs/accelerate" / name))  # accelerate's own loader
    assert cfg.num_processes >= 2 and cfg.distributed_type in ("MULTI_GPU", "MULTI_CPU")
    assert cfg.num_processes % cfg.num_machines == 0


def test_code_fingerprint_follows_the_package_sources(tmp_path, monkeypatch):
    import markup2image
    from markup2image.training.checkpoints import code_fingerprint

    assert code_fingerprint() == code_fingerprint()
    (tmp_path / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(markup2image, "__file__", str(tmp_path / "__init__.py"))
    before = code_fingerprint()
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_fingerprint() != before
