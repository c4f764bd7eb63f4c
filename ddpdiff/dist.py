"""Process-group setup and the few collectives the loop needs; the only caller of init_process_group.

Works in three launches: a plain process (world size 1), torchrun (RANK/WORLD_SIZE/LOCAL_RANK), and
srun without torchrun (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, master taken from the allocation).
"""

from __future__ import annotations

import datetime
import glob
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UsageError

# Where to get a torch build for an older driver: the CUDA version of the wheel must not exceed the driver's.
WHEELS = "https://download.pytorch.org/whl/ (e.g. pip install torch --index-url https://download.pytorch.org/whl/cu126)"


class DeviceError(UsageError):
    """The launch expects GPUs that this process cannot use; the message says why and how to fix it."""


@dataclass(frozen=True)
class Env:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = "none"


_env = Env()


def _launch_env() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from torchrun's or SLURM's variables."""
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        world = int(e["WORLD_SIZE"])
        return int(e["RANK"]), world, int(e.get("LOCAL_RANK", 0)), int(e.get("LOCAL_WORLD_SIZE", world))
    if "SLURM_PROCID" in e and int(e.get("SLURM_NTASKS", "1")) > 1:
        world = int(e["SLURM_NTASKS"])
        local_world = world // int(e.get("SLURM_NNODES", "1"))
        if "MASTER_ADDR" not in e:
            nodes = subprocess.run(["scontrol", "show", "hostnames", e["SLURM_JOB_NODELIST"]],
                                   capture_output=True, text=True, check=True).stdout.split()
            os.environ["MASTER_ADDR"] = nodes[0]
        os.environ.setdefault("MASTER_PORT", str(20000 + int(e.get("SLURM_JOB_ID", "0")) % 20000))
        return int(e["SLURM_PROCID"]), world, int(e.get("SLURM_LOCALID", 0)), local_world
    return 0, 1, 0, 1


def expects_gpus() -> str | None:
    """What says this launch is meant for GPUs (None: nothing does): a GPU allocation by SLURM, devices named
    by CUDA_VISIBLE_DEVICES, or a torchrun rank on a machine with NVIDIA devices."""
    e = os.environ
    if e.get("SLURM_GPUS_ON_NODE", "0") not in ("", "0"):
        return f"SLURM_GPUS_ON_NODE={e['SLURM_GPUS_ON_NODE']}"
    if e.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={e['CUDA_VISIBLE_DEVICES']}"
    if "LOCAL_RANK" in e and glob.glob("/dev/nvidia[0-9]*"):
        return "a torchrun rank on a machine with NVIDIA devices (/dev/nvidia*)"
    return None


def _cuda_problem() -> str | None:
    """Why CUDA cannot be used in this process, or None when it can."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as e:  # the driver's or runtime's reason, e.g. "The NVIDIA driver on your system is too old"
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}): {' '.join(str(e).split())[:200]}"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"


