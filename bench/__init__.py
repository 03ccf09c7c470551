"""minitron_fast benchmarks: ``python -m bench NAME [--json FILE] [--quick]``."""
