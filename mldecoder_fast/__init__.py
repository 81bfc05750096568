"""mldecoder-fast: a fast, faithful ML-Decoder classification head."""
from .checkpoints import head_state_dict, official_to_timm, timm_to_official
from .convert import convert, is_ml_decoder_head
from .cuda_graphs import cuda_graphed
from .dispatch import backends
from .export import export_onnx
from .module import MLDecoderFast
from .reference import MLDecoder
from .timm_head import add_ml_decoder_head, ml_decoder_of

__all__ = ["MLDecoder", "MLDecoderFast", "backends", "convert", "export_onnx", "is_ml_decoder_head",
           "head_state_dict", "official_to_timm", "timm_to_official", "add_ml_decoder_head", "ml_decoder_of",
           "cuda_graphed"]
__version__ = "0.1.0"
