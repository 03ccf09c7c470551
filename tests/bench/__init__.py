"""Tests of bench/ (the benchmarks and their helpers)."""
