"""Builds the optional compiled CPU kernel (hieraloss/_native). Metadata lives in pyproject.toml.

Without a C++ compiler the build of the kernel is skipped and hieraloss uses its vectorized
framework ops on the CPU (same results, slower); ``hieraloss._native.available()`` tells which.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

UNIX_FLAGS = ["-O3", "-g0", "-std=c++17", "-fno-trapping-math", "-fvisibility=hidden"]
MSVC_FLAGS = ["/O2", "/std:c++17"]


class BuildExt(build_ext):
    def build_extensions(self):
        msvc = self.compiler.compiler_type == "msvc"
        for ext in self.extensions:
            ext.extra_compile_args = MSVC_FLAGS if msvc else UNIX_FLAGS
            ext.extra_link_args = [] if msvc else ["-pthread"]
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "hieraloss._native._tree_min",
            sources=["hieraloss/_native/tree_min.cpp"],
            depends=["hieraloss/_native/tree_min_kernel.h", "hieraloss/_native/logicseg_kernel.h"],
            language="c++",
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
