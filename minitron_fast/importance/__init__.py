"""minitron_fast.importance stage."""
