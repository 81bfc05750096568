"""``python -m mldecoder_fast.train.imagenet21k OUT ...``: the command of the ImageNet-21K-style
data generator, ``mldecoder_fast.train.synthetic.imagenet21k`` (see there)."""
import sys

from .synthetic.imagenet21k import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
