"""linscale: models/ops."""
