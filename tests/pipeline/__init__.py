"""Tests of minitron_fast.pipeline (tests/ mirrors the package)."""
