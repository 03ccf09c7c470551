"""``minitron-fast eval --tasks``: lm-evaluation-harness through its HF model class, on a local
task YAML (lm_eval's own format over a JSONL file), checked against log-likelihoods computed by
hand; and the clear errors around it (no lm_eval, bad task files, unknown tasks, no data)."""
from __future__ import annotations

import json

import pytest
import torch

from bench.common import make_tiny_teacher
from minitron_fast.errors import MinitronError
from minitron_fast.evaluate import harness
from minitron_fast.evaluate.config import EvaluateConfig
from minitron_fast.evaluate.harness import LM_EVAL_MISSING, evaluate_model, lm_eval_available, resolve_tasks

needs_lm_eval = pytest.mark.skipif(not lm_eval_available(), reason="lm_eval is not installed (./run.sh installs it)")

DOCS = [
    {"question": "The help function prints", "choices": ["the documentation", "a number", "nothing at all"], "answer": 0},
    {"question": "A list in Python is", "choices": ["immutable", "a keyword", "mutable"], "answer": 2},
    {"question": "The for statement iterates over", "choices": ["a sequence", "an exception"], "answer": 0},
    {"question": "A dictionary maps keys to", "choices": ["classes", "values", "modules", "files"], "answer": 1},
    {"question": "The import statement loads", "choices": ["a module", "a float"], "answer": 0},
    {"question": "An exception is raised with", "choices": ["return", "raise", "yield"], "answer": 1},
    {"question": "Strings are sequences of", "choices": ["characters", "integers"], "answer": 0},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("lm_eval") / "tiny")


