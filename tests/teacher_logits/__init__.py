"""Tests of minitron_fast.teacher_logits (tests/ mirrors the package)."""
