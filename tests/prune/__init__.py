"""Tests of minitron_fast.prune (tests/ mirrors the package)."""
