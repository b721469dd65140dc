"""setuptools still needs setup.py for cffi_modules (python-cffi/cffi#55)."""

from setuptools import setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder"])
