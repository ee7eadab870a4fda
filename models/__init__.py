"""Model families (one folder each) and the shared hybrid-LM building blocks in common/.

models/ stands on kernels/ and on megatron-core's tensor-parallel bricks; a model opens no
process group and calls no collective of its own.
"""
