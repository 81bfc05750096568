"""``python -m mldecoder_fast.cli``: the ``mldecoder-fast`` command."""
import sys

from . import main

sys.exit(main())
