"""Benchmarks of the ML-Decoder head: the ``mldecoder-fast bench`` command and its building blocks.

configs  the standard configurations of docs/design.md (and shrunken copies for quick runs)
expert   the eager-expert head: the best plain-PyTorch head a PyTorch-savvy user would write
flops    FLOP and byte counts of one forward / training step (the roofline floor)
timing   medians after warm-up, CUDA events, peak memory
runner   implementations x modes on one configuration, with the agreement check
report   table, JSON and markdown
scaling  time and memory vs number of classes, drawn as a PNG
cli      ``mldecoder-fast bench``
"""
