"""Speed-ups of training."""
