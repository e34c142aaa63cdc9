"""What a run reports about itself: the rank-0 logger, metrics sinks, phase timings."""
