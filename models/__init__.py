"""Model families (one folder each), the shared hybrid-LM building blocks in common/, and the
registry that makes the families' letters known (imported here, so that any import of
plait.models registers plait's own families before a config is read or a model is built).

models/ stands on kernels/ and on megatron-core's tensor-parallel bricks; a model opens no
process group and calls no collective of its own.
"""

from . import registry  # noqa: F401  (registers the families)
