"""Shared fixtures: small synthetic CelebA folders and shards, built once per test session."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Iterator, Self

import numpy as np
import pytest

# One thread per process: the suite starts several processes on a 2-core machine, and OpenMP threads that
# outnumber the cores spin-wait and run many times slower. Subprocesses inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"
# Every process a test starts carries this variable, with a value of its own, into all it starts in turn:
# torchrun's workers (which it puts in sessions of their own) and processes orphaned on the way are found by it.
PROC_TAG = "DDPDIFF_TEST_PROC"
_tags = itertools.count()


def running(pid: int) -> bool:
    """Whether a process exists and has not exited (an exited orphan may stay a zombie in a container)."""
    try:
        return "(zombie)" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _tagged(tag: str) -> list[int]:
    """Running processes whose environment holds PROC_TAG=tag."""
    marker, pids = f"{PROC_TAG}={tag}".encode(), []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0") and running(int(environ.parent.name)):
                pids.append(int(environ.parent.name))
        except OSError:
            continue
    return pids


class Proc:
    """A process a test started, in a session of its own, with stdout and stderr read by a thread so that
    every read has a deadline."""

    def __init__(self, cmd, env=None, **kw):
        self.tag = f"{os.getpid()}-{next(_tags)}"
        env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1", **{PROC_TAG: self.tag})
        self.popen = subprocess.Popen(list(map(str, cmd)), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True, **kw)
        self.pid, self.lines = self.popen.pid, []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.popen.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def _next(self, deadline: float) -> str | None:
        """The next line, None at the end of the output; raises queue.Empty at the deadline."""
        line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        if line is not None:
            self.lines.append(line)
        return line

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def read_until(self, pattern: str, timeout: float) -> str:
        """The output up to the first line matching `pattern` (a regex, searched); fails the test with what was
        read if the output ends or the deadline passes first."""
        deadline, start = time.monotonic() + timeout, len(self.lines)
        try:
            while (line := self._next(deadline)) is not None:
                if re.search(pattern, line):
                    return "".join(self.lines[start:])
            why = "the output ended"
        except queue.Empty:
            why = f"none came within {timeout:g} s"
        raise AssertionError(f"no line matching {pattern!r} ({why}); output:\n{self.output[-5000:]}")

    def wait(self, timeout: float) -> str:
        """All the output once the process has ended; fails the test with what was read if it runs past the
        deadline (the `procs` fixture kills it)."""
        deadline = time.monotonic() + timeout
        try:
            while self._next(deadline) is not None:
                pass
            self.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except (queue.Empty, subprocess.TimeoutExpired):
            raise AssertionError(f"still running after {timeout:g} s; output:\n{self.output[-5000:]}") from None
        return self.output

    def pids(self) -> list[int]:
        """The process and every running process it started, wherever they were moved."""
        return sorted(set(_tagged(self.tag)) | ({self.pid} if running(self.pid) else set()))

    def kill(self) -> None:
        """SIGKILL the whole tree, until none of it runs (a process may start another while it is killed)."""
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        self.popen.wait()


class Procs:
    """The processes a test starts; all of them, and all they started, are killed when it ends."""

    def __init__(self):
        self.started: list[Proc] = []

    def start(self, cmd, **kw) -> Proc:
        self.started.append(Proc(cmd, **kw))
        return self.started[-1]

    def torchrun(self, nproc: int, args, launcher=(), **kw) -> Proc:
        """`torchrun --standalone` (a free port for its store each time) with nproc ranks of `args`, a module
        and its arguments."""
        return self.start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           nproc, *launcher, "-m", *args], **kw)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.started:
            proc.kill()


@pytest.fixture
def procs():
    """`procs.start(cmd)` / `procs.torchrun(n, args)`: processes with deadline reads (`Proc.read_until`,
    `Proc.wait`), each killed with every process it started when the test ends, passed or failed."""
    with Procs() as started:
        yield started


@contextlib.contextmanager
def agent_store() -> Iterator[dict[str, str]]:
    """The variables that make `dist.init` in processes a test spawns join a store this process serves on a
    port the OS picked, as torchrun's agent serves its ranks (`TORCHELASTIC_USE_AGENT_STORE`): no fixed port,
    and none that could be taken between choosing it and binding it."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    try:
        yield {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True",
               "TORCHELASTIC_RESTART_COUNT": "0"}
    finally:
        del store


