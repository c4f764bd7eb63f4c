#!/usr/bin/env python3
"""Start, stop or check a real two-node SLURM cluster on this host, for the SLURM tests and local trials.

Two slurmd daemons (nodes n1 and n2, each advertising --cpus CPUs and --gpus fake GPUs) and one slurmctld share
this machine; munged, slurm.conf, spool directories and logs all live in the state directory, so nothing
under /etc/slurm or /etc/munge is touched. The one system change is a line `127.0.0.1 n1 n2` appended to
/etc/hosts (removed again by `stop`), so that node names resolve for MASTER_ADDR and the rendezvous.

The daemons run as root, so nothing another user could have placed is trusted: the state directory is a fresh
private one (mkdtemp: TMPDIR/ddpdiff-slurm-XXXXXXXX, mode 0700) unless --state-dir names one, which must then
be new or a directory of ours that no one else may write; every start writes a fresh random munge key.

Needs root and the Debian packages munge, slurmctld, slurmd and slurm-client. Point SLURM's commands at
the cluster with `export SLURM_CONF=STATE/slurm.conf` (`start` and `env` print that line).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# State directories this tool made with mkdtemp: the only ones `start`, `status` and `stop` find by themselves.
STATE_PREFIX = "ddpdiff-slurm-"
NODES = ("n1", "n2")
PARTITION = "debug"
# Ports away from SLURM's defaults (6817/6818) so a system cluster on this host is left alone.
CTLD_PORT = 16817
SLURMD_PORTS = {"n1": 16818, "n2": 16819}
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")
HOSTS = Path("/etc/hosts")
HOSTS_MARK = "# ddpdiff tools/slurm_cluster.py"
DAEMONS = {"munged", "slurmctld", "slurmd"}


class ClusterError(RuntimeError):
    """The cluster cannot be started here; the message says why in one line."""


def unavailable_reason() -> str | None:
    """Why the cluster cannot run on this machine, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (the daemons run as SlurmUser=root and /etc/hosts gets node names)"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (f"missing {', '.join(missing)}: apt-get install -y --no-install-recommends "
                "munge slurmctld slurmd slurm-client")
    return None


def _conf(state: Path, cpus: int, gpus: int, memory_mb: int) -> str:
    host = socket.gethostname()
    nodes = ",".join(NODES)
    node_lines = "\n".join(
        f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={SLURMD_PORTS[n]} CPUs={cpus} "
        f"RealMemory={memory_mb} Gres=gpu:{gpus} State=UNKNOWN" for n in NODES)
    return f"""\
# Written by tools/slurm_cluster.py; removed by `stop`.
ClusterName=ddpdiff
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={state}/munge/munge.socket,cred_expire=5
CredType=cred/munge
StateSaveLocation={state}/ctld
SlurmctldPidFile={state}/slurmctld.pid
SlurmctldLogFile={state}/log/slurmctld.log
SlurmdSpoolDir={state}/spool/%n
SlurmdPidFile={state}/slurmd-%n.pid
SlurmdLogFile={state}/log/slurmd-%n.log
# Two daemons on one host: no cgroups to share, so track processes through /proc and bind nothing.
# Nodes advertise the configured CPUs even on a smaller host, so the scripts' real defaults schedule here.
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MailProg=/bin/true
JobRequeue=1
# Short timings so tests see finished jobs leave the queue and signals escalate quickly.
MinJobAge=5
KillWait=10
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
SlurmctldDebug=info
SlurmdDebug=info
{node_lines}
PartitionName={PARTITION} Nodes={nodes} Default=YES MaxTime=INFINITE State=UP
"""


def _gres_conf(state: Path, gpus: int) -> str:
    files = f"{state}/dev/fakegpu[0-{gpus - 1}]" if gpus > 1 else f"{state}/dev/fakegpu0"
    return f"NodeName=n[1-{len(NODES)}] Name=gpu File={files}\n"


def untrusted_reason(state: Path) -> str | None:
    """Why state may not hold the cluster (another user could have placed or changed what is in it), or None."""
    try:
        st = os.lstat(state)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return f"{state} is not a directory"
    if st.st_uid != os.geteuid():
        return f"{state} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"{state} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _check_trusted(state: Path) -> None:
    reason = untrusted_reason(state)
    if reason:
        raise ClusterError(f"refusing the state directory: {reason}; pass a new --state-dir")


