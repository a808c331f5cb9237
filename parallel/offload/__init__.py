"""linscale: parallel/offload."""
