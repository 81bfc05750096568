"""Builds the optional compiled extension ``mldecoder_fast._C`` (project metadata: pyproject.toml).

- CUDAExtension (CPU + CUDA kernels) when torch is a CUDA build and a CUDA toolkit of the same
  major version is found; TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" (A100, H100/H200) when unset.
- CppExtension (CPU kernels only) otherwise, saying why (a toolkit of another major version
  cannot build for this torch), or with MLDECODER_FAST_NO_CUDA=1.
- No extension at all (pure-Python install) with MLDECODER_FAST_NO_EXT=1.

Build without isolation so the extension matches the installed torch (the environment then needs
the build requirements itself: torch, and setuptools >= 70.1, which includes bdist_wheel):
    pip install "setuptools>=70.1" && MAX_JOBS=2 pip install --no-build-isolation -e .
"""
import glob
import os
import re
import shutil
import site
import subprocess
import sys

from setuptools import setup


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


def _pip_cuda_dirs():
    """Headers and libraries of the pip CUDA wheels (nvidia/cu13 or the per-library layout):
    torch's CUDA wheels carry cuBLAS there, not in the toolkit's lib64."""
    roots = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    includes, libs = [], []
    for root in roots:
        for sub in ("nvidia/cu13", "nvidia/cu12", "nvidia/cublas", "nvidia/cuda_runtime"):
            base = os.path.join(root, sub)
            if os.path.isdir(os.path.join(base, "include")):
                includes.append(os.path.join(base, "include"))
            if os.path.isdir(os.path.join(base, "lib")):
                libs.append(os.path.join(base, "lib"))
    return includes, libs


def _cublas_link_args(cuda_home, pip_lib_dirs):
    """Link cuBLAS: the toolkit's libcublas.so if there is one, else the versioned library
    of the pip wheel (the one torch itself loads at run time)."""
    for d in [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")]:
        if os.path.exists(os.path.join(d, "libcublas.so")):
            return [f"-L{d}", "-lcublas"]
    for d in pip_lib_dirs:
        found = sorted(glob.glob(os.path.join(d, "libcublas.so.*")))
        if found:  # rpath too, in case torch has not loaded cuBLAS before the extension
            return [f"-L{d}", f"-l:{os.path.basename(found[0])}", f"-Wl,-rpath,{d}"]
    return ["-lcublas"]


def _default_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc` (/usr/local/bin/nvcc, a wrapper script here,
    gives /usr/local, which has no libcudart): take the first toolkit that has both nvcc and
    the runtime library."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for home in candidates:
        has_nvcc = os.path.exists(os.path.join(home, "bin", "nvcc"))
        has_cudart = any(glob.glob(os.path.join(home, lib, "libcudart.so*")) for lib in ("lib64", "lib"))
        if has_nvcc and has_cudart:
            os.environ["CUDA_HOME"] = home
            return


def toolkit_cuda_version(cuda_home):
    """(major, minor) of the toolkit's nvcc, or None when it cannot be run."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return (int(found[1]), int(found[2])) if found else None


def cuda_build(torch_cuda, cuda_home):
    """(whether to build the CUDA kernels, why not): torch must be a CUDA build and the toolkit at
    ``cuda_home`` of the same major CUDA version (torch's build refuses another one)."""
    if torch_cuda is None:
        return False, "this torch is a CPU build"
    if cuda_home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    toolkit = toolkit_cuda_version(cuda_home)
    if toolkit is None:
        return False, f"the CUDA toolkit at {cuda_home} has no working nvcc"
    wanted = int(torch_cuda.split(".")[0])
    if toolkit[0] != wanted:
        return False, (f"the CUDA toolkit at {cuda_home} is CUDA {toolkit[0]}.{toolkit[1]}, but this torch was "
                       f"built with CUDA {torch_cuda}: point CUDA_HOME at a CUDA {wanted}.x toolkit to build "
                       f"the 'cuda' backend's kernels")
    return True, ""


def _extensions():
    if _flag("MLDECODER_FAST_NO_EXT"):
        return [], {}
    if not _flag("MLDECODER_FAST_NO_CUDA"):
        _default_cuda_home()
    import torch
    from torch.utils import cpp_extension

    here = os.path.dirname(os.path.abspath(__file__))
    csrc = "csrc"
    cpp_sources = [os.path.join(csrc, "group_fc.cpp")]
    cxx_flags = ["-O3"]
    use_cuda, why_not = (False, "MLDECODER_FAST_NO_CUDA is set") if _flag("MLDECODER_FAST_NO_CUDA") else \
        cuda_build(torch.version.cuda, cpp_extension.CUDA_HOME)
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        includes, lib_dirs = _pip_cuda_dirs()
        ext = cpp_extension.CUDAExtension(
            "mldecoder_fast._C",
            cpp_sources + [os.path.join(csrc, "group_fc_cuda.cu")],
            include_dirs=[os.path.join(here, csrc)] + includes,
            depends=[os.path.join(csrc, "group_fc.h")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=_cublas_link_args(cpp_extension.CUDA_HOME, lib_dirs),
        )
    else:
        ext = cpp_extension.CppExtension(
            "mldecoder_fast._C", cpp_sources,
            include_dirs=[os.path.join(here, csrc)],
            depends=[os.path.join(csrc, "group_fc.h")],
            extra_compile_args={"cxx": cxx_flags},
        )
    print("mldecoder_fast._C: building the " + ("CPU+CUDA extension" if use_cuda else
                                                 f"CPU-only extension ({why_not})"), file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


if __name__ == "__main__":   # (pip's build backend runs this file as __main__; tests import it)
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
