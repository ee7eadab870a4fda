"""Passkey retrieval: a number hidden at a chosen depth of filler text, asked for at the end.

The probe of long-context recall used by Landmark Attention and LongLoRA: "There is an
important info hidden inside a lot of irrelevant text. ... The pass key is 71432. Remember
it. ... What is the pass key? The pass key is" followed by the key. A model that uses its
context predicts the key's digits; one whose memory fades, or whose positions break beyond
its training length, does not. Built from token pieces (each piece encoded on its own), so the
sequence has exactly the requested length and the key's tokens sit at known positions.
"""

from __future__ import annotations

import numpy as np

from .tokenizer import Tokenizer

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"


def passkey_batch(
    tok: Tokenizer, length: int, depth: float, samples: int, seed: int
) -> dict[str, np.ndarray]:
    """``samples`` sequences of exactly ``length`` tokens with a 5-digit key whose statement
    starts at ``depth`` (0: right after the introduction, 1: just before the question).
    Returns tokens [S, length], and answer_mask [S, length]: 1 at the positions whose next
    token is a digit of the answer (where the model's prediction is scored)."""
    rng = np.random.default_rng([seed, length, int(depth * 1000)])
    intro, filler, question = tok.encode(INTRO), tok.encode(FILLER), tok.encode(QUESTION)
    tokens = np.zeros((samples, length), dtype=np.int64)
    mask = np.zeros((samples, length), dtype=np.float32)
    for s in range(samples):
        key = int(rng.integers(10_000, 100_000))
        needle = tok.encode(f"The pass key is {key}. Remember it. {key} is the pass key.")
        answer = tok.encode(f" {key}")
        room = length - len(intro) - len(needle) - len(question) - len(answer)
        if room < 0:
            raise ValueError(f"passkey: {length} tokens are too few for the prompt ({-room} short)")
        hay = (filler * (room // len(filler) + 1))[:room]
        cut = int(round(depth * room))
        seq = intro + hay[:cut] + needle + hay[cut:] + question + answer
        tokens[s] = seq
        start = length - len(answer)
        mask[s, start - 1 : length - 1] = 1.0
    return {"tokens": tokens, "answer_mask": mask}
