"""SeqBoat (Ren et al., 2023): sparse modular activation of a GAU by a learned router over a
multi-head EMA, letter ``S``."""
