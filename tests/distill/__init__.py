"""Tests of minitron_fast.distill (tests/ mirrors the package)."""
