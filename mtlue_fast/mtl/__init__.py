"""Multi-task learning pieces: task losses, task-weighting strategies and metrics (docs/method.md section 3)."""
