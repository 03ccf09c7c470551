"""minitron_fast.prune stage."""
