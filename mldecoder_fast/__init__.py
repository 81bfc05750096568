"""mldecoder-fast: a fast, faithful ML-Decoder classification head."""
from .head.backends import backends
from .head.fast import MLDecoderFast
from .head.reference import MLDecoder
from .interop.convert import convert, is_ml_decoder_head
from .interop.layouts import head_state_dict, official_to_timm, timm_to_official
from .interop.timm_head import add_ml_decoder_head, ml_decoder_of
from .serving.cuda_graphs import cuda_graphed
from .serving.export import export_onnx

__all__ = ["MLDecoder", "MLDecoderFast", "backends", "convert", "export_onnx", "is_ml_decoder_head",
           "head_state_dict", "official_to_timm", "timm_to_official", "add_ml_decoder_head", "ml_decoder_of",
           "cuda_graphed"]
__version__ = "0.1.0"
