"""linscale: dist."""
