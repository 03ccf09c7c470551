"""minitron_fast.teacher_logits: the offline teacher's top-k logits, computed once.

- :class:`TeacherLogitsConfig`: the stage's options (recipe section ``teacher_logits``, the
  ``minitron-fast teacher-logits`` flags).
- :func:`write_teacher_logits`: runs the teacher over the train split and writes the shards
  (``minitron_fast.artifacts.teacher_logits`` is the file contract and its reader).
"""
from minitron_fast.teacher_logits.config import TeacherLogitsConfig, TeacherLogitsConfigError
from minitron_fast.teacher_logits.run import teacher_rows, write_teacher_logits

__all__ = ["TeacherLogitsConfig", "TeacherLogitsConfigError", "teacher_rows", "write_teacher_logits"]
