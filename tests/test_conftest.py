"""The test helpers themselves: the `procs` fixture leaves no process behind, whatever the test did."""

import sys
import time

import pytest
from conftest import Procs, running


def _wait_for_pids(proc, n, timeout=60):
    deadline = time.monotonic() + timeout
    while len(pids := proc.pids()) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def test_a_failed_test_leaves_no_process_of_its_trees_behind():
    """torchrun's ranks (in sessions of their own), a child in a new session and an orphan reparented away
    from its tree all go when the test fails on a line that never comes."""
    never = r"no line matching 'never printed' \(none came within 1 s\)"
    with pytest.raises(AssertionError, match=never), Procs() as procs:
        ranks = procs.start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             2, "--no-python", "sh", "-c", "echo rank $RANK up; exec sleep 600"])
        shell = procs.start(["sh", "-c", "(setsid sleep 600 &); setsid sleep 600 & echo started; wait"])
        shell.read_until("^started$", timeout=60)
        ranks.read_until("rank 1 up|rank 0 up", timeout=60)
        pids = _wait_for_pids(ranks, 3) + _wait_for_pids(shell, 3)
        assert len(pids) >= 6, pids  # the agent and two ranks; the shell, its child and the orphan
        shell.read_until("never printed", timeout=1)
    assert not [pid for pid in pids if running(pid)]


def test_wait_fails_with_the_output_when_the_process_overruns(procs):
    proc = procs.start(["sh", "-c", "echo first; exec sleep 600"])
    with pytest.raises(AssertionError, match="still running after 0.5 s; output:\nfirst"):
        proc.wait(timeout=0.5)
    assert procs.start(["sh", "-c", "echo done"]).wait(timeout=60) == "done\n"
