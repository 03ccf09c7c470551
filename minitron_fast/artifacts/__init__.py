"""minitron_fast.artifacts: the files stages exchange, one module per file contract.

- :mod:`~minitron_fast.artifacts.scores`: the importance scores file (safetensors + JSON
  metadata): ``save_scores``, ``load_scores``, ``scores_tensors``.
- :mod:`~minitron_fast.artifacts.plan`: the prune plan (JSON): ``Plan``, ``validate_plan``.
- :mod:`~minitron_fast.artifacts.targets`: the one target/budget grammar (``hidden=3072,...``,
  ``params=0.5x``, ``90M``) and its resolution to a shape.
- :mod:`~minitron_fast.artifacts.teacher_logits`: the offline teacher's top-k logits (sharded
  safetensors + manifest): ``TeacherLogits`` (the reader), ``model_rows``, ``encode``/``decode``.

This package sits below the stages: it may import ``minitron_fast.models``, never a stage.
Submodules are imported on use (``from minitron_fast.artifacts.plan import Plan``).
"""
