"""Multi-task learning pieces: task losses, task-weighting strategies and metrics (SPEC section 3)."""
