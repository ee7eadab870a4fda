"""The command-line programs (train, export) and what they share: config, engine, checkpoints.

megatron-core announces at import, on every machine without Transformer Engine and Apex (every
CPU machine), that it falls back to its own implementations; the programs here silence that one
notice so that a user's mistake is the one line they print.
"""

import warnings

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
