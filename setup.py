"""Builds the fused conv-pool-ReLU operator (src/fmnist/csrc/convpool.cpp) as the extension fmnist._C.

The project's metadata lives in pyproject.toml; this file only declares the extension. It is
compiled against the torch that will run it, so it is built without build isolation (which would
install a second, multi-GB torch just for the build): `make` installs everything else from uv.lock
first, then this package (pyproject.toml's ``no-build-isolation-package``); by hand

    uv sync --locked --all-extras --no-install-project && uv sync --locked --all-extras

The extension is optional: without a C++ compiler the package installs without it, and
fmnist.kernels says so (params.yaml's ``cpu_kernel: torch`` then runs PyTorch's layers).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import sys
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

SOURCE = "src/fmnist/csrc/convpool.cpp"  # relative, as setuptools wants; kernels.py hashes the same file

# Fixed flags, never -march=native, so that the binary is the same on every machine. On x86-64
# the kernel's 8-float vectors become AVX2 instructions (Haswell, Zen 1 and later; AVX-512
# machines run the same code): 3-5x as fast as the SSE2 baseline. -ffp-contract=off, deliberately:
# each w * x is rounded, then added, exactly as the source says, so the bits are fixed by the
# source alone, not by where a compiler chooses to fuse multiply-adds. Measured here: builds for
# SSE2, AVX2 and -march=native (AVX-512) give bit-identical results with "off", and the training
# step is as fast as with "fast" + FMA (within 2%). "fast" would change the bits with the
# instruction set (no FMA in the SSE2 baseline) and with the compiler; GCC's default in an ISO
# mode (-std=c++17 and later, which torch's build passes) is "off" already, but Clang's and GNU
# mode's are not, so it is spelled out. FMA instructions would then go unused: no -mfma.
FLAGS = ["-O3", "-ffp-contract=off"]
if platform.machine().lower() in ("x86_64", "amd64"):
    FLAGS.append("-mavx2")
# at::parallel_for is header code: with PyTorch's OpenMP backend (the Linux wheels') it splits the
# work over threads only when compiled with -fopenmp; without it, it runs on one thread. So compile
# with -fopenmp but do not link libgomp: its symbols then resolve to the libgomp that libtorch_cpu
# already loaded, so there is one OpenMP runtime, PyTorch's, sized by torch.set_num_threads. The
# source itself has no OpenMP pragmas.
if "parallel backend: OpenMP" in torch.__config__.parallel_info():
    FLAGS.append("-fopenmp")


def source_sha256() -> str:
    """SHA-256 of the kernel's source, compiled into the binary so that a stale build is detected."""
    return hashlib.sha256((Path(__file__).parent / SOURCE).read_bytes()).hexdigest()


def have_cxx() -> bool:
    cxx = shlex.split(os.environ.get("CXX", "c++")) or ["c++"]
    return shutil.which(cxx[0]) is not None


ext_modules = []
if have_cxx():
    ext_modules.append(CppExtension(
        "fmnist._C", [SOURCE],
        define_macros=[("FMNIST_SOURCE_SHA256", source_sha256())],  # a bare token: safe in any build tool's quoting
        extra_compile_args=FLAGS,
        optional=True,  # a failed build leaves the package installed; fmnist.kernels.status() says why it is missing
    ))
else:
    print("setup.py: no C++ compiler (c++ or $CXX): fmnist installs without the fused CPU kernel", file=sys.stderr)

class BuildInPlaceSafely(BuildExtension):
    """torch's build_ext, replacing rather than overwriting the library it copies into src/fmnist.

    An editable install copies the built library next to the sources; overwriting that file in
    place would change the code under a training that has it loaded, and crash it.
    """

    def copy_file(self, infile, outfile, *args, **kwargs):
        if os.path.isfile(outfile) and not os.path.islink(outfile):
            os.unlink(outfile)  # a running process keeps the old file until it exits
        return super().copy_file(infile, outfile, *args, **kwargs)


# without ninja a compile error is a distutils CompileError, which optional=True turns into a
# warning; torch's ninja path raises RuntimeError instead, which would fail the whole install
setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildInPlaceSafely.with_options(use_ninja=False)})
