"""fpa-plan: which layouts of a config fit on N GPUs, their per-GPU memory term by term, ranked by step time."""
