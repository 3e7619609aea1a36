"""`fpa-ablate`: studies that compare FPA arms with the same data, steps and seeds, and report what the runs logged."""
