"""linscale: models."""