def pick_device(wanted: str = "auto", local_rank: int = 0) -> torch.device:
    """This rank's device. `auto`: the GPU when CUDA works, else the CPU, unless the launch expects GPUs
    (`expects_gpus`): then a CUDA problem is an error, never a silent CPU run. The GPU is `local_rank` modulo
    the visible GPUs, so a task that SLURM binds to one GPU (which it sees as cuda:0) finds it."""
    if wanted == "cpu":
        return torch.device("cpu")
    problem = _cuda_problem()
    if problem is not None:
        reason = "dist.device=cuda" if wanted == "cuda" else expects_gpus()
        if reason is None:
            return torch.device("cpu")
        raise DeviceError(f"{reason} asks for GPUs, but CUDA is unusable: {problem}. Install a torch build "
                          f"for this driver from {WHEELS}, or run on the CPU with --dist.device cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def cpus_per_rank(local_world_size: int = 1) -> int:
    """The CPUs this rank may use: SLURM_CPUS_PER_TASK (else the CPUs this process may run on), shared by the
    ranks torchrun starts inside one task."""
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or len(os.sched_getaffinity(0)))
    sharing = local_world_size if "TORCHELASTIC_RUN_ID" in os.environ else 1
    return max(1, cpus // sharing)


def job_id() -> str | None:
    """What a launcher keeps when it starts the training again with the same arguments: the SLURM job (a
    requeue keeps its id), else torchrun's run (`--rdzv_id`; `--standalone` draws one per launch), which its
    `--max-restarts` restarts keep. None for a plain process: nothing restarts it."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"SLURM_JOB_ID={os.environ['SLURM_JOB_ID']}"
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"TORCHELASTIC_RUN_ID={os.environ['TORCHELASTIC_RUN_ID']}"
    return None


def stop_with_launcher(poll_s: float = 1.0) -> threading.Thread:
    """Send this process SIGTERM once its launcher (torchrun's agent) is gone: torchrun starts ranks in sessions
    of their own, so a SIGKILLed agent would leave them training and writing checkpoints on their own. The
    SIGTERM takes the usual path: every rank stops at one step and saves."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
    thread = threading.Thread(target=watch, name="stop-with-launcher", daemon=True)
    thread.start()
    return thread


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, the ranks' store with keys of this restart attempt only; None elsewhere (the default).

    torchrun's c10d rendezvous hands every attempt of `--max-restarts` the same store and torch adds no
    per-attempt prefix, so a restarted group could read the killed attempt's gloo/NCCL addresses and fail
    with "Connection refused" (tests/test_train.py::test_torchrun_max_restarts_...)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    return dist.PrefixStore(f"ddpdiff/attempt_{attempt}/", store)


def init(timeout_s: int = 600, device: str = "auto") -> Env:
    """Join the process group (NCCL on GPUs, gloo on the CPU) on this rank's device (`pick_device`)."""
    global _env
    rank, world, local_rank, local_world = _launch_env()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        stop_with_launcher()
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
        # Ranks on one host share its cores: oversubscribed OpenMP threads spin and slow every rank down.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(cpus_per_rank(local_world))
    # Under torchrun even one rank joins a group, so its collectives take the real (NCCL) path.
    if world > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, store=_attempt_store(rank, world, timeout), rank=rank,
                                world_size=world, timeout=timeout, device_id=dev if backend == "nccl" else None)
    else:
        backend = "none"
    _env = Env(rank, world, local_rank, local_world, dev, backend)
    return _env


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device`, else the GPU when there is one, else the CPU (for single-process tools)."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def env() -> Env:
    return _env


def rank() -> int:
    return _env.rank


def world_size() -> int:
    return _env.world_size


def is_main() -> bool:
    return _env.rank == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    """All-reduce a copy of a CPU tensor (moved to the GPU and back under NCCL)."""
    out = t.detach().clone()
    if dist.is_initialized():
        if _env.backend == "nccl":
            out = out.to(_env.device)
        dist.all_reduce(out, op=op)
    return out.cpu()


def any_rank(*flags: bool) -> bool | tuple[bool, ...]:
    """Each flag is True on every rank if it is True on any rank: decisions all ranks take together."""
    out = _all_reduce(torch.tensor([int(f) for f in flags]), dist.ReduceOp.MAX if dist.is_initialized() else None)
    result = tuple(bool(v) for v in out.tolist())
    return result[0] if len(result) == 1 else result


def all_sum(values: torch.Tensor) -> torch.Tensor:
    return _all_reduce(values, dist.ReduceOp.SUM if dist.is_initialized() else None)


def all_mean(values: torch.Tensor) -> torch.Tensor:
    return all_sum(values) / _env.world_size


def from_main(value: int) -> int:
    """Rank 0's integer on every rank (values below -2**62 are reserved)."""
    mine = value if is_main() else -2**62
    return int(_all_reduce(torch.tensor([mine], dtype=torch.int64),
                           dist.ReduceOp.MAX if dist.is_initialized() else None).item())


def all_equal(value: int) -> bool:
    """Whether every rank holds the same integer."""
    both = _all_reduce(torch.tensor([value, -value], dtype=torch.int64),
                       dist.ReduceOp.MAX if dist.is_initialized() else None)
    return both[0].item() == value and -both[1].item() == value


def cleanup() -> None:
    global _env
    if dist.is_initialized():
        dist.destroy_process_group()
    _env = Env()
