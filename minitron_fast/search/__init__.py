"""minitron_fast.search stage."""