def own_states() -> list[Path]:
    """The state directories an earlier start made (ours, private), newest first."""
    found = Path(tempfile.gettempdir()).glob(f"{STATE_PREFIX}*")
    return sorted((p for p in found if untrusted_reason(p) is None),
                  key=lambda p: p.lstat().st_mtime, reverse=True)


def find_running() -> Path | None:
    """The state directory of the running cluster that an earlier start made, or None."""
    return next((p for p in own_states() if is_running(p)), None)


def _pid(path: Path) -> int | None:
    """The live daemon (munged, slurmctld, slurmd) whose id is in path, or None: a stale file's id may have
    been reused by an unrelated process."""
    try:
        pid = int(path.read_text().split()[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return None
    return pid if comm in DAEMONS else None


def _pidfiles(state: Path) -> list[Path]:
    return [state / "munge" / "munged.pid", state / "slurmctld.pid",
            *(state / f"slurmd-{n}.pid" for n in NODES)]


def _env(state: Path) -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}


def _node_states(state: Path) -> dict[str, str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=_env(state),
                         capture_output=True, text=True, timeout=10)
    return dict(line.split() for line in out.stdout.splitlines() if line.strip()) if out.returncode == 0 else {}


def is_running(state: Path) -> bool:
    """Every daemon is alive and both nodes answer."""
    if not (state / "slurm.conf").is_file() or not all(_pid(p) for p in _pidfiles(state)):
        return False
    states = _node_states(state)
    return all(n in states and not states[n].startswith(("down", "unknown")) for n in NODES)


def _add_hosts() -> None:
    """Make n1 and n2 resolve to this host (written in place: /etc/hosts may be a bind mount)."""
    try:
        if all(socket.gethostbyname(n) == "127.0.0.1" for n in NODES):
            return
    except OSError:
        pass
    with HOSTS.open("a") as f:
        f.write(f"127.0.0.1 {' '.join(NODES)} {HOSTS_MARK}\n")


def _remove_hosts() -> None:
    lines = HOSTS.read_text().splitlines(keepends=True)
    kept = [line for line in lines if HOSTS_MARK not in line]
    if kept != lines:
        HOSTS.write_text("".join(kept))


def _run_daemon(cmd: list[str], state: Path) -> None:
    """Start a daemon that forks into the background; fail with its own words if it cannot."""
    out = subprocess.run(cmd, env=_env(state), capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} failed: {(out.stderr or out.stdout).strip()}")


def _log_tails(state: Path) -> str:
    tails = []
    for log in sorted((state / "log").glob("*.log")):
        tails.append(f"--- {log}\n" + "".join(log.read_text(errors="replace").splitlines(True)[-15:]))
    return "\n".join(tails)


def _fresh_state(state: Path | None) -> Path:
    """A new empty state directory, mode 0700: state itself (created now, so no one else made it) or mkdtemp's."""
    if state is None:
        return Path(tempfile.mkdtemp(prefix=STATE_PREFIX))
    try:
        state.mkdir(mode=0o700)
    except FileExistsError:
        raise ClusterError(f"{state} was created by someone else while the cluster started") from None
    state.chmod(0o700)  # whatever the umask
    return state


def _write_key(path: Path) -> None:
    """A fresh random munge key, readable only by munged's user (this one): never a file found in its place."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    with os.fdopen(fd, "wb") as f:
        os.fchown(f.fileno(), os.geteuid(), os.getegid())
        f.write(os.urandom(1024))


def start(state: Path | None = None, cpus: int = 32, gpus: int = 2, memory_mb: int = 64000,
          timeout_s: float = 60) -> Path:
    """Bring the cluster up (a no-op if it already is) and return the path of its slurm.conf.

    With state None, a running cluster that an earlier start made is reused, and the state of half-started
    ones is removed; otherwise state must be new or a directory of ours that no one else may write."""
    reason = unavailable_reason()
    if reason:
        raise ClusterError(f"cannot start the SLURM test cluster: {reason}")
    if state is None:
        running = find_running()
        if running:
            return running / "slurm.conf"
        for old in own_states():
            stop(old)
    else:
        _check_trusted(state)
        if is_running(state):
            return state / "slurm.conf"
        stop(state)  # a half-started cluster from an earlier run: clear it first
    state = _fresh_state(state)
    for sub in ("munge", "ctld", "log", "dev", *(f"spool/{n}" for n in NODES)):
        (state / sub).mkdir(mode=0o700, parents=True)
    key = state / "munge" / "munge.key"
    _write_key(key)
    for i in range(gpus):  # a character device like /dev/null: SLURM only needs the file to exist
        os.mknod(state / "dev" / f"fakegpu{i}", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (state / "slurm.conf").write_text(_conf(state, cpus, gpus, memory_mb))
    (state / "gres.conf").write_text(_gres_conf(state, gpus))
    _add_hosts()

    m = state / "munge"
    # --force: munged wants every directory above its socket searchable by all, for clients of other users;
    # this cluster's clients are all root, and its state directory is private (0700) on purpose.
    _run_daemon(["munged", "--force", f"--socket={m}/munge.socket", f"--key-file={key}", f"--pid-file={m}/munged.pid",
                 f"--log-file={state}/log/munged.log", f"--seed-file={m}/munged.seed"], state)
    _run_daemon(["slurmctld", "-i"], state)
    for n in NODES:
        _run_daemon(["slurmd", "-N", n], state)

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = _node_states(state)
        if all(states.get(n, "").startswith(("idle", "mix", "alloc")) for n in NODES):
            return state / "slurm.conf"
        time.sleep(0.5)
    raise ClusterError(f"nodes not idle after {timeout_s:.0f}s (sinfo: {_node_states(state) or 'no answer'})\n"
                       + _log_tails(state))


def _kill(pids: list[int], wait_s: float = 10) -> None:
    """SIGTERM all at once (each daemon takes a moment to shut down), SIGKILL whatever outlives wait_s."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # it may have ended since its pid file was read
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while pids and time.monotonic() < deadline:
        time.sleep(0.1)
        pids = [pid for pid in pids if _alive(pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _drain_jobs(state: Path, wait_s: float = 30) -> None:
    """Cancel every job so its slurmstepd processes end before their slurmd does."""
    env = _env(state)
    subprocess.run(["scancel", f"--partition={PARTITION}"], env=env, capture_output=True, timeout=10)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=10)
        if out.returncode != 0 or not out.stdout.strip():
            return
        time.sleep(0.5)


def stop(state: Path) -> None:
    """Cancel all jobs, stop every daemon of this cluster, delete the state directory and the hosts line.
    A state directory someone else could have written is refused: its pid files could name any process."""
    _check_trusted(state)
    if (state / "slurm.conf").is_file() and _pid(state / "slurmctld.pid"):
        _drain_jobs(state)
    _kill([pid for pid in map(_pid, _pidfiles(state)) if pid])
    shutil.rmtree(state, ignore_errors=True)
    if HOSTS.exists() and os.access(HOSTS, os.W_OK):
        _remove_hosts()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["start", "stop", "status", "env"],
                   help="start (idempotent: leaves a running cluster alone), stop (kills the daemons and "
                        "deletes the state directory), status (exit 0 if up), env (print the export line)")
    p.add_argument("--state-dir", type=Path, default=os.environ.get("DDPDIFF_SLURM_STATE"),
                   help=f"where slurm.conf, spool, logs and the munge key live: new, or ours and writable by no "
                        f"one else (default $DDPDIFF_SLURM_STATE, else a fresh private "
                        f"{tempfile.gettempdir()}/{STATE_PREFIX}XXXXXXXX, which stop, status and env find again)")
    p.add_argument("--cpus", type=int, default=32,
                   help="CPUs each node advertises, whatever the host has (default 32, what slurm/train.sh asks for)")
    p.add_argument("--gpus", type=int, default=2, help="fake GPUs per node, for --gpus-per-node (default 2)")
    args = p.parse_args(argv)
    state = Path(args.state_dir).resolve() if args.state_dir else None
    try:
        if args.command == "start":
            if args.cpus < 1 or args.gpus < 1:
                p.error("--cpus and --gpus must be at least 1")
            conf = start(state, args.cpus, args.gpus)
            print(f"SLURM cluster up: nodes {','.join(NODES)}, partition {PARTITION}. Use it with:\n"
                  f"export SLURM_CONF={conf}")
        elif args.command == "stop":
            for old in [state] if state else own_states():
                stop(old)
                print(f"SLURM cluster stopped; removed {old}")
        else:
            state = state or find_running()
            up = state is not None and is_running(state)
            if args.command == "status":
                print("up" if up else "down")
                return 0 if up else 1
            if not up:
                raise ClusterError("no cluster is running: start one first")
            print(f"export SLURM_CONF={state / 'slurm.conf'}")
    except ClusterError as e:
        print(f"slurm_cluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
