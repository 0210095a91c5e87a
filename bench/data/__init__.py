"""Stage 1, data: datasets in memory (``load``), read by loader workers (``loader``), prepared for a run."""