@pytest.fixture(scope="session")
def noflock_fs(tmp_path_factory) -> Path:
    """tests/noflock_fs.c built with cc against libfuse3; the test skips where that or FUSE is missing
    (.ci/run installs fuse3, libfuse3-dev and pkg-config)."""
    missing = [t for t in ("cc", "pkg-config", "fusermount3") if shutil.which(t) is None]
    if missing or not Path("/dev/fuse").exists():
        pytest.skip(f"no FUSE to mount a filesystem that refuses flock: missing {', '.join(missing) or '/dev/fuse'}")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True)
    if flags.returncode != 0:
        pytest.skip(f"no libfuse3 development files (pkg-config fuse3: {flags.stderr.strip()})")
    binary = tmp_path_factory.mktemp("noflock") / "noflock_fs"
    subprocess.run(["cc", "-O1", "-o", binary, REPO / "tests" / "noflock_fs.c", *flags.stdout.split()], check=True)
    return binary


@pytest.fixture
def refusing_flock(noflock_fs, tmp_path, procs):
    """`refusing_flock(errno)`: a directory on a FUSE filesystem whose flock fails with `errno`, as run
    directories do on NFS without lockd (ENOLCK) or Lustre mounted noflock (ENOSYS); unmounted when the test
    ends, before `procs` kills the filesystem's process."""
    mounts = []

    def mount(errno: int) -> Path:
        backing, point = tmp_path / f"backing{len(mounts)}", tmp_path / f"mnt{len(mounts)}"
        backing.mkdir()
        point.mkdir()
        proc = procs.start([noflock_fs, errno, backing, point, "-f", "-s"])
        mounts.append(point)
        deadline = time.monotonic() + 30
        while not os.path.ismount(point):
            if proc.returncode is not None:
                pytest.skip(f"cannot mount FUSE here: {proc.wait(timeout=5).strip()}")
            assert time.monotonic() < deadline, f"{point} not mounted after 30 s: {proc.output}"
            time.sleep(0.05)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True)


