"""cffi out-of-line API build of ``slitter._native`` from the headers and C in native/.

The cdef is the headers themselves: ``#define NAME value`` becomes
``#define NAME ...`` and macro array lengths become ``[...]``, so cffi takes
every value and offset from the C compiler, never from a copy.
"""

import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADERS = ("layout.h", "slitter_fast.h")
SOURCES = ("fast.c", "bench_loops.c")
LIBC = """
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
int mprotect(void *addr, size_t len, int prot);
int fallocate(int fd, int mode, long offset, long len);
#define PROT_NONE ...
#define PROT_READ ...
#define PROT_WRITE ...
#define MAP_SHARED ...
#define MAP_PRIVATE ...
#define MAP_ANONYMOUS ...
#define MAP_NORESERVE ...
#define MAP_FIXED ...
#define FALLOC_FL_KEEP_SIZE ...
#define FALLOC_FL_PUNCH_HOLE ...
"""


def cdef_of(text: str) -> str:
    """Turn a C header into cffi cdef text."""
    text = re.sub(r"^#(ifndef|endif|include).*$", "", text, flags=re.MULTILINE)
    text = re.sub(r"^#define SLITTER_\w+_H\s*$", "", text, flags=re.MULTILINE)
    text = re.sub(r"^#define \w+\(.*$", "", text, flags=re.MULTILINE)  # function-like: C only
    text = re.sub(r"^#define (\w+)\s+.*$", r"#define \1 ...", text, flags=re.MULTILINE)
    return re.sub(r"\[SLITTER_\w+\]", "[...]", text)


ffibuilder = FFI()
# The calls from C into Python: defined by slitter.heap with @ffi.def_extern().
HOOKS = re.sub(r"^void (slitter_spare_taken|slitter_outgoing_ready)", r'extern "Python+C" void \1',
               "".join(cdef_of((HERE / h).read_text()) for h in HEADERS), flags=re.MULTILINE)
ffibuilder.cdef(HOOKS + LIBC)
# cffi releases the GIL around every call (PyEval_SaveThread/RestoreThread:
# about 45 ns here, three times the work of an allocate+release pair).  No
# function of this module blocks: the fast path never makes a system call,
# the daemon's scans are bounded by one run, and mmap/mprotect/munmap/
# fallocate are single system calls.  So the generated wrappers keep the GIL,
# which also lets the extern "Python+C" hooks run without re-taking it.  The
# preamble is pasted after Python.h and before the wrappers, so redefining
# the two macros here changes exactly this module's calls.
HOLD_THE_GIL = """
#undef Py_BEGIN_ALLOW_THREADS
#undef Py_END_ALLOW_THREADS
#define Py_BEGIN_ALLOW_THREADS {
#define Py_END_ALLOW_THREADS }
void slitter_noop_standard(void) { PyThreadState *save = PyEval_SaveThread(); PyEval_RestoreThread(save); }
"""
ffibuilder.set_source(
    "slitter._native",
    HOLD_THE_GIL + '#include <fcntl.h>\n#include <sys/mman.h>\n#include "slitter_fast.h"\n',
    # setuptools wants paths relative to setup.py's directory, the repository root.
    sources=[f"native/{s}" for s in SOURCES],
    include_dirs=["native"],
    # -fno-semantic-interposition: a call from one exported function to another (slitter_release_as ->
    # slitter_release, slitter_allocate_key -> slitter_allocate) is a direct jump, not one through the PLT,
    # as CPython builds itself.  Nobody interposes these symbols; bench_loops.c, another file, still calls
    # through the PLT, as a C user of the library and glibc's malloc are called.
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11", "-fno-semantic-interposition"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
