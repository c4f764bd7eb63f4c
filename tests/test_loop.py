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


def test_kernel_settings_last_for_the_run_only(monkeypatch):
    import os

    import torch

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    with loop.kernels(deterministic=True):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and not torch.backends.cudnn.benchmark
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with loop.kernels(deterministic=False):
        assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
        assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        assert torch.get_float32_matmul_precision() == ("high" if torch.cuda.is_available() else "highest")
    assert (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == before


# Calls that make the host wait for the device (on a GPU); on the CPU they are counted instead.
HOST_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__",
              "nonzero", "masked_select", "unique", "bincount"}


def _bool_index(index):
    import torch

    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_step_that_does_not_log_save_or_evaluate_reads_nothing_back_from_the_device(
        shards_dir, tmp_path, monkeypatch, precision):
    from torch.overrides import TorchFunctionMode

    from ddpdiff import dist, train

    reads: list[tuple[int, str]] = []
    current = [0]  # the step being taken, from the start of its backward to the start of the next one

    class HostReads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if current[0] and (name in HOST_READS or name == "__getitem__" and _bool_index(args[1])):
                reads.append((current[0], name))
            return func(*args, **(kwargs or {}))

    def counted(fn, name):
        def wrapper(*args, **kwargs):
            if current[0]:
                reads.append((current[0], name))
            return fn(*args, **kwargs)
        return wrapper

    for name in ("any_rank", "all_sum", "all_mean", "from_main", "all_equal"):  # collectives answered on the host
        monkeypatch.setattr(dist, name, counted(getattr(dist, name), f"dist.{name}"))
    backward = loop.backward

    def step_start(tr, *args):
        current[0] = tr.step + 1
        return backward(tr, *args)

    monkeypatch.setattr(loop, "backward", step_start)
    with HostReads():
        assert train.main(["--config", str(CONFIGS / "smoke.yaml"), "--data.shards", str(shards_dir),
                           "--run.dir", str(tmp_path / "run"), "--train.max_steps", "7", "--train.micro_batch", "3",
                           "--train.precision", precision, "--log.every_steps", "100",
                           "--checkpoint.every_steps", "100"]) == 0
    assert {s for s, _ in reads} >= {7}, "the counter saw the log step's reads"  # it can see them
    assert [(s, name) for s, name in reads if s != 7] == []  # steps 1-6 neither log, save, evaluate nor check stops


def test_no_sync_reaches_a_compiled_ddp_module(tmp_path):
    import torch
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel as DDP

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DDP(torch.nn.Linear(2, 2))
        compiled = torch.compile(ddp)  # compiles lazily: nothing runs here
        assert not isinstance(compiled, DDP)
        with loop.ddp_sync(compiled, sync=False):
            assert not ddp.require_backward_grad_sync
        with loop.ddp_sync(compiled, sync=True):
            assert ddp.require_backward_grad_sync
    finally:
        tdist.destroy_process_group()


def test_ddp_searches_unused_parameters_only_where_runs_are_bitwise():
    from types import SimpleNamespace

    import torch

    def options(backend, deterministic, model=None, world=4, micro=0):
        model = model or torch.nn.Linear(2, 2)
        cfg = config.load(CONFIGS / "smoke.yaml", ["--train.deterministic", str(deterministic).lower(),
                                                   "--train.micro_batch", str(micro)])
        return loop.ddp_options(model, SimpleNamespace(cfg=cfg, env=SimpleNamespace(world_size=world, backend=backend)))

    assert options("gloo", False) == options("nccl", True) == {"find_unused_parameters": True}
    fast = {"static_graph": True, "gradient_as_bucket_view": True, "broadcast_buffers": False}
    assert options("nccl", False) == options("gloo", False, world=2) == fast
    # accumulating (micro-batch 1 of rank 0's 2) cannot start a static graph under no_sync
    assert options("nccl", False, micro=1) == {"gradient_as_bucket_view": True, "broadcast_buffers": False}
    assert options("nccl", False, micro=2) == fast  # every rank's share in one pass
    assert options("nccl", False, model=torch.nn.BatchNorm2d(2))["broadcast_buffers"]  # running statistics


