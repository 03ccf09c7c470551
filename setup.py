"""Builds the optional host extension ``minitron_fast._C`` (pybind11, no torch at build time).

Everything else lives in pyproject.toml. The extension is optional at run time: when it is
missing, minitron_fast warns once and uses its pure-torch paths.
"""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "minitron_fast._C",
        ["csrc/bindings.cpp", "csrc/compact.cpp", "csrc/kd_rows.cpp"],
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3", "-pthread", "-fopenmp-simd", "-fno-trapping-math", "-ffp-contract=fast"],
        extra_link_args=["-pthread"],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
