"""Thin CLI subcommands: each parses arguments and calls a stage's Python API."""
