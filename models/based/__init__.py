"""Based (Arora et al., 2024): Taylor linear attention ``B`` + sliding window ``W`` + gated
short convolutions ``C``."""
