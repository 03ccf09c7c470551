"""Tests of minitron_fast.data (tests/ mirrors the package)."""
