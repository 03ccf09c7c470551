"""Multi-node safety (issue 26, item 5): the run lock covers every node of a launch, and stale-file
cleanup never removes what another host may own.

The nodes of a multi-node run are simulated on this machine: another host's files and locks by
the host name their names and lock records carry, a second node by a rank with LOCAL_RANK=0 and
RANK=1 (in a world of two gloo ranks), a node that sees a different directory at the same path by
giving that rank its own out."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(extra)
    return env


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# -- stale-file cleanup ---------------------------------------------------------------------------------

def test_host_tag_is_file_safe_bounded_and_never_read_as_a_pid():
    from minitron_fast.io import HOST_TAG_MAX, _leftover_owner, host_tag

    assert host_tag("gpu-node-01") == "gpu-node-01"  # a plain host name is kept as it is
    long_a, long_b = "n" * 80 + "a", "n" * 80 + "b"
    tags = [host_tag(h) for h in ("gpu-node-01", "10-0-0-5", "1234", "a b/c\n", "", long_a, long_b, "é.local")]
    assert len(set(tags)) == len(tags)  # cut or cleaned names keep a hash of the whole name
    for tag in tags:
        assert len(tag) <= HOST_TAG_MAX and tag[0].isalpha(), tag
        assert all(c.isalnum() or c in "._-" for c in tag) and tag.isascii(), tag
        # an older minitron_fast reads the first field as the PID: never digits
        assert not f"{tag}-123-abcd".split("-", 1)[0].isdigit()
        assert _leftover_owner(f"{tag}-123-ab_cd", ".tmp-") == (tag, 123)
        assert _leftover_owner(f"{tag}-123", ".old-") == (tag, 123)
    assert _leftover_owner("123-abcd", ".tmp-") == (None, 123)  # the older format: no host
    assert _leftover_owner("123", ".old-") == (None, 123)
    assert _leftover_owner("node-x-abcd", ".tmp-") is None


def test_cleanup_removes_this_hosts_dead_leftovers_and_never_another_hosts(tmp_path):
    from minitron_fast.io import atomic_dir, atomic_write_text, clean_stale_tmp_in, host_tag

    me, dead, live = host_tag(), _dead_pid(), os.getppid()
    other = "node-7"  # another host, whose PIDs say nothing here (a dash and digits in its name)
    ours_dir, ours_file, ours_old = (tmp_path / f".out.tmp-{me}-{dead}-abc", tmp_path / f".f.txt.tmp-{me}-{dead}-xyz",
                                     tmp_path / f".out.old-{me}-{dead}")
    theirs = [tmp_path / f".out.tmp-{other}-{dead}-abc", tmp_path / f".f.txt.tmp-{other}-{dead}-xyz",
              tmp_path / f".out.old-{other}-{dead}", tmp_path / f".g.tmp-{other}-{dead}-q1"]
    ours_live = tmp_path / f".out.tmp-{me}-{live}-live"
    legacy = tmp_path / f".out.tmp-{dead}-old"  # the older format, no host: removed as before
    for d in (ours_dir, ours_old, ours_live, legacy, theirs[0], theirs[2]):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    for f in (ours_file, theirs[1], theirs[3]):
        f.write_text("half")

    with atomic_dir(tmp_path / "out") as d:
        # this write's own temporary directory carries the host and the PID
        assert d.name.startswith(f".out.tmp-{me}-{os.getpid()}-")
    atomic_write_text(tmp_path / "f.txt", "x")
    clean_stale_tmp_in(tmp_path)

    assert not ours_dir.exists() and not ours_file.exists() and not ours_old.exists() and not legacy.exists()
    assert ours_live.exists()
    assert all(p.exists() for p in theirs), [p.name for p in theirs if not p.exists()]
    assert (tmp_path / "out").is_dir() and (tmp_path / "f.txt").read_text() == "x"


def test_replacing_a_directory_renames_the_old_one_with_host_and_pid(tmp_path, monkeypatch):
    import minitron_fast.io as io

    with io.atomic_dir(tmp_path / "out") as d:
        (d / "a").write_text("1")
    seen = []
    real = os.replace

    def replace(src, dst):
        seen.append(Path(dst).name)
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with io.atomic_dir(tmp_path / "out", overwrite=True) as d:
        (d / "b").write_text("2")
    assert f".out.old-{io.host_tag()}-{os.getpid()}" in seen
    assert (tmp_path / "out" / "b").exists() and not list(tmp_path.glob(".out.old-*"))


# -- the run lock ---------------------------------------------------------------------------------------

HOLDER = """
    import json, os, sys, time
    from minitron_fast.io import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    rec = dict(lock.record, host="node-7")  # as another host's run would record it
    os.ftruncate(lock.fd, 0)
    os.pwrite(lock.fd, (json.dumps(rec) + "\\n").encode(), 0)
    print("locked", flush=True)
    time.sleep(120)
