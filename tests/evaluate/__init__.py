"""Tests of minitron_fast.evaluate (tests/ mirrors the package)."""
