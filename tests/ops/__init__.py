"""Tests of minitron_fast.ops (tests/ mirrors the package)."""