"""


def _hold(directory: Path) -> subprocess.Popen:
    """Another launch's rank 0 (host node-7, launch 10.9.9.9:29555) holding the lock on ``directory``."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(directory)], stdout=subprocess.PIPE,
                              text=True, env=_env(MASTER_ADDR="10.9.9.9", MASTER_PORT="29555"))
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _stop(holder: subprocess.Popen) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait()


def test_lock_of_another_launch_is_refused_with_its_host_and_pid(tmp_path, monkeypatch, caplog):
    from minitron_fast.errors import MinitronError
    from minitron_fast.io import LOCK, RunLock, check_run_lock, read_lock

    holder = _hold(tmp_path)
    try:
        theirs = read_lock(tmp_path)
        assert theirs["host"] == "node-7" and theirs["pid"] == holder.pid and theirs["launch"] == "10.9.9.9:29555"
        want = rf"in use by another minitron_fast run \(PID {holder.pid}\) on host node-7 \(launch 10\.9\.9\.9:29555\)"
        # rank 0 of this launch: the flock is refused, naming the holder's host and PID
        with pytest.raises(MinitronError, match=want) as exc:
            RunLock(tmp_path).acquire()
        assert "\n" not in str(exc.value) and "choose another out" in str(exc.value)
        # another node's local rank 0: the record names another launch (by launch id, or not
        # rank 0's nonce)
        monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
        monkeypatch.setenv("MASTER_PORT", "29500")
        for expected in (None, {"host": "node-0", "pid": 4242, "launch": "10.0.0.1:29500", "nonce": "ab" * 16}):
            with pytest.raises(MinitronError, match=want) as exc:
                check_run_lock(tmp_path, expected)
            msg = str(exc.value)
            assert "\n" not in msg and "not by this launch" in msg and "wait for it to finish" in msg
        assert "rank 0: PID 4242 on host node-0" in msg
        # the launch that holds it passes the same check
        assert check_run_lock(tmp_path, theirs) == theirs
        monkeypatch.setenv("MASTER_ADDR", "10.9.9.9")
        monkeypatch.setenv("MASTER_PORT", "29555")
        assert check_run_lock(tmp_path)["pid"] == holder.pid
    finally:
        _stop(holder)

    # killed, it could not empty its record: the flock is free, and the next run takes the lock,
    # saying whose it was
    with caplog.at_level("WARNING", logger="minitron_fast.io"):
        lock = RunLock(tmp_path).acquire()
    try:
        assert f"(PID {holder.pid}) on host node-7" in caplog.text
        assert read_lock(tmp_path) == lock.record and lock.record["pid"] == os.getpid()
        lock.verify()
        # a run that took the "lock" where flock does not reach (NFS across nodes) wrote over it
        (tmp_path / LOCK).write_text(json.dumps({"host": "node-9", "pid": 77, "nonce": "cd" * 16}) + "\n")
        with pytest.raises(MinitronError, match=r"\(PID 77\) on host node-9"):
            lock.verify()
    finally:
        lock.release()
    assert read_lock(tmp_path)["host"] == "node-9"  # released: another run's record is not ours to empty
    with RunLock(tmp_path):
        pass
    assert read_lock(tmp_path) is None  # released: its own record emptied

    # a node that sees no lock where rank 0 took it: out is not shared
    (tmp_path / "local").mkdir()
    with pytest.raises(MinitronError, match="does not see the run lock .* every node mounts"):
        check_run_lock(tmp_path / "local", {"nonce": "ef" * 16, "host": "node-0", "pid": 1})


