"""GPU checks: one prepared script per check, run on a lent GPU machine."""
