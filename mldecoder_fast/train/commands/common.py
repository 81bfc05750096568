"""What the ``mldecoder-fast train RECIPE`` commands share: running a recipe on one process or under
torchrun with data errors reported as one line (exit status 2), loading the data on every rank with
rank 0's file check deciding for all, and the description of the model."""
from __future__ import annotations

import sys

from .. import distributed as D
from ..checkpoint import CheckpointError
from ..datasets import BadImageError
from ..formats.common import DataError

ERRORS = (DataError, BadImageError, CheckpointError, FileNotFoundError)


def run_recipe(args, body) -> int:
    """``body(args, info)`` in the process group torchrun describes (or one process); a bad file,
    image or checkpoint ends it with ``error: ...`` on stderr and exit status 2."""
    info = D.init_distributed(args.device)
    try:
        return body(args, info)
    except ERRORS as exc:
        print(f"error (rank {info.rank}): {exc}" if info.distributed else f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        D.destroy_distributed(info)


def load_on_every_rank(load, info: D.DistInfo):
    """``load()`` on every rank; a ``DataError`` on any rank (rank 0 checks the image files) is
    raised on all of them rather than leaving the others waiting."""
    error, result = None, None
    try:
        result = load()
    except DataError as exc:
        error = str(exc)
    error = D.broadcast_object(error, info)
    if error:
        raise DataError(error)
    return result


def model_description(model_name: str, head: str) -> str:
    return f"{model_name} + {'MLDecoderFast' if head == 'fast' else 'MLDecoder (reference)'}"
