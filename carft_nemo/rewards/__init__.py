"""Answer extraction, ReFT correctness rewards, and the sandbox for P-CoT programs."""
