"""minitron_fast.distill stage."""
