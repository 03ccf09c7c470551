"""One typed config per stage: the recipe section, the entry point's argument, the CLI flags and
the runner's cache key are the same dataclass fields, so a name or a default cannot differ."""
from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import typing

import pytest
import torch

from minitron_fast import configtools
from minitron_fast.cli import build_parser, main
from minitron_fast.configtools import DeviceConfig, DeviceMapConfig
from minitron_fast.distill.config import DistillConfig
from minitron_fast.evaluate.config import EvaluateConfig
from minitron_fast.export.config import ExportConfig
from minitron_fast.importance.config import ImportanceConfig
from minitron_fast.pipeline.recipe import DistillSection, Recipe, ScratchSection, TrainingSection, load_recipe
from minitron_fast.pipeline.runner import TASK_FIELDS, PipelineRunner
from minitron_fast.pipeline.stages import stage_key
from minitron_fast.teacher_logits.config import TeacherLogitsConfig
from minitron_fast.prune.config import PruneConfig
from minitron_fast.search.config import SearchConfig

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")

# subcommand -> (its config class, the fields it takes from the class (None: all), minimal argv)
COMMAND_CONFIGS = [
    pytest.param("importance", ImportanceConfig, None, ["--model", "m", "--out", "o"], id="importance"),
    pytest.param("search", SearchConfig, None, ["--model", "m", "--scores", "s", "--params", "0.5x"], id="search"),
    pytest.param("search", PruneConfig, ("depth_metric", "depth_mode"), ["--model", "m", "--scores", "s", "--params",
                                                                         "0.5x"], id="search-prune"),
    pytest.param("prune", PruneConfig, None, ["--model", "m"], id="prune"),
    pytest.param("eval", EvaluateConfig, None, ["--model", "m"], id="eval"),
    pytest.param("teacher-logits", TeacherLogitsConfig, None, ["--model", "m", "--out", "o"], id="teacher-logits"),
]


@pytest.mark.parametrize("command, cls, only, argv", COMMAND_CONFIGS)
def test_flags_are_the_config_fields_with_the_same_defaults(command, cls, only, argv):
    args = build_parser().parse_args([command, *argv])
    cfg = configtools.from_args(cls, args, only=only)
    want = cls(**({"params": "0.5x"} if cls is SearchConfig else {}))
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        if not f.metadata.get("cli", True):
            assert not hasattr(args, f.name), f"{command}: recipe-only key {f.name} has a flag"
            continue
        assert hasattr(args, f.name), f"{command} has no flag for {cls.__name__}.{f.name}"
        assert getattr(cfg, f.name) == getattr(want, f.name), f"{command} --{f.name}: default differs"


def test_flag_names_values_and_aliases():
    p = build_parser()
    a = p.parse_args(["search", "--model", "m", "--scores", "s", "--params", "90M", "--retrain-steps", "7",
                      "--max-candidates", "2", "--kinds", "width,mixed", "--no-head-pruning",
                      "--seed", "3", "--device", "cpu", "--dtype", "bfloat16", "--depth-metric", "lm_loss_block"])
    cfg = configtools.from_args(SearchConfig, a)
    assert (cfg.retrain_steps, cfg.max_candidates, cfg.kinds, cfg.prune_heads, cfg.seed,
            cfg.device, cfg.dtype) == (7, 2, ["width", "mixed"], False, 3, "cpu", "bfloat16")
    assert SearchConfig().kinds == ["width", "depth", "mixed", "kv"]  # KV groups are searched unless left out
    assert configtools.from_args(PruneConfig, a, only=("depth_metric",)).depth_metric == "lm_loss_block"
    a = p.parse_args(["prune", "--model", "m", "--streaming"])  # the old flag still parses (now the default)
    assert a.streaming is True and p.parse_args(["prune", "--model", "m", "--in-memory"]).streaming is False
    a = p.parse_args(["eval", "--model", "m", "--include-path", "a", "--include-path", "b", "--tasks", "x,y"])
    assert configtools.from_args(EvaluateConfig, a).include_path == ["a", "b"]
    assert configtools.from_args(EvaluateConfig, a).tasks == ["x", "y"]


