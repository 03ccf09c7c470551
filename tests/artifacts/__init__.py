"""Tests of minitron_fast.artifacts (tests/ mirrors the package)."""
