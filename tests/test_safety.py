"""Safety properties that are not one bad input: nothing unpickles, the run lock, umask modes,
leftovers of killed runs, verified stage caches, checkpoint saves, and SIGKILL at the worst
moment of prune (in memory and streaming), importance and a distill checkpoint save, each
followed by a rerun (or ``--resume``) that gives the uninterrupted result.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests import ROOT
from tests.test_bad_input import _save_tiny, _text


class _Evil:
    """Unpickling this runs ``touch <path>``: what a crafted checkpoint does."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _env() -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TQDM_DISABLE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


# -- nothing unpickles --------------------------------------------------------------------------------

def test_resume_loader_refuses_a_pickle_that_runs_code(tmp_path):
    from minitron_fast.distill.checkpoints import ResumeError, weights_only_load

    pwned = tmp_path / "pwned"
    f = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "x": _Evil(str(pwned))}, f)
    # the file really is a code-running pickle: a plain weights_only=False load runs it
    evil_twin = tmp_path / "twin.pt"
    torch.save(_Evil(str(tmp_path / "twin_ran")), evil_twin)
    torch.load(evil_twin, weights_only=False)
    assert (tmp_path / "twin_ran").exists()
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    real = torch.load
    with weights_only_load():
        with pytest.raises(ResumeError, match="never unpickles code"):
            torch.load(f, weights_only=False)  # DeepSpeed's call, forced to weights_only=True
        ok = torch.load(tmp_path / "ok.pt", weights_only=False)  # plain tensors still load
    assert torch.equal(ok["w"], torch.ones(2))
    assert not pwned.exists()
    assert torch.load is real  # restored


def test_no_code_path_loads_without_weights_only():
    """No call in the package unpickles: every ``torch.load`` passes ``weights_only=True`` (the
    one that does not is the wrapper inside ``weights_only_load``, which forces it), nothing
    passes ``weights_only=False``, nothing calls ``pickle.load(s)``."""
    import ast

    bad = []
    for p in (ROOT / "minitron_fast").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f"{getattr(f.value, 'id', '?')}.{f.attr}" if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            kw = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
            where = f"{p.relative_to(ROOT)}:{node.lineno}"
            if kw.get("weights_only", True) is False or name in ("pickle.load", "pickle.loads"):
                bad.append(where)
            if name == "torch.load" and kw.get("weights_only") is not True:
                bad.append(where)
    assert not bad, bad


def test_trust_remote_code_is_always_false():
    import re

    for p in (ROOT / "minitron_fast").rglob("*.py"):
        text = p.read_text()
        for m in re.finditer(r"Auto\w+\.from_pretrained\(", text):
            call = text[m.start(): text.find(")\n", m.start()) + 1]
            assert "trust_remote_code=False" in call, f"{p}: {call}"


# -- the run lock ----------------------------------------------------------------------------------

def test_run_lock_names_the_holder_and_dies_with_it(tmp_path):
    from minitron_fast.errors import MinitronError
    from minitron_fast.io import RunLock

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from minitron_fast.io import RunLock
        RunLock({str(tmp_path)!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(MinitronError, match=rf"in use by another minitron_fast run \(PID {holder.pid}\)"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(tmp_path):  # a killed holder never blocks the next run
        pass


# -- modes and leftovers ------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_respect_the_umask(tmp_path, mask):
    from minitron_fast.io import MARKER, atomic_dir, atomic_write_text

    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "inner.txt").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "d" / MARKER).stat().st_mode & 0o777 == 0o666 & ~mask


def test_leftovers_of_dead_processes_are_removed(tmp_path):
    from minitron_fast.io import atomic_dir, atomic_write_text

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale_dir = tmp_path / f".out.tmp-{dead}-abc"
    stale_file = tmp_path / f".f.txt.tmp-{dead}-xyz"
    live = tmp_path / f".out.tmp-{os.getppid()}-live"  # a running process's: kept
    for p in (stale_dir, live):
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"half")
    stale_file.write_text("half")
    with atomic_dir(tmp_path / "out"):
        pass
    atomic_write_text(tmp_path / "f.txt", "x")
    assert not stale_dir.exists() and not stale_file.exists() and live.exists()


