"""mldecoder-fast: a fast, faithful ML-Decoder classification head."""
from .reference import MLDecoder

__all__ = ["MLDecoder"]
__version__ = "0.1.0"
