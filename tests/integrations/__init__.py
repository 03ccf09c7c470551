"""Tests of minitron_fast.integrations (tests/ mirrors the package)."""
