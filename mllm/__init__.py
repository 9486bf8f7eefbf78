"""mllm: the memory system built on mllm_kernels (encoders, rankers, HierarchicalMemory).

The module layer is being built; for now the package holds the command line and its demo of
the fused ops (``python -m mllm demo``).
"""
