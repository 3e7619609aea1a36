"""Using a trained checkpoint: its model in one process, generation (`fpa-generate`), evaluation (`fpa-eval`)."""
