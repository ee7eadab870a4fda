"""TransNormerLLM (Qin et al., 2023): lightning attention with decay + SGLU, letter ``L``."""
