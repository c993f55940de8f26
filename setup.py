"""Build script: the package, plus the optional C++ CPU kernels in csrc/ as `epa_kernels._C`.

The extension needs torch at build time, so install with `pip install --no-build-isolation .`
(the Makefile does). If torch is missing or the compiler fails, the package still installs and
`epa_kernels.backends()` reports the native backend as unavailable; set EPA_KERNELS_NO_NATIVE=1 to
skip the build on purpose.
"""
import os
import sys

from setuptools import setup


def native_extension():
    if os.environ.get("EPA_KERNELS_NO_NATIVE") == "1":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("epa-kernels: torch is not importable at build time; skipping the C++ backend", file=sys.stderr)
        return {}

    class OptionalBuildExtension(BuildExtension):
        """Builds _C when it can; a failure leaves a working pure-Python install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # compiler missing or failing: fall back, loudly
                print(f"epa-kernels: building {ext.name} failed ({error}); the native backend will be "
                      "unavailable", file=sys.stderr)

    # -march=native: the extension is always compiled on the machine that runs it (no binary wheels).
    extension = CppExtension(
        "epa_kernels._C",
        ["csrc/linear_logprobs.cpp"],
        extra_compile_args=["-O3", "-fopenmp", "-march=native"],
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(**native_extension())