def load_tool(name: str):
    """A script in tools/ imported as a module (tools/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def float_batch(batch: dict) -> dict:
    """A loader batch in the float32 form batches had before they kept uint8 and float16 (the conversion
    `data.batch.to_torch` made on the host until then): what converting on the device must match bit for bit."""
    out = dict(batch)
    out["image"] = torch.empty(batch["image"].shape).copy_(batch["image"]).div_(127.5).sub_(1)
    out.update({k: v.float() for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dtype == torch.float16})
    return out


def overfit_losses(model, cond: dict, size: int, lr: float, steps: int) -> list[float]:
    """Diffusion losses while fitting one fixed batch (same t and noise every step), for the overfit tests."""
    import torch.nn.functional as F

    from ddpdiff.config import DiffusionConfig
    from ddpdiff.diffusion import Diffusion

    x0 = F.interpolate(torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1, size=size,
                       mode="bilinear")
    diff = Diffusion(DiffusionConfig(timesteps=100))
    drop = torch.tensor([True, False, False, False])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = diff.loss(lambda x_t, t: model(x_t, t, cond, drop), x0, generator=torch.Generator().manual_seed(0))[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="session")
def make_shards():
    return load_tool("make_shards")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def celeba_root(tmp_path_factory) -> Path:
    """A 48-image synthetic CelebA root in the official layout."""
    from ddpdiff import synthetic

    return synthetic.make(tmp_path_factory.mktemp("celeba"), num=48, seed=0, workers=1, progress=False)


def as_kaggle(official: Path, root: Path) -> Path:
    """A CelebA root in the official layout copied as Kaggle ships CelebA: CSV annotations with a header line,
    no identity file, the images in a nested img_align_celeba/img_align_celeba/."""
    from ddpdiff import celeba

    attr = (official / celeba.ATTR_FILE).read_text().splitlines()
    rows = [",".join(["image_id", *attr[1].split()])] + [",".join(line.split()) for line in attr[2:]]
    root.mkdir(parents=True, exist_ok=True)
    (root / celeba.KAGGLE_ATTR_FILE).write_text("\n".join(rows) + "\n")
    part = [",".join(line.split()) for line in (official / celeba.PARTITION_FILE).read_text().splitlines()]
    (root / celeba.KAGGLE_PARTITION_FILE).write_text("\n".join(["image_id,partition", *part]) + "\n")
    shutil.copytree(official / celeba.IMAGE_DIR, root / celeba.IMAGE_DIR / celeba.IMAGE_DIR)
    return root


@pytest.fixture(scope="session")
def shards_dir(celeba_root, tmp_path_factory) -> Iterator[Path]:
    """Shards of `celeba_root` with the tiny random CLIP and token states, 8 samples per shard."""
    from ddpdiff import shards

    out = tmp_path_factory.mktemp("shards")
    shards.write_shards(celeba_root, out, clip_model="tiny", clip_pretrained="none", samples_per_shard=8,
                        workers=0, clip_batch_size=16, progress=False)
    made = _listing(out)
    yield out
    # Tests compare other shards with these byte for byte: one that writes here (e.g. FID statistics beside
    # the shards) must use `shards_copy`.
    assert _listing(out) == made, f"a test changed the session's shards in {out}; use the shards_copy fixture"


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def shards_copy(shards_dir, tmp_path):
    """A copy of `shards_dir` a test may write into."""
    shutil.copytree(shards_dir, tmp_path / "s")
    return tmp_path / "s"


def rewrite_tar(tar_path, change) -> None:
    """Rewrite a shard member by member through change(name, data) -> (name, data), in the same order."""
    with tarfile.open(tar_path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            name, data = change(name, data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.fixture
def damaged(shards_copy):
    """`shards_copy` with four unusable samples in train-000000.tar, each damaged in another way, and the
    keys of those samples with how the reader's line about each must start."""
    keys = sorted({m.split(".")[0] for m in tarfile.open(shards_copy / "train" / "train-000000.tar").getnames()})
    damage = {f"{keys[1]}.img.npy": (lambda d: d[:-10], "img.npy: 12278 bytes of array data, but its header says "
                                                        "12288"),
              f"{keys[3]}.jpg": (lambda d: d[:400], "jpg: cannot decode"),
              f"{keys[5]}.txt": (lambda d: b"\xff" + d, "txt: not UTF-8 text"),
              f"{keys[6]}.clip_text.npy": (lambda d: npy_bytes(np.full(64, np.nan, np.float16)),
                                           "clip_text.npy: NaN or infinite values")}
    rewrite_tar(shards_copy / "train" / "train-000000.tar",
             lambda name, data: (name, damage[name][0](data) if name in damage else data))
    return shards_copy, {name.split(".")[0]: f"{shards_copy}/train/train-000000.tar: {name.split('.')[0]}."
                         + damage[name][1] for name in damage}


@pytest.fixture(scope="session")
def diffusion_run(shards_dir, tmp_path_factory) -> Path:
    """A 2-step smoke diffusion run on `shards_dir`."""
    from ddpdiff import train

    out = tmp_path_factory.mktemp("diffusion")
    assert train.main(["--config", str(CONFIGS / "smoke.yaml"), "--data.shards", str(shards_dir),
                       "--run.dir", str(out), "--train.max_steps", "2"]) == 0
    return out


@pytest.fixture(scope="session")
def classifier_run(shards_dir, tmp_path_factory) -> Path:
    """A 4-step smoke attribute classifier on `shards_dir`."""
    from ddpdiff import train_classifier

    out = tmp_path_factory.mktemp("classifier")
    assert train_classifier.main(["--config", str(CONFIGS / "classifier_smoke.yaml"), "--data.shards",
                                  str(shards_dir), "--run.dir", str(out), "--classifier.eval_every_steps", "0"]) == 0
    return out


@pytest.fixture(scope="session")
def sr_run(shards_dir, tmp_path_factory) -> Path:
    """A 2-step x8 SRResNet run on `shards_dir`."""
    from ddpdiff import train_sr

    out = tmp_path_factory.mktemp("sr")
    assert train_sr.main(["--config", str(CONFIGS / "sr_smoke.yaml"), "--data.shards", str(shards_dir),
                          "--run.dir", str(out), "--train.max_steps", "2", "--sr.eval_every_steps", "0"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_quick_gelu(tmp_path_factory) -> Path:
    """The tiny CLIP config with "quick_gelu": true, as open_clip's -quickgelu configs have it."""
    import json

    from ddpdiff import clip

    path = tmp_path_factory.mktemp("clip") / "tiny-quickgelu.json"
    path.write_text(json.dumps(json.loads((clip.CONFIG_DIR / "tiny.json").read_text()) | {"quick_gelu": True}))
    return path
