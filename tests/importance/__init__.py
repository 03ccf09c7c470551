"""Tests of minitron_fast.importance (tests/ mirrors the package)."""