def test_overwrite_removes_only_what_minitron_fast_wrote(tmp_path):
    from minitron_fast.io import OutputError, atomic_dir, check_output

    with atomic_dir(tmp_path / "ours") as d:
        (d / "a").write_text("1")
    with atomic_dir(tmp_path / "ours", overwrite=True) as d:  # marker present: replaced
        (d / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir() if not p.name.startswith(".")) == ["b"]
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="not written by minitron_fast"):
        with atomic_dir(tmp_path / "theirs", overwrite=True):
            pass
    assert (tmp_path / "theirs" / "thesis.tex").read_text() == "years of work"
    (tmp_path / "ours" / "scores.safetensors").write_text("s")
    with pytest.raises(OutputError, match="would delete that input"):
        check_output(tmp_path / "ours", inputs=[tmp_path / "ours" / "scores.safetensors"], want="dir", overwrite=True)
    (tmp_path / "hard").mkdir()
    os.link(tmp_path / "ours" / "b", tmp_path / "hard" / "link.txt")  # the same file under another name
    with pytest.raises(OutputError, match="is an input"):
        check_output(tmp_path / "hard" / "link.txt", inputs=[tmp_path / "ours" / "b"], allow_existing_file=True)


# -- CLI ----------------------------------------------------------------------------------------------

