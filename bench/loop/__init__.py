"""Stage 2, the training loop: setup, epochs, steps, precision, checkpoints, evaluation, sharding."""
