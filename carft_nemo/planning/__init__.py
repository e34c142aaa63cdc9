"""Memory planning before launch: per-GPU estimates of every role (memory.py), a run's plan
and the start-up refusal (plan.py)."""
