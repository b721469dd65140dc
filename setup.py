"""setuptools still needs setup.py for cffi_modules (python-cffi/cffi#55), and builds the CPython extensions here."""

from setuptools import Extension, setup

setup(
    cffi_modules=["native/build_ffi.py:ffibuilder"],
    # The batch calls' argument adapter (native/batch_ext.c, doc/design.md (e)).
    ext_modules=[Extension("slitter._batch", ["native/batch_ext.c"], include_dirs=["native"],
                           extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"]),
                 # A class's allocate() and release(), a heap's view(), as C callables (native/entry_ext.c,
                 # doc/fast_path.md).
                 Extension("slitter._entry", ["native/entry_ext.c"], include_dirs=["native"],
                           extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"]),
                 # Channels of handles (native/channel.c, doc/design.md (f)): a ring that blocks without the GIL.
                 Extension("slitter._channel", ["native/channel.c"],
                           extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"])],
)
