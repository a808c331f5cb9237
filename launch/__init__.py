"""linscale: launch."""
