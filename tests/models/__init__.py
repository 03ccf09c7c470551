"""Tests of minitron_fast.models (tests/ mirrors the package)."""
