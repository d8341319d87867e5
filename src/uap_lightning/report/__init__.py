"""What runs and sweeps leave behind: figures, run files, sweep summaries."""
