"""File contracts between stages: one module per artifact (``teacher_logits``: offline teacher logits)."""
