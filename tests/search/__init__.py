"""Tests of minitron_fast.search (tests/ mirrors the package)."""
