"""Multi-stage jobs that chain recipes (the main job)."""
