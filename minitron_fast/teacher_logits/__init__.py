"""minitron_fast.teacher_logits: the offline teacher's top-k logits, computed once.

- :class:`TeacherLogitsConfig`: the stage's options (recipe section ``teacher_logits``, the
  ``minitron-fast teacher-logits`` flags, the entry point's argument).
- :func:`write_teacher_logits`: runs the teacher over the train split and writes the shards
  (``minitron_fast.artifacts.teacher_logits`` is the file contract and its reader).

Names are imported on first use (the CLI reads ``TeacherLogitsConfig`` without importing torch).
"""
from minitron_fast._lazy import exported_names, lazy_getattr

_EXPORTS = {
    "minitron_fast.teacher_logits.config": ("TeacherLogitsConfig",),
    "minitron_fast.teacher_logits.run": ("teacher_rows", "write_teacher_logits"),
}
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__all__ = exported_names(_EXPORTS)
