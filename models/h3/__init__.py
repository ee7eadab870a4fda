"""H3 (Fu et al., 2023): shift + diagonal state-space layers with multiplicative gates, letter
``H``, mixed with softmax attention ``A`` at the published positions."""
