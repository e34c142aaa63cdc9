"""What runs inside a sandbox: standard library only, nothing of carft_nemo is imported there."""
