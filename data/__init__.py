"""Data: corpus reading, sentencepiece tokenizers, token preparation, packed loaders.

data/ stands on the ground of the house plan: it imports numpy, sentencepiece, torch and
friends, never the rest of plait.
"""
