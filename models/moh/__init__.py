"""MoH (Jin et al., 2024): Mixture-of-Head attention, letter ``M``."""
