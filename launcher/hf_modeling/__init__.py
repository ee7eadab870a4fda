"""The modeling code an HF export ships (self-contained: imports nothing from plait)."""
