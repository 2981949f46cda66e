"""Builds the native extension feddip_kernels._core (C++17, -O3, OpenMP where the compiler has it)."""

import os
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

SOURCES = [
    "bindings/module.cpp",
    "csrc/ans.cpp",
    "csrc/bitpack.cpp",
    "csrc/crc32c.cpp",
    "csrc/ef_step.cpp",
    "csrc/ef_step_simd.cpp",
    "csrc/ef_step_tuning.cpp",
    "csrc/golomb.cpp",
    "csrc/isa.cpp",
    "csrc/sparse.cpp",
    "csrc/topk.cpp",
    "csrc/topk_simd.cpp",
]


def _compiler_accepts(compiler, flags: list[str]) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            compiler.link_executable(objs, "probe", output_dir=tmp, extra_postargs=flags)
        except Exception:
            return False
    return True


class BuildExt(build_ext):
    def build_extensions(self) -> None:
        omp = [] if sys.platform == "win32" else ["-fopenmp"]
        use_omp = os.environ.get("FEDDIP_NO_OPENMP") != "1" and bool(omp) and _compiler_accepts(self.compiler, omp)
        # GCC and Clang: the build is kept free of warnings; CI (.ci/run) sets FEDDIP_WERROR=1 so that
        # a new one fails it. MSVC takes neither spelling.
        warn = []
        if self.compiler.compiler_type != "msvc":
            warn = ["-Wall", "-Wextra"] + (["-Werror"] if os.environ.get("FEDDIP_WERROR") == "1" else [])
        for ext in self.extensions:
            # -fopenmp-simd: honour `omp simd` (vectorised reductions) even without the OpenMP runtime.
            ext.extra_compile_args += ["-O3", "-fopenmp-simd"] + warn + (omp if use_omp else [])
            ext.extra_link_args += omp if use_omp else []
        super().build_extensions()


setup(
    ext_modules=[
        Pybind11Extension(
            "feddip_kernels._core",
            SOURCES,
            cxx_std=17,
            include_dirs=["csrc"],
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
