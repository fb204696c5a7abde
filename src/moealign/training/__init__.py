"""Training: the loop, its objective and callbacks, routing statistics, checkpoints, run folders
and logger mirrors."""
