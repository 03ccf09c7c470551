"""The pipeline's one stage table (``pipeline/table.py``): the runner, ``--check``, ``--dry-run``,
the memory plan and ``--redo`` all walk it, and a new stage is one row plus one runner method."""
from __future__ import annotations

import dataclasses
import json

import pytest

from minitron_fast.pipeline import table
from minitron_fast.pipeline.recipe import Recipe, load_recipe
from minitron_fast.pipeline.runner import PipelineRunner


def test_every_row_is_complete_and_reads_only_earlier_stages():
    fields = {f.name for f in dataclasses.fields(Recipe)}
    seen: list[str] = []
    for s in table.STAGE_TABLE:
        assert s.kind in table.KINDS, s.name
        assert s.section in fields, s.name
        assert s.doc and s.outputs, s.name
        for key, ident in s.inputs:
            assert ident in table.IDENTITIES or ident in seen, (s.name, key, ident)
        seen.append(s.name)
    assert len(set(seen)) == len(seen)
    assert table.STAGES == tuple(seen)


def test_the_runner_has_one_method_per_row_and_none_besides():
    methods = {n[len("stage_"):] for n in dir(PipelineRunner) if n.startswith("stage_") and n not in
               ("stage_config", "stage_inputs")}
    assert methods == set(table.STAGES)


def test_redo_and_the_memory_plan_follow_the_table(capsys):
    from minitron_fast.cli import main
    from minitron_fast.distill.memory import plan_recipe

    order = [p.stage for p, _ in plan_recipe("llama3.1-8b-to-4b-width", gpu_mem="80GB")]
    assert order == [s for s in table.STAGES if s in order] and len(order) >= 4
    assert main(["run", "demo", "--redo", "nope", "--check"]) == 2
    err = capsys.readouterr().err
    assert "stages are " + ", ".join(table.STAGES) in err


def test_skips_and_model_sections_follow_the_recipe():
    r = load_recipe("demo")
    assert [s.name for s in table.running(r)] == [
        "teacher_eval", "correct_teacher", "importance", "prune", "distill", "scratch", "export"]
    assert table.model_sections(r) == ["evaluate", "correct_teacher", "importance", "distill", "scratch"]
    r2 = load_recipe("demo", ["distill.teacher=offline", "distill.enabled=false", "scratch.enabled=false"])
    # distill disabled: no offline logits either, and nothing to export
    assert [s.name for s in table.running(r2)] == ["teacher_eval", "correct_teacher", "importance", "prune"]
    assert table.BY_NAME["export"].skip(r2) == "nothing to export (distill did not run)"
    r3 = load_recipe("demo", ["distill.teacher=offline"])
    assert "teacher_logits" in [s.name for s in table.running(r3)]


def test_dry_run_prints_the_stages_as_yaml_comments(capsys):
    import yaml

    from minitron_fast.cli import main

    assert main(["run", "demo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["teacher"] == "demo"  # still a recipe
    lines = [ln for ln in out.splitlines() if ln.startswith("#  ")]
    assert len(lines) == len(table.STAGE_TABLE)
    for ln, s in zip(lines, table.STAGE_TABLE):
        assert s.name in ln
    assert "search" in lines[4] and "skipped: disabled in the recipe; pruning to ffn=768" in lines[4]


@pytest.mark.slow
def test_a_new_stage_is_one_row(tmp_path, monkeypatch):
    """Adding a row and its runner method is all it takes: the new stage runs after its upstream,
    its output is cached, and it is redone when its upstream changes."""
    from bench.common import make_tiny_teacher
    from minitron_fast.pipeline import runner as runner_mod

    teacher = make_tiny_teacher(tmp_path / "tiny")
    row = table.Stage("sizes", "prune", lambda r, t: {"note": "sizes"}, "files", "",
                      (("config", "config"), ("prune", "prune")), ("file",), lambda r: None,
                      "the pruned checkpoint's file sizes", summary="sizes written to {file}")
    rows = table.STAGE_TABLE + (row,)
    monkeypatch.setattr(runner_mod, "STAGE_TABLE", rows)
    monkeypatch.setattr(runner_mod, "BY_NAME", {s.name: s for s in rows})

    def stage_sizes(self, d, resume):
        model = self.output("prune", "model")
        sizes = {p.name: p.stat().st_size for p in sorted(__import__("pathlib").Path(model).iterdir())}
        (d / "sizes.json").write_text(json.dumps(sizes))
        return {"file": str(d / "sizes.json")}

    monkeypatch.setattr(PipelineRunner, "stage_sizes", stage_sizes, raising=False)
    p = tmp_path / "r.yaml"
    p.write_text(f"""
teacher: {teacher}
out: {tmp_path / 'run'}
data: {{source: demo, seq_len: 32}}
importance: {{samples: 4, batch_size: 4}}
prune: {{target: "ffn=64"}}
distill: {{enabled: false}}
evaluate: {{eval_blocks: 2, batch_size: 2}}
""")
    logs: list[str] = []
    runner_mod.run_recipe(load_recipe(p), progress=False, log=logs.append)
    sizes = json.loads((tmp_path / "run" / "sizes" / "sizes.json").read_text())
    assert sizes["model.safetensors"] > 0
    assert any(m.startswith("[sizes] running") for m in logs) and any("sizes written to" in m for m in logs)
    assert [m.split("]")[0][1:] for m in logs if m.startswith("[") and "running" in m][-1] == "sizes"
    logs.clear()
    runner_mod.run_recipe(load_recipe(p), progress=False, log=logs.append)
    assert any(m.startswith("[sizes] cached") for m in logs)
    logs.clear()
    runner_mod.run_recipe(load_recipe(p, ["prune.target=ffn=48"]), progress=False, log=logs.append)
    assert any(m.startswith("[sizes] stale artifact") for m in logs)
