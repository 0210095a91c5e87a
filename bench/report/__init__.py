"""Stage 3, reporting: run files to tables, plots and claims."""