def test_parser_imports_no_torch():
    code = ("import sys; from minitron_fast.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


def test_recipe_sections_are_the_stage_configs():
    hints = typing.get_type_hints(Recipe)
    assert hints["importance"] is ImportanceConfig and hints["search"] is SearchConfig
    assert hints["prune"] is PruneConfig and hints["evaluate"] is EvaluateConfig and hints["export"] is ExportConfig
    assert hints["distill"] is DistillSection and issubclass(DistillSection, TrainingSection)
    assert hints["scratch"] is ScratchSection and hints["teacher_logits"] is TeacherLogitsConfig
    trainer = {f.name for f in dataclasses.fields(DistillConfig)}
    assert {f.name for f in dataclasses.fields(TrainingSection)} == trainer - {"mode", "label", "teacher", "student",
                                                                              "out", "teacher_logits"} | {"enabled"}
    # distill's own keys: the kind of teacher (online, or offline: stored logits, the teacher_logits stage)
    # and stored_logits (logits written earlier, which the teacher_logits stage checks and reads)
    assert {f.name for f in dataclasses.fields(DistillSection)} - {f.name for f in dataclasses.fields(TrainingSection)} \
        == {"teacher", "stored_logits"}
    for cls in (ImportanceConfig, SearchConfig, PruneConfig, DistillConfig):
        assert issubclass(cls, DeviceConfig)
    assert issubclass(ImportanceConfig, DeviceMapConfig) and issubclass(EvaluateConfig, DeviceMapConfig)
    r = load_recipe("demo", ["distill.loss.temperature=2", "scratch.steps=5"])
    assert r.distill.loss.temperature == 2.0 and r.scratch.steps == 5 and r.scratch.micro_batch_size is None


# -- the cache key: every field of every stage config reaches the stage ----------------------------------

def _other(value, tp, f):
    """A different value of the annotated type ``tp`` (for ``f``, a dataclass field)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        inner = next(a for a in args if a is not type(None))
        return _other(value, inner, f) if value is not None else _other(None, inner, f)
    choices = f.metadata.get("choices") if f is not None else None
    if tp is bool:
        return not value
    if tp is int:
        return 7 if value is None else value + 1
    if tp is float:
        return 0.5 if value is None else value * 2 + 0.25
    if tp is str:
        if choices:
            return next(c for c in choices if c != value)
        return "x" if value is None else value + "x"
    if origin is list:
        return list(value or []) + ([choices[0]] if choices else [[1, 2]] if f.name == "pairs" else ["x"])
    raise AssertionError(f"no variation for {f.name}: {tp}")


def _leaves(obj, prefix=()):
    """(path, field, type) of every non-dataclass field under the dataclass ``obj``; a None
    dataclass-valued field (scratch.deepspeed: inherit distill's) is one leaf set to its default."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp, v = hints[f.name], getattr(obj, f.name)
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        dc = tp if dataclasses.is_dataclass(tp) else inner[0] if inner and dataclasses.is_dataclass(inner[0]) else None
        if dc is not None and v is not None:
            yield from _leaves(v, prefix + (f.name,))
        else:
            yield prefix + (f.name,), f, (dc or tp)


def _set(obj, path, value):
    for p in path[:-1]:
        obj = getattr(obj, p)
    setattr(obj, path[-1], value)


STAGE_SECTIONS = [("teacher_eval", "evaluate"), ("correct_teacher", "correct_teacher"), ("importance", "importance"),
                  ("search", "search"), ("prune", "prune"), ("distill", "distill"), ("scratch", "scratch"),
                  ("evaluate", "evaluate"), ("export", "export"), ("teacher_logits", "teacher_logits")]


def _key(recipe, stage):
    return stage_key(stage, PipelineRunner(recipe, log=lambda s: None).stage_inputs(stage, upstream={"upstream": "u"}))


@pytest.mark.parametrize("stage, section", [pytest.param(*s, id=s[0]) for s in STAGE_SECTIONS])
def test_every_config_field_changes_its_stage_key(stage, section):
    base = load_recipe("demo", ["search.enabled=true"])
    k0 = _key(base, stage)
    checked = 0
    for path, f, tp in _leaves(getattr(base, section)):
        if path == ("enabled",):  # decides whether the stage runs at all (stage_enabled), not how
            continue
        if stage == "distill" and path == ("stored_logits",):  # the teacher_logits stage's input (below)
            continue
        if stage == "teacher_eval" and path[0] in TASK_FIELDS:  # lm-eval options: the evaluate stage's
            continue
        if path[0] == "on_policy" and stage != "distill":  # only distill runs on-policy (lmbda > 0 refused)
            continue
        b0, k_base = base, k0
        if path[0] == "on_policy" and path[-1] != "lmbda":  # the rollout options matter once it is on
            b0 = copy.deepcopy(base)
            b0.distill.on_policy.lmbda = 0.5
            k_base = _key(b0, stage)
        r = copy.deepcopy(b0)
        if dataclasses.is_dataclass(tp):
            new = tp()  # scratch.data/deepspeed None -> an explicit section of its own
        else:
            holder = getattr(r, section)
            for p in path[:-1]:
                holder = getattr(holder, p)
            old = getattr(holder, path[-1])
            new = _other(old, typing.get_type_hints(type(holder))[path[-1]], f)
        _set(getattr(r, section), path, new)
        assert _key(r, stage) != k_base, f"{stage}: changing {section}.{'.'.join(path)} does not change the cache key"
        checked += 1
    assert checked >= 1 or section == "export"  # export has no option besides enabled


def test_recipe_wide_values_reach_the_stages():
    base = load_recipe("demo", ["search.enabled=true"])
    for stage in ("search", "correct_teacher", "distill", "scratch"):  # the seed (search's key left it out)
        assert _key(dataclasses.replace(base, seed=1), stage) != _key(base, stage), stage
    for stage in ("importance", "search", "prune", "distill", "teacher_eval"):
        r = copy.deepcopy(base)
        r.data.seq_len = 128
        assert _key(r, stage) != _key(base, stage), stage
    r = copy.deepcopy(base)
    r.search.seed = 0  # explicit and equal to the recipe's seed: the same search
    assert _key(r, "search") == _key(base, "search")
    r = copy.deepcopy(base)
    r.prune.depth_mode = "top"  # search prunes its candidates as prune would
    assert _key(r, "search") != _key(base, "search")
    r.prune.target = "layers=2"  # ... but the target is the search's output, not its input
    r.prune.depth_mode = base.prune.depth_mode
    assert _key(r, "search") == _key(base, "search")
    r = copy.deepcopy(base)
    r.evaluate.tasks, r.evaluate.limit = ["hellaswag"], 5  # lm-eval tasks rerun no perplexity stage
    for stage in ("teacher_eval", "correct_teacher", "importance", "prune", "distill", "scratch"):
        assert _key(r, stage) == _key(base, stage), stage


# -- device, dtype, attention: passed to the loader; cuda without CUDA fails first -------------------------

@NO_CUDA
def test_device_cuda_without_cuda_is_one_line_before_loading(tmp_path, capsys):
    for argv in (["importance", "--model", str(tmp_path / "absent"), "--out", str(tmp_path / "s.safetensors")],
                 ["eval", "--model", str(tmp_path / "absent")],
                 ["search", "--model", "demo", "--scores", "s", "--params", "0.5x"]):
        assert main(argv + ["--device", "cuda"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "CUDA is not available" in err and err.count("\n") == 1, err
    with pytest.raises(Exception, match="CUDA is not available"):
        DistillConfig(teacher="t", student="s", device="cuda").validate().train_device()
    from minitron_fast.pipeline.runner import run_recipe

    for override in ("importance.device=cuda", "distill.device=cuda:0", "evaluate.device=cuda"):
        with pytest.raises(Exception, match=r"device=cuda.* CUDA is not available") as e:
            run_recipe(load_recipe("demo", [override]), out=tmp_path / "run", log=lambda s: None)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "run").exists()  # nothing ran, nothing was written


def test_bad_device_and_dtype_values_fail_at_load():
    with pytest.raises(Exception, match=r"^importance\.device='gpu' is not one of cpu, cuda, cuda:N, auto"):
        load_recipe("demo", ["importance.device=gpu"])
    with pytest.raises(Exception, match=r"^evaluate\.dtype='fp8' is not one of float32, bfloat16, float16"):
        load_recipe("demo", ["evaluate.dtype=fp8"])
    with pytest.raises(Exception, match=r"^distill: dtype=bfloat16 disagrees with deepspeed\.bf16=false"):
        load_recipe("demo", ["distill.dtype=bfloat16"])


def test_shipped_gpu_recipes_run_on_cuda_in_bf16_and_the_demo_on_the_cpu_default():
    for name in ("llama3.1-8b-to-4b-width", "llama3.1-8b-to-4b-depth", "mistral-nemo-12b-to-8b"):
        r = load_recipe(name)
        for section in ("importance", "evaluate", "correct_teacher", "distill"):
            s = getattr(r, section)
            assert (s.device, s.dtype, s.attn_implementation) == ("cuda", "bfloat16", "sdpa"), (name, section)
    r = load_recipe("demo")
    for section in ("importance", "search", "prune", "evaluate", "correct_teacher", "distill", "scratch"):
        s = getattr(r, section)
        assert (s.device, s.dtype, s.attn_implementation) == ("auto", None, None), section


def test_stage_entry_points_pass_device_dtype_and_attention_to_the_loader(monkeypatch, tmp_path, tiny_builders):
    import minitron_fast.models.loading as loading
    from minitron_fast.evaluate.harness import evaluate_model
    from minitron_fast.importance import run_importance

    model = tiny_builders["llama"]()
    src = tmp_path / "m"
    model.save_pretrained(src)
    calls = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda path, **kw: calls.append(kw) or real(path, **kw))
    monkeypatch.setattr(loading, "load_tokenizer", lambda path: _CharTokenizer())
    run_importance(src, "demo", out=tmp_path / "s.safetensors", heatmap_png=False, progress=False,
                   config=ImportanceConfig(samples=2, seq_len=16, batch_size=2, device="cpu", dtype="bfloat16",
                                           attn_implementation="eager"))
    evaluate_model(str(src), EvaluateConfig(eval_blocks=1, dtype="float16", attn_implementation="eager",
                                            device_map="cpu"), seq_len=16, progress=False)
    assert calls[0] == {"device": "cpu", "dtype": "bfloat16", "attn_implementation": "eager"}
    assert calls[1] == {"device": "cpu", "dtype": "float16", "attn_implementation": "eager", "device_map": "cpu"}


class _CharTokenizer:
    """Bytes as token ids below the tiny model's vocabulary: enough for token_blocks."""

    eos_token_id = 0

    def __call__(self, texts, **kw):
        return {"input_ids": [[1 + (b % 60) for b in t.encode()] for t in texts]}

    def encode(self, text, **kw):
        return [1 + (b % 60) for b in text.encode()]


# -- parity: depth metrics and search axes ------------------------------------------------------------------

def test_recipe_offers_every_depth_metric_with_a_block_size():
    from minitron_fast.prune.config import DEPTH_METRICS
    from minitron_fast.prune.plan import DEPTH_METRICS as PLAN_METRICS

    assert DEPTH_METRICS == PLAN_METRICS
    r = load_recipe("demo", ["prune.depth_metric=lm_loss_block", "importance.depth_lm_loss=true",
                             "importance.depth_block=4", "prune.target=layers=26"])
    assert r.prune.depth_metric == "lm_loss_block" and r.importance.depth_block == 4
    with pytest.raises(Exception, match=r"lm_loss_block needs importance\.depth_block"):
        load_recipe("demo", ["prune.depth_metric=lm_loss_block", "importance.depth_lm_loss=true"])
    assert load_recipe("llama3.1-8b-to-4b-depth").prune.depth_metric == "lm_loss_block"


def test_search_considers_kv_group_pruning(tiny_builders):
    from minitron_fast.models import view_class_for_config
    from minitron_fast.search.candidates import enumerate_candidates
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    full = view_class_for_config(cfg).count_params(cfg)["total"]
    with_kv = enumerate_candidates(cfg, int(0.8 * full), tolerance=0.1, max_per_kind=None)  # the default kinds
    without = enumerate_candidates(cfg, int(0.8 * full), tolerance=0.1, kinds=["width", "depth", "mixed"],
                                   max_per_kind=None)
    assert {c.geometry.num_key_value_heads for c in without} == {4}
    kv = [c for c in with_kv if c.kind == "kv"]
    assert {c.geometry.num_key_value_heads for c in kv} == {1, 2, 3}
    assert [c for c in with_kv if c.kind != "kv"] == without  # the kv kind adds shapes, it changes no other
    for c in kv:
        g = c.geometry
        assert g.num_attention_heads % g.num_key_value_heads == 0 and f"kv_heads={g.num_key_value_heads}" in c.target()


def test_impl_that_cannot_run_here_is_one_line_naming_the_ones_that_can(monkeypatch, tmp_path, capsys):
    import minitron_fast._ext as ext

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a user's CPU machine
    assert main(["importance", "--model", str(tmp_path / "absent"), "--out", str(tmp_path / "s"), "--device", "cpu",
                 "--impl", "triton"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: impl=triton cannot run on cpu") and err.endswith("these run: auto, torch\n")
    monkeypatch.setattr(ext, "HAS_C", False)
    with pytest.raises(Exception, match=r"^prune\.impl=cpp cannot run here \(minitron_fast\._C is not built\); "
                                        r"here these run: auto, torch$"):
        PipelineRunner(load_recipe("demo", ["prune.streaming=false", "prune.impl=cpp"]), out=tmp_path / "r",
                       log=lambda s: None).check_devices()
    PruneConfig(impl="cpp").check_impl("cpu")  # streaming prunes never compact: nothing to refuse


def test_dumped_recipe_loads_back_identical(tmp_path):
    """``run --dry-run`` output and ``<out>/recipe.yaml`` (every key, defaults filled) are recipes."""
    from minitron_fast.pipeline.recipe import dump_recipe, shipped_recipes

    for name in shipped_recipes():
        r = load_recipe(name)
        p = tmp_path / f"{name}.yaml"
        p.write_text(dump_recipe(r))
        assert load_recipe(p).to_dict() == r.to_dict(), name


def test_cli_errors_name_the_flag_and_recipe_errors_the_key(capsys, tmp_path):
    argv = ["search", "--model", "demo", "--scores", "s", "--params", "0.5x"]
    for extra, msg in ((["--max-candidates", "0"], "--max-candidates must be at least 1, got 0"),
                       (["--lr", "nan"], "--lr must be a finite positive number"),
                       (["--micro-batch-size", "0"], "--micro-batch-size must be at least 1"),
                       (["--kinds", "width,wide"], "--kinds='wide' is not one of width, depth, mixed, kv")):
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {msg}") and err.count("\n") == 1, err
    with pytest.raises(Exception, match=r"^search\.max_candidates must be at least 1, got 0$"):
        load_recipe("demo", ["search.max_candidates=0"])
    (tmp_path / "latin1.yaml").write_bytes("teacher: caf\xe9\n".encode("latin-1"))
    with pytest.raises(Exception, match=r"is not UTF-8 text"):
        load_recipe(tmp_path / "latin1.yaml")


def test_stored_logits_reach_distill_through_the_teacher_logits_key(tmp_path):
    """``distill.stored_logits`` is the teacher_logits stage's input (its manifest's identity), so
    distill, whose key holds that stage's, is redone when other logits are named."""
    from minitron_fast.pipeline.table import BY_NAME

    m = tmp_path / "a"
    m.mkdir()
    (m / "manifest.json").write_text('{"run": "r1", "written": "t1"}')
    base = load_recipe("demo", ["distill.teacher=offline", "correct_teacher.enabled=false"])
    stored = load_recipe("demo", ["distill.teacher=offline", "correct_teacher.enabled=false",
                                  f"distill.stored_logits={m}"])
    runner = PipelineRunner(stored, log=lambda s: None)
    assert runner.identity("stored_logits", stage="teacher_logits") == {"run": "r1", "written": "t1"}
    assert ("stored", "stored_logits") in BY_NAME["teacher_logits"].inputs
    from minitron_fast.pipeline.runner import _SKIPPED

    assert PipelineRunner(base, log=lambda s: None).identity("stored_logits", stage="teacher_logits") is _SKIPPED
    (m / "manifest.json").write_text('{"run": "r2", "written": "t2"}')
    assert runner.identity("stored_logits", stage="teacher_logits") == {"run": "r2", "written": "t2"}