def test_old_lock_files_still_name_the_pid(tmp_path):
    from minitron_fast.io import describe_holder, parse_lock

    assert parse_lock("4242\n") == {"pid": "4242"}  # written by an older minitron_fast
    assert describe_holder(parse_lock("4242\n")) == "(PID 4242)"
    assert parse_lock("") is None


# -- the trainer: two ranks standing for two nodes -------------------------------------------------------

RANK = """
    import json, os, sys, types
    from datetime import timedelta
    from pathlib import Path
    from types import SimpleNamespace

    sys.modules["deepspeed"] = types.ModuleType("deepspeed")  # run() imports it; _run (stubbed) uses it
    import torch.distributed as dist
    import minitron_fast.distill.trainer as tr

    rank, root = int(os.environ["RANK"]), Path(sys.argv[1])

    def init_distributed(on_cuda=None):
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(seconds=40))
        return dist.get_rank(), dist.get_world_size()

    tr.init_distributed = init_distributed
    tr._check_inputs = tr._check_model_inputs = tr.cap_heap_retention = lambda *a, **k: None
    tr._check_out_dir = lambda *a, **k: None
    tr.Trainer._run = lambda self, out, *a: {"trained": self.rank}

    for name in ("normal", "held", "other-node"):
        out = root / name
        if name == "other-node" and rank == 1:
            out = root / "node1-local"  # this node sees another directory at the same path
        t = tr.Trainer.__new__(tr.Trainer)
        t.cfg, t.resume = SimpleNamespace(threads=0, out=str(out), train_device=lambda: "cpu"), False
        try:
            res = {"result": t.run()}
        except tr.MinitronError as exc:
            res = {"error": str(exc)}
        print(json.dumps({"scenario": name, **res}), flush=True)
    if dist.is_initialized():  # a clean exit: gloo's threads torn down before the interpreter's
        dist.barrier()         # (left to exit, a rank aborted now and then: "terminate called
        dist.destroy_process_group()  # without an active exception", status -6)
"""


def test_two_nodes_check_the_lock_together_and_fail_together(tmp_path):
    """Rank 0 takes the lock, the other node's local rank 0 checks it; a lock held by another
    launch, seen by rank 0 (flock) or by the other node (its record), fails both ranks, in one
    line naming the holder's host and PID, without waiting for a rendezvous timeout."""
    import socket

    from minitron_fast.io import read_lock

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    held = tmp_path / "held"
    held.mkdir()
    holder = _hold(held)  # another launch's rank 0 holds held/
    local = tmp_path / "node1-local"  # what node 1 sees at other-node/: another launch's live record
    local.mkdir()
    (local / ".minitron_fast.lock").write_text(json.dumps({"host": "node-8", "pid": 31337, "launch": "10.8.8.8:29500",
                                                            "nonce": "12" * 16}) + "\n")
    try:
        ranks = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(RANK), str(tmp_path)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env=_env(RANK=str(r), LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1",
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TQDM_DISABLE="1"))
                 for r in (0, 1)]
        outs = []
        for p in ranks:
            try:
                out, err = p.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                for q in ranks:
                    q.kill()
                raise AssertionError("a rank hung")
            assert p.returncode == 0, err[-3000:]
            outs.append({r["scenario"]: r for r in map(json.loads, out.splitlines())})
    finally:
        _stop(holder)

    r0, r1 = outs
    # one launch, one shared out: both ranks go on; the lock is released (emptied) when run() ends
    assert r0["normal"] == {"scenario": "normal", "result": {"trained": 0}}
    assert r1["normal"] == {"scenario": "normal", "result": {"trained": 1}}
    assert read_lock(tmp_path / "normal") is None
    # another launch holds the flock: rank 0 cannot take it, and both ranks fail with its one line
    for r in (r0, r1):
        msg = r["held"]["error"]
        assert f"in use by another minitron_fast run (PID {holder.pid}) on host node-7" in msg and "\n" not in msg
    # node 1 sees another launch's lock record where rank 0 took its own: both fail, naming it
    for r in (r0, r1):
        msg = r["other-node"]["error"]
        assert "(PID 31337) on host node-8" in msg and "not by this launch" in msg and "\n" not in msg
    assert read_lock(tmp_path / "other-node") is None  # rank 0 released its lock
