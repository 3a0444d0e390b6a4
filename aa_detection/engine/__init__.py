"""Training, evaluation and comparison of runs."""
