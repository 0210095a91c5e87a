"""Stage 4, studies: recipes, sweeps, tuning and timing, built on the loop and the reports."""
