"""minitron_fast.integrations stage."""