def test_overrides_may_follow_options(capsys):
    from minitron_fast.cli import main

    assert main(["run", "demo", "--dry-run", "distill.steps=3", "--no-progress", "seed=7"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "seed: 7" in out


# -- the stage cache ----------------------------------------------------------------------------------

def test_stage_cache_verifies_artifacts_and_ignores_list_vs_tuple(tmp_path):
    from minitron_fast.pipeline.stages import StageCache

    logs: list[str] = []
    calls = []

    def stage(d: Path, resume: bool):
        calls.append(1)
        (d / "art.bin").write_bytes(b"result %d" % len(calls))
        return {"file": str(d / "art.bin")}

    cache = StageCache(tmp_path, log=logs.append)
    cache.acquire()
    try:
        assert cache.run("s", {"dims": (1, 2)}, stage).status == "ran"
        assert cache.run("s", {"dims": [1, 2]}, stage).status == "cached"  # no phantom change
        art = tmp_path / "s" / "art.bin"
        st = art.stat()
        art.write_bytes(b"result X")  # same size, same mtime: only the content hash sees it
        os.utime(art, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert cache.run("s", {"dims": [1, 2]}, stage).status == "ran"
        assert any("changed since it was written" in m for m in logs), logs
        (tmp_path / "s" / "art.bin").unlink()  # a deleted artifact is never "cached"
        assert cache.run("s", {"dims": [1, 2]}, stage).status == "ran"
        assert any("is missing" in m for m in logs), logs
        assert cache.run("s", {"dims": [1, 2]}, stage).status == "cached"
        assert len(calls) == 3
    finally:
        cache.release()


def test_model_identity_is_content_not_size_and_mtime(tmp_path):
    from minitron_fast.pipeline.stages import model_fingerprint

    (tmp_path / "config.json").write_text("{}")
    w = tmp_path / "model.safetensors"
    w.write_bytes(b"A" * 64)
    a = model_fingerprint(tmp_path)
    st = w.stat()
    w.write_bytes(b"B" * 64)
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_fingerprint(tmp_path) != a


# -- checkpoint saves ---------------------------------------------------------------------------------

class _FakeEngine:
    """Writes a checkpoint like DeepSpeed (files into save_dir/tag); ``fail_after`` files it dies."""

    def __init__(self, fail_after: int | None = None):
        self.fail_after = fail_after

    def save_checkpoint(self, save_dir, tag, client_state, save_latest=True):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt")):
            if self.fail_after is not None and i >= self.fail_after:
                raise KeyboardInterrupt("killed mid-save")
            torch.save({"i": i}, d / name)
        if save_latest:
            (Path(save_dir) / "latest").write_text(tag)


def test_checkpoint_is_renamed_into_place_and_latest_written_last(tmp_path):
    from minitron_fast.distill.config import load_config
    from minitron_fast.distill.sharding import ShardedBlocks
    from minitron_fast.distill.checkpoints import _clean_tmp_checkpoints, read_latest
    from minitron_fast.distill.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t.cfg = load_config(None, ["teacher=demo", "student=x"])
    t.rank, t.world = 0, 1
    data = ShardedBlocks(torch.zeros(8, 4, dtype=torch.long), world=1, rank=0, micro_batch=1, grad_accum=1, seed=0)
    ck = tmp_path / "checkpoints"
    t._save(_FakeEngine(), ck, 2, data)
    assert read_latest(ck) == 2 and (ck / "step2" / "mp_rank_00_model_states.pt").is_file()
    with pytest.raises(KeyboardInterrupt):
        t._save(_FakeEngine(fail_after=1), ck, 4, data)
    assert not (ck / "step4").exists() and read_latest(ck) == 2  # nothing half-written looks complete
    assert (ck / ".tmp-step4").is_dir()
    _clean_tmp_checkpoints(ck)
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step2"]


# -- SIGKILL at the worst moment, then rerun ------------------------------------------------------------

@pytest.fixture(scope="module")
def kill_env(tmp_path_factory, demo_model_dir):
    from minitron_fast.cli import main

    root = tmp_path_factory.mktemp("kill")
    _save_tiny(root / "model", Path(demo_model_dir))
    _save_tiny(root / "model2", Path(demo_model_dir), seed=1, hidden_size=16, intermediate_size=32)
    (root / "data.txt").write_text(_text())
    assert main(["importance", "--model", str(root / "model"), "--data", str(root / "data.txt"), "--out",
                 str(root / "scores.safetensors"), "--samples", "4", "--seq-len", "16", "--batch-size", "4",
                 "--no-heatmap", "--threads", "1"]) == 0
    return root


def _killed(code: str, argv: list[str]) -> subprocess.CompletedProcess:
    """Runs ``minitron_fast.cli.main(argv)`` in a subprocess after ``code`` arranged a SIGKILL."""
    prog = textwrap.dedent(code) + f"\nfrom minitron_fast.cli import main\nmain({argv!r})\n"
    proc = subprocess.run([sys.executable, "-c", prog], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


KILL_ON_SAVE = """
    import os, signal
    import transformers.modeling_utils as mu
    real = mu.safe_save_file
    def save(tensors, filename, *a, **k):
        real(tensors, filename, *a, **k)
        os.kill(os.getpid(), signal.SIGKILL)  # weights written, config and rename not yet
    mu.safe_save_file = save
"""

KILL_MID_STREAM = """
    import os, signal
    import minitron_fast.prune.streaming as st
    real = st.write_safetensors_streaming
    def write(path, entries, tensors):
        def some():
            for i, t in enumerate(tensors):
                if i == 3:
                    os.kill(os.getpid(), signal.SIGKILL)  # mid-file: a few tensors written
                yield t
        return real(path, entries, some())
    st.write_safetensors_streaming = write
"""

KILL_ON_FSYNC = """
    import os, signal
    def fsync(fd):
        os.kill(os.getpid(), signal.SIGKILL)  # the scores' bytes written to the temporary file
    os.fsync = fsync
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["in_memory", "streaming"])
def test_sigkill_during_prune_then_rerun(kill_env, tmp_path, mode):
    from minitron_fast.cli import main

    r = kill_env
    def argv(out: Path) -> list[str]:
        return ["prune", "--model", str(r / "model"), "--scores", str(r / "scores.safetensors"), "--target",
                "ffn=32,hidden=24", "--out", str(out)] + (["--streaming"] if mode == "streaming" else ["--no-streaming"])

    _killed(KILL_ON_SAVE if mode == "in_memory" else KILL_MID_STREAM, argv(tmp_path / "p"))
    assert not (tmp_path / "p").exists()  # nothing that looks complete
    assert _hidden(tmp_path), "the kill should have left a hidden temporary directory"
    assert main(argv(tmp_path / "p")) == 0  # the rerun: cleans up, writes what an uninterrupted run writes
    assert _hidden(tmp_path) == []
    assert main(argv(tmp_path / "ref")) == 0
    a, b = _tensors(tmp_path / "p"), _tensors(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "p" / "config.json").read_text()) == json.loads((tmp_path / "ref" / "config.json").read_text())


@pytest.mark.slow
def test_sigkill_during_importance_then_rerun(kill_env, tmp_path):
    from minitron_fast.cli import main

    r = kill_env
    argv = ["importance", "--model", str(r / "model"), "--data", str(r / "data.txt"), "--samples", "4",
            "--seq-len", "16", "--batch-size", "4", "--no-heatmap", "--threads", "1", "--out"]
    _killed(KILL_ON_FSYNC, argv + [str(tmp_path / "s.safetensors")])
    assert not (tmp_path / "s.safetensors").exists() and _hidden(tmp_path)
    assert main(argv + [str(tmp_path / "s.safetensors")]) == 0
    assert _hidden(tmp_path) == []
    a, b = _tensors(tmp_path), _tensors(r)  # r holds the uninterrupted run of the same command
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


DISTILL_WORKER = """
    import json, os, sys
    from minitron_fast.distill import load_config, train
    from minitron_fast.errors import MinitronError
    for run in json.load(open(sys.argv[-1])):
        try:
            res = train(load_config(None, run["overrides"]), resume=run.get("resume", False), progress=False)
            print("RESULT " + json.dumps({"name": run["name"], "ok": True, "result": res}), flush=True)
        except MinitronError as exc:
            print("RESULT " + json.dumps({"name": run["name"], "ok": False, "error": str(exc)}), flush=True)
    from minitron_fast.distill.engine import exit_process
    exit_process(0)
"""

KILL_IN_CHECKPOINT_RENAME = """
    import os, signal
    real = os.replace
    def replace(a, b, *args, **kw):
        if str(a).endswith(".tmp-step4"):
            os.kill(os.getpid(), signal.SIGKILL)  # DeepSpeed wrote step 4's files; not yet renamed
        return real(a, b, *args, **kw)
    os.replace = replace
"""


@pytest.mark.slow
def test_sigkill_during_distill_checkpoint_save_then_resume(kill_env, tmp_path):
    from minitron_fast.distill.checkpoints import read_latest

    r = kill_env

    def losses(out: Path) -> list[tuple[int, float]]:
        return [(m["step"], m["loss"]) for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if "loss" in m]

    def overrides(out: Path, **kw) -> list[str]:
        d = {"teacher": r / "model", "student": r / "model2", "out": out, "steps": 4, "micro_batch_size": 1,
             "data.source": r / "data.txt", "data.seq_len": 16, "data.max_blocks": 32, "data.eval_blocks": 0,
             "save_every": 2, "lr": 1e-3, "warmup_steps": 0, "schedule": "constant", "export": False,
             "threads": 1, "ds.zero_stage": 1}
        d.update(kw)
        return [f"{k}={v}" for k, v in d.items()]

    (tmp_path / "worker.py").write_text(textwrap.dedent(DISTILL_WORKER))
    runs = tmp_path / "killed.json"
    runs.write_text(json.dumps([{"name": "killed", "overrides": overrides(tmp_path / "run")}]))
    prog = textwrap.dedent(KILL_IN_CHECKPOINT_RENAME) + "\nimport runpy, sys\nsys.argv = ['worker', %r]\n" \
        "runpy.run_path(%r, run_name='__main__')\n" % (str(runs), str(tmp_path / "worker.py"))
    proc = subprocess.run([sys.executable, "-c", prog], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-3000:]
    ck = tmp_path / "run" / "checkpoints"
    assert read_latest(ck) == 2 and not (ck / "step4").exists() and (ck / ".tmp-step4").is_dir()
    # the killed run logged steps 1-4 before dying in step 4's save: the uninterrupted trajectory
    # the resumed run (from step 2) must reproduce
    before = losses(tmp_path / "run")
    assert [s for s, _ in before] == [1, 2, 3, 4]

    # a crafted checkpoint in a copy of the run directory: resuming from it runs no code
    import shutil

    shutil.copytree(tmp_path / "run", tmp_path / "evil")
    (tmp_path / "evil" / ".minitron_fast.lock").unlink(missing_ok=True)
    pwned = tmp_path / "pwned"
    torch.save({"module": _Evil(str(pwned))}, tmp_path / "evil" / "checkpoints" / "step2" / "mp_rank_00_model_states.pt")
    runs.write_text(json.dumps([
        {"name": "evil", "resume": True, "overrides": overrides(tmp_path / "evil")},
        {"name": "resumed", "resume": True, "overrides": overrides(tmp_path / "run")},
        # a run whose data fails to load records nothing, so the fixed rerun (no --resume) just runs
        {"name": "bad_data", "overrides": overrides(tmp_path / "fresh", **{"data.source": r / "nope.txt"})},
        {"name": "fixed", "overrides": overrides(tmp_path / "fresh", steps=1)}]))
    proc = subprocess.run([sys.executable, str(tmp_path / "worker.py"), str(runs)], env=_env(), capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path))
    res = {json.loads(x[7:])["name"]: json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")}
    assert proc.returncode == 0 and len(res) == 4, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert not res["bad_data"]["ok"] and "nope.txt" in res["bad_data"]["error"], res["bad_data"]
    assert res["fixed"]["ok"], res["fixed"]
    assert not res["evil"]["ok"] and "never unpickles code" in res["evil"]["error"], res["evil"]
    assert not pwned.exists()
    assert res["resumed"]["ok"], res
    got = losses(tmp_path / "run")
    assert [s for s, _ in got] == [1, 2, 3, 4]  # no step lost or repeated in the record
    torch.testing.assert_close(torch.tensor([x for _, x in got]), torch.tensor([x for _, x in before]),
                               rtol=1e-6, atol=1e-7)
    assert read_latest(ck) == 4 and (ck / "step4").is_dir() and not list(ck.glob(".tmp-*"))