def write_task(d, name: str = "pydoc_choice", docs=DOCS):
    """A multiple-choice task in lm-evaluation-harness's YAML format over a local JSONL file."""
    d.mkdir(parents=True, exist_ok=True)
    data = d / f"{name}.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in docs))
    task = d / f"{name}.yaml"
    task.write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {d / 'hf_cache'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return task


def hand_accuracy(model_dir, docs) -> tuple[float, float]:
    """acc and acc_norm by hand: sum of log p(" " + choice | question) over the choice's tokens,
    the split into context/continuation tokens done as lm_eval does for causal models (encode the
    whole string, cut at the context's length); acc_norm divides by the choice's characters."""
    from minitron_fast.models.loading import load_model, load_tokenizer

    m, tok = load_model(model_dir), load_tokenizer(model_dir)
    acc = acc_norm = 0
    with torch.no_grad():
        for doc in docs:
            lls = []
            for choice in doc["choices"]:
                ctx = tok.encode(doc["question"])
                whole = tok.encode(doc["question"] + " " + choice)
                logp = m(torch.tensor([whole])).logits[0].double().log_softmax(-1)
                lls.append(sum(float(logp[j - 1, whole[j]]) for j in range(len(ctx), len(whole))))
            lls = torch.tensor(lls)
            acc += int(lls.argmax()) == doc["answer"]
            norm = lls / torch.tensor([float(len(c)) for c in doc["choices"]])
            acc_norm += int(norm.argmax()) == doc["answer"]
    return acc / len(docs), acc_norm / len(docs)


@needs_lm_eval
def test_local_task_yaml_matches_hand_loglikelihoods(tiny, tmp_path, capsys):
    from minitron_fast.cli import main

    task = write_task(tmp_path / "tasks")
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(tiny), "--seq-len", "32", "--eval-blocks", "2", "--batch-size", "3",
                 "--tasks", str(task), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rec = json.loads(out.read_text())
    metrics = rec["tasks"]["pydoc_choice"]
    acc, acc_norm = hand_accuracy(tiny, DOCS)
    assert metrics["acc"] == pytest.approx(acc, abs=1e-12)
    assert metrics["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(metrics)
    assert "pydoc_choice acc_norm" in printed and f"{acc:.4f}" in printed


@needs_lm_eval
def test_include_path_and_limit(tiny, tmp_path):
    """A task found by name in an --include-path directory; --limit keeps the first examples."""
    write_task(tmp_path / "tasks", name="pydoc_choice_b")
    r = evaluate_model(str(tiny), EvaluateConfig(eval_blocks=1, batch_size=2, tasks=["pydoc_choice_b"], limit=3,
                                                 include_path=[str(tmp_path / "tasks")]), seq_len=32, progress=False)
    acc, _ = hand_accuracy(tiny, DOCS[:3])
    assert r["tasks"]["pydoc_choice_b"]["acc"] == pytest.approx(acc, abs=1e-12)


@needs_lm_eval
def test_unknown_task_is_a_clear_error(tiny, tmp_path, capsys):
    from minitron_fast.cli import main

    assert main(["eval", "--model", str(tiny), "--seq-len", "32", "--eval-blocks", "1",
                 "--tasks", "arc_easyy"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("error: lm-evaluation-harness knows no task arc_easyy (arc_easyy: did you mean arc_easy")
    assert last.endswith("give a registered task name, a task YAML file, or --include-path DIR")


def test_bad_task_files_fail_before_the_model_loads(tmp_path):
    with pytest.raises(MinitronError, match="does not exist"):
        resolve_tasks([str(tmp_path / "missing.yaml")])
    (tmp_path / "noname.yaml").write_text("dataset_path: json\n")
    with pytest.raises(MinitronError, match="no `task: NAME` key"):
        resolve_tasks([str(tmp_path / "noname.yaml")])
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    with pytest.raises(MinitronError, match="not valid YAML"):
        resolve_tasks([str(tmp_path / "broken.yaml")])
    with pytest.raises(MinitronError, match="not a directory"):
        resolve_tasks(["arc_easy"], [str(tmp_path / "nope")])
    task = write_task(tmp_path / "t")
    names, dirs = resolve_tasks(["arc_easy", str(task)], [str(tmp_path / "t")])
    assert names == ["arc_easy", "pydoc_choice"] and dirs == [str((tmp_path / "t").resolve())]


def test_tasks_without_lm_eval_is_a_clear_error(tiny, capsys, monkeypatch):
    from minitron_fast.cli import main

    monkeypatch.setattr(harness, "lm_eval_available", lambda: False)
    assert main(["eval", "--model", str(tiny), "--tasks", "hellaswag"]) == 2
    assert capsys.readouterr().err == f"error: {LM_EVAL_MISSING}\n"


@needs_lm_eval
def test_pipeline_evaluate_stage_runs_tasks_and_caches(tmp_path, tiny, capsys):
    """``evaluate.tasks`` in a recipe: the teacher and the final student are scored, report.md
    shows the table, a rerun reuses the stage, and an edited task file reruns it."""
    from minitron_fast.pipeline.recipe import load_recipe
    from minitron_fast.pipeline.runner import run_recipe

    task = write_task(tmp_path / "tasks")
    p = tmp_path / "r.yaml"
    p.write_text(f"""
teacher: {tiny}
out: {tmp_path / 'run'}
data: {{source: demo, seq_len: 32}}
importance: {{samples: 4, batch_size: 4}}
prune: {{target: "ffn=64"}}
distill: {{enabled: false}}
evaluate: {{eval_blocks: 2, batch_size: 2, tasks: [{task}], limit: 4}}
""")
    logs: list[str] = []
    res = run_recipe(load_recipe(p), progress=False, log=logs.append)
    stage = json.loads((tmp_path / "run" / "evaluate" / "stage.json").read_text())
    tasks = stage["outputs"]["tasks"]
    assert tasks["teacher"]["pydoc_choice"]["acc"] == pytest.approx(hand_accuracy(tiny, DOCS[:4])[0], abs=1e-12)
    student = tmp_path / "run" / "prune" / "model"  # distill is off: the pruned student is the final one
    assert tasks["student"]["pydoc_choice"]["acc"] == pytest.approx(hand_accuracy(student, DOCS[:4])[0], abs=1e-12)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## lm-evaluation-harness tasks" in md and "| pydoc_choice | acc " in md
    assert res["report"]["pruned_ppl"] > 0
    logs.clear()
    run_recipe(load_recipe(p), progress=False, log=logs.append)
    assert any(m.startswith("[evaluate] cached") for m in logs)
    task.write_text(task.read_text().replace("  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n", ""))
    logs.clear()
    run_recipe(load_recipe(p), progress=False, log=logs.append)
    assert any(m.startswith("[evaluate] stale artifact") for m in logs)
    stage = json.loads((tmp_path / "run" / "evaluate" / "stage.json").read_text())
    assert "acc_norm" not in stage["outputs"]["tasks"]["teacher"]["pydoc_choice"]


def test_recipe_tasks_are_checked_up_front(tmp_path, tiny, monkeypatch):
    from minitron_fast.pipeline.recipe import RecipeError, load_recipe

    base = [f"teacher={tiny}", "prune.target=ffn=64"]
    with pytest.raises(RecipeError, match="evaluate.tasks: task file .* does not exist"):
        load_recipe("demo", base + [f"evaluate.tasks=[{tmp_path / 'nope.yaml'}]"])
    with pytest.raises(RecipeError, match="evaluate.limit must be at least 1"):
        load_recipe("demo", base + ["evaluate.limit=0"])
    # without lm_eval a recipe naming tasks still loads (to read or edit it); running it stops at once
    from minitron_fast.pipeline.runner import run_recipe

    monkeypatch.setattr(harness, "lm_eval_available", lambda: False)
    r = load_recipe("demo", base + ["evaluate.tasks=[arc_easy]", f"out={tmp_path / 'run'}"])
    with pytest.raises(MinitronError, match="the recipe sets evaluate.tasks but lm-evaluation-harness is not inst"):
        run_recipe(r, progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()
