import pytest

from ddpdiff import config, loop

from conftest import CONFIGS


def test_lr_warmup_then_cosine_to_zero():
    t = config.TrainConfig(lr=1.0, warmup_steps=4, lr_schedule="cosine")
    assert [loop.lr_at(s, 12, t) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert loop.lr_at(4, 12, t) == 1.0
    assert loop.lr_at(8, 12, t) == pytest.approx(0.5)
    assert loop.lr_at(12, 12, t) == pytest.approx(0.0)
    assert loop.lr_at(100, 12, config.TrainConfig(lr=0.3)) == 0.3


def test_step_seeds_differ_by_step_rank_and_micro_batch_and_repeat():
    seeds = {loop.step_seed(0, s, r, m) for s in range(5) for r in range(3) for m in range(2)}
    assert len(seeds) == 30
    assert loop.step_seed(1, 2, 3, 0) == loop.step_seed(1, 2, 3, 0)


def test_micro_batches_split_every_field():
    batch = {"key": list("abcdef"), "image": list(range(6))}
    parts = list(loop.micro_batches(batch, 4))
    assert [p["key"] for p in parts] == [list("abcd"), list("ef")]
    assert parts[1]["image"] == [4, 5]


def test_loss_weights_make_the_ddp_average_the_global_batch_mean():
    import torch

    from ddpdiff.data import share

    torch.manual_seed(0)
    w = torch.randn(3, requires_grad=True)
    x, y = torch.randn(10, 3), torch.randn(10)
    full = torch.autograd.grad(((x @ w - y) ** 2).mean(), w)[0]
    world, global_batch, rank_grads = 3, 10, []
    for r in range(world):
        offset, n = share(global_batch, world, r)
        xr, yr = x[offset:offset + n], y[offset:offset + n]
        grad = torch.zeros(3)
        for part in (slice(0, 2), slice(2, n)):  # micro-batches of unequal size
            loss = ((xr[part] @ w - yr[part]) ** 2).mean()
            grad += torch.autograd.grad(loss * loop.loss_weight(len(yr[part]), world, global_batch), w)[0]
        rank_grads.append(grad)
    assert [share(10, 3, r) for r in range(3)] == [(0, 4), (4, 3), (7, 3)]
    torch.testing.assert_close(sum(rank_grads) / world, full)


def test_weight_decay_skips_norms_biases_embeddings_and_null_conditions():
    import torch

    from ddpdiff import models

    model = models.build_model(config.load(CONFIGS / "smoke.yaml").model, image_size=32, cond_dim=8, token_dim=8,
                               null_tokens=torch.zeros(2, 8))
    decayed, plain = loop.param_groups(model, 0.05)
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert decayed_names and all(n.endswith("weight") and "norm" not in n for n in decayed_names)
    assert {"null", "input.bias"} <= plain_names and any("norm" in n for n in plain_names)
    assert decayed_names | plain_names == set(names.values()) and not decayed_names & plain_names


def test_loader_workers_fit_the_cpus_slurm_gave(shards_dir, monkeypatch, capsys):
    from ddpdiff import dist, train

    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    cfg = config.load(CONFIGS / "smoke.yaml", ["--data.shards", str(shards_dir), "--data.workers", "8"])
    task = train.DiffusionTask(cfg, dist.Env(local_world_size=8))
    assert loop.loader_workers(task) == 8  # outside SLURM the setting stands
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "32")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert loop.loader_workers(task) == 3  # 4 CPUs per rank: the rank and 3 workers
    assert "data.workers 8 capped to 3: 4 CPUs per rank (SLURM_CPUS_PER_TASK=32)" in capsys.readouterr().out


def test_deterministic_mode_lasts_for_the_run_only(monkeypatch):
    import os

    import torch

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with loop.deterministic(True):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
