"""Serving a trained head: eval forwards replayed as CUDA graphs (cuda_graphs.py), ONNX export
(export.py) and prediction from a checkpoint (predict.py). The one loader of users' files is
``mldecoder_fast/safe_load.py`` (training reads it too)."""
