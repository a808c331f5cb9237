"""linscale: parallel."""
