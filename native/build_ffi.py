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
ffibuilder.set_source(
    "slitter._native",
    '#include <fcntl.h>\n#include <sys/mman.h>\n#include "slitter_fast.h"',
    # setuptools wants paths relative to setup.py's directory, the repository root.
    sources=[f"native/{s}" for s in SOURCES],
    include_dirs=["native"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
