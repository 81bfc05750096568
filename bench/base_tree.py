"""A worktree of a base commit beside this checkout, for the scripts that compare the two
(``same_numbers.py``: the same bits; ``ab_timing.py``: the same speed)."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def worktree_at(commit: str):
    """Yields (the base commit's tree, a scratch folder, whether its csrc/ is this checkout's). When
    it is, this checkout's compiled extension is copied into the tree (the same sources build the
    same library); else the tree has none. Both are removed afterwards."""
    tmp = tempfile.mkdtemp(prefix="base_tree_")
    tree = os.path.join(tmp, "tree")
    subprocess.run(["git", "-C", HERE, "worktree", "add", "--detach", "-q", tree, commit], check=True)
    try:
        same_csrc = subprocess.run(["git", "-C", HERE, "diff", "--quiet", commit, "--", "csrc"]).returncode == 0
        if same_csrc:
            for f in os.listdir(os.path.join(HERE, "mldecoder_fast")):
                if f.startswith("_C") and f.endswith(".so"):
                    shutil.copy(os.path.join(HERE, "mldecoder_fast", f), os.path.join(tree, "mldecoder_fast", f))
        yield tree, tmp, same_csrc
    finally:
        subprocess.run(["git", "-C", HERE, "worktree", "remove", "--force", tree], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
