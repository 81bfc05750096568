"""Benchmarks of the ML-Decoder head: the ``mldecoder-fast bench`` command and its building blocks.

configs  the standard configurations of docs/design.md (and shrunken copies for quick runs)
expert   the eager-expert head: the best plain-PyTorch head a PyTorch-savvy user would write
flops    FLOP and byte counts of one forward / training step (the roofline floor)
timing   medians after warm-up, CUDA events, peak memory
contenders  what runs side by side: the reference, the eager-expert, torch.compile, each backend,
            CUDA-graphed forms, ONNX Runtime
cases    one (configuration, mode, device, dtype, batch): weights, inputs, the timed step
agreement  outputs and gradients against the float64 reference, NaN propagation
runner   every implementation on one case: checked, timed, measured; a suite of cases
record   the JSON record of a run (meta, rows, skipped)
tables   a record's rows as text and markdown tables
goals    the CPU and GPU targets and their verdicts (``python -m mldecoder_fast.benchmark.goals``)
report   BENCHMARKS.md from records (``python -m mldecoder_fast.benchmark.report``)
scaling  time and memory vs number of classes, drawn as a PNG
cli      ``mldecoder-fast bench``
"""