def test_the_logged_loss_is_the_mean_since_the_last_log_line_without_skipped_steps():
    from types import SimpleNamespace

    import torch

    logged = []
    monitor = SimpleNamespace(scalars=lambda step, values, **kw: logged.append((step, values, kw)))
    logger = loop.Logger(monitor, torch.device("cpu"), step=0, total=10)
    tr = SimpleNamespace(step=0, samples_seen=0, optimizer=SimpleNamespace(param_groups=[{"lr": 0.1}]),
                         scaler=torch.amp.GradScaler("cpu", enabled=False))
    ok, bad = torch.tensor([False, False]), torch.tensor([True, False])
    for losses, flags in (([1.0, 3.0], ok), ([float("nan"), 1.0], bad), ([4.0], ok), ([6.0], ok)):
        logger.record(torch.tensor(losses), flags)
        tr.step += 1
        if tr.step in (2, 4):
            logger.log(tr, 0, torch.tensor(1.0), 8, max_nonfinite=5)
    (s2, first, kw), (s4, second, _) = logged
    assert (s2, first["train/loss"], first["train/nonfinite_steps"]) == (2, 2.0, 1)  # step 2 skipped: mean of 2
    assert (s4, second["train/loss"]) == (4, 5.0)  # (4 + 6) / 2: only steps 3 and 4
    assert kw["total"] == 10 and kw["eta_s"] >= 0
    logger.record(torch.tensor([float("nan")]), bad)
    with pytest.raises(FloatingPointError, match="1 non-finite losses in a row"):
        logger.check(5, max_nonfinite=0)


class _Regression:
    """A loop task with a loss that draws no randomness: an accumulated step must give the gradient of the
    unaccumulated one up to float rounding. Its MLP is wide enough that DDP splits it into several buckets."""

    def __init__(self, cfg, env):
        self.cfg, self.env = cfg, env

    def build_model(self):
        import torch

        return torch.nn.Sequential(torch.nn.Linear(6, 300), torch.nn.Tanh(), torch.nn.Linear(300, 300),
                                   torch.nn.Tanh(), torch.nn.Linear(300, 1))

    def loss(self, model, batch, generator):
        return ((model(batch["x"]).squeeze(1) - batch["y"]) ** 2).mean(), {}


ACCUMULATION_MODES = {"static": ["--dist.fixed_buckets", "false"], "fixed_buckets": ["--dist.fixed_buckets", "true"]}


def _accumulation_rank(rank, world, store, global_batch, out):
    """One rank: the gradient of one step over the same global batch, unaccumulated and in micro-batches of 2
    (ranks' shares differ by one, so some take a partial last micro-batch), in each DDP mode `ddp_options` picks."""
    import torch
    import torch.distributed as tdist

    from ddpdiff import data, dist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", store=tdist.FileStore(store, world), rank=rank, world_size=world)
    try:
        env = dist.Env(rank, world, rank, world, torch.device("cpu"), "gloo")
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(global_batch, 6, generator=g), torch.randn(global_batch, generator=g)
        offset, n = data.share(global_batch, world, rank)
        batch = {"key": [f"k{i}" for i in range(offset, offset + n)], "x": x[offset:offset + n],
                 "y": y[offset:offset + n]}
        grads = {}
        for mode, flags in ACCUMULATION_MODES.items():
            for micro in (0, 2):
                cfg = config.load(CONFIGS / "smoke.yaml", [*flags, "--train.global_batch", str(global_batch),
                                                           "--train.micro_batch", str(micro), "--train.grad_clip", "0"])
                task = _Regression(cfg, env)
                tr = loop.setup(task)
                loop.wrap(tr, task)
                loop.backward(tr, task, batch, {})
                grads[f"{mode}/{micro}"] = [p.grad.clone() for p in tr.model.parameters()]
        torch.save(grads, out / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_an_accumulated_step_has_the_unaccumulated_gradient_on_every_rank(world, tmp_path):
    """Real DDP over gloo, one process per rank. Two ranks with micro-batches used to fail in the first backward
    (`expect_autograd_hooks_ INTERNAL ASSERT FAILED`: a static graph's first backward under no_sync)."""
    import torch
    import torch.multiprocessing as mp

    mp.start_processes(_accumulation_rank, args=(world, str(tmp_path / "store"), 11, tmp_path), nprocs=world,
                       start_method="spawn")
    grads = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for mode in ACCUMULATION_MODES:
        whole = grads[0][f"{mode}/0"]
        assert any(g.abs().max() > 0 for g in whole)
        for rank in range(world):
            assert all(torch.equal(a, b) for a, b in zip(grads[rank][f"{mode}/0"], whole)), (mode, rank)
            for a, b in zip(grads[rank][f"{mode}/2"], whole):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
