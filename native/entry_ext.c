/*
 * slitter._entry: a class's allocate() and release(handle) as C callables.
 *
 * `cls.allocate()` and `cls.release(h)` are the calls a user makes most.
 * As Python methods around the cffi entry points, each paid a Python frame
 * (about 40 ns here) on top of the native call: a pair took 1.1-1.3x two
 * empty cffi calls, of which the fast path's own work is about 20 ns.
 * These two types are what `Class.allocate` and `Class.release` are:
 * objects called through vectorcall that call the fast path
 * (slitter_allocate_key, slitter_release_as in fast.c) directly and return
 * its result, with no Python frame.  Only what the fast path does not
 * finish goes back to Python, to the class's methods:
 *
 *   allocate() == 0           -> cls._allocate_slow()          (bind, refill, OutOfMemory)
 *   release(h) != SLITTER_OK  -> cls._release_slow(h, result)  (flush, or the named error)
 *   release(h), h not an int in [0, 2**64)
 *                             -> cls._release_other(h)          (Python's rules: TypeError,
 *                                                                ForeignAddress, as before)
 *
 * This module holds no allocator state and makes no allocator decision; it
 * calls the fast path through pointers that slitter._fastpath takes from
 * the cffi module and hands over once (bind), as slitter._batch does, so
 * both share one copy of the fast path's state.  The GIL is held
 * throughout, as the cffi module holds it (build_ffi.py): the fast path
 * never blocks, and its Python hooks (slitter_spare_taken,
 * slitter_outgoing_ready) run on this thread as they do from cffi.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>

typedef uint64_t (*slitter__allocate_key_fn)(uint32_t key);
typedef int (*slitter__release_as_fn)(uint32_t key, uint64_t handle);

static slitter__allocate_key_fn allocate_key;
static slitter__release_as_fn release_as;
static PyObject *str_allocate_slow, *str_release_slow, *str_release_other;

/* One class key, and the Class whose slow-path methods take over. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    uint32_t key;
    PyObject *owner;
} EntryObject;

static PyObject *allocate_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    EntryObject *e = (EntryObject *)self;
    (void)args;
    if (PyVectorcall_NARGS(nargsf) != 0 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError, "allocate() takes no arguments");
        return NULL;
    }
    /* The fast path: a pop from this thread's magazine, about 10 ns. */
    uint64_t handle = allocate_key(e->key);
    if (handle != 0)
        return PyLong_FromUnsignedLongLong(handle);
    /* Once per magazine, or unbound thread, or closed heap. */
    return PyObject_CallMethodNoArgs(e->owner, str_allocate_slow);
}

static PyObject *release_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    EntryObject *e = (EntryObject *)self;
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError, "release() takes one handle");
        return NULL;
    }
    PyObject *h = args[0];
    /* An exact int only: a bool or an int subclass goes the way cffi takes it. */
    if (PyLong_CheckExact(h)) {
        uint64_t handle = PyLong_AsUnsignedLongLong(h);
        if (handle != (uint64_t)-1 || !PyErr_Occurred()) {
            /* The fast path: every check, the live byte's compare-and-swap, a push. */
            int result = release_as(e->key, handle);
            if (result == 0)
                Py_RETURN_NONE;
            PyObject *code = PyLong_FromLong(result);
            if (code == NULL)
                return NULL;
            PyObject *out = PyObject_CallMethodObjArgs(e->owner, str_release_slow, h, code, NULL);
            Py_DECREF(code);
            return out;
        }
        PyErr_Clear();   /* OverflowError: negative, or beyond a u64 */
    }
    return PyObject_CallMethodOneArg(e->owner, str_release_other, h);
}

static PyObject *entry_new(PyTypeObject *type, PyObject *args, PyObject *kwds, vectorcallfunc call)
{
    unsigned int key;
    PyObject *owner;
    static char *keywords[] = {"key", "owner", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "IO", keywords, &key, &owner))
        return NULL;
    if (allocate_key == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "slitter._entry is not bound to the fast path");
        return NULL;
    }
    EntryObject *e = PyObject_GC_New(EntryObject, type);
    if (e == NULL)
        return NULL;
    e->vectorcall = call;
    e->key = key;
    e->owner = Py_NewRef(owner);
    PyObject_GC_Track(e);
    return (PyObject *)e;
}

static PyObject *allocate_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    return entry_new(type, args, kwds, allocate_vectorcall);
}

static PyObject *release_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    return entry_new(type, args, kwds, release_vectorcall);
}

/* The owner is a Class, which holds this object: a cycle the GC must see. */
static int entry_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(((EntryObject *)self)->owner);
    return 0;
}

static int entry_clear(PyObject *self)
{
    Py_CLEAR(((EntryObject *)self)->owner);
    return 0;
}

static void entry_dealloc(PyObject *self)
{
    PyObject_GC_UnTrack(self);
    entry_clear(self);
    PyObject_GC_Del(self);
}

static PyObject *entry_repr(PyObject *self)
{
    EntryObject *e = (EntryObject *)self;
    return PyUnicode_FromFormat("<%s of %R>", Py_TYPE(self)->tp_name, e->owner);
}

/* The two types differ only in name, doc and constructor (which sets the vectorcall). */
#define SLITTER_ENTRY_TYPE(NAME, DOC, NEW)                                                  \
    {                                                                                       \
        PyVarObject_HEAD_INIT(NULL, 0)                                                      \
        .tp_name = NAME,                                                                    \
        .tp_doc = PyDoc_STR(DOC),                                                           \
        .tp_basicsize = sizeof(EntryObject),                                                \
        .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,   \
        .tp_vectorcall_offset = offsetof(EntryObject, vectorcall),                          \
        .tp_call = PyVectorcall_Call,                                                       \
        .tp_new = NEW,                                                                      \
        .tp_traverse = entry_traverse,                                                      \
        .tp_clear = entry_clear,                                                            \
        .tp_dealloc = entry_dealloc,                                                        \
        .tp_repr = entry_repr,                                                              \
    }

static PyTypeObject AllocateType = SLITTER_ENTRY_TYPE(
    "slitter._entry.Allocate",
    "allocate() -> int: a handle to a fresh object of the class (zeroed if zero_init).\n\n"
    "Raises OutOfMemory when the arena cannot hold another run of the class, "
    "DaemonUnavailable when a refill was needed and the daemon did not answer.",
    allocate_new);

static PyTypeObject ReleaseType = SLITTER_ENTRY_TYPE(
    "slitter._entry.Release",
    "release(handle): give an object back; checked in O(1); on error nothing changes.\n\n"
    "Raises ClassMismatch, InteriorPointer, ForeignAddress or DoubleFree under the "
    "'raise' policy (the default); 'log' logs and returns, 'abort' aborts. Every "
    "refusal is reported to the daemon's audit log first.",
    release_new);

/* Once per process, by slitter._fastpath: a second bind could only point the calls elsewhere. */
static PyObject *entry_bind(PyObject *self, PyObject *args)
{
    unsigned long long allocate, release;
    (void)self;
    if (!PyArg_ParseTuple(args, "KK:bind", &allocate, &release))
        return NULL;
    if (allocate_key != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "slitter._entry is bound already");
        return NULL;
    }
    if (allocate == 0 || release == 0) {
        PyErr_SetString(PyExc_ValueError, "bind: NULL entry point");
        return NULL;
    }
    release_as = (slitter__release_as_fn)(uintptr_t)release;
    allocate_key = (slitter__allocate_key_fn)(uintptr_t)allocate;
    Py_RETURN_NONE;
}

static PyMethodDef entry_methods[] = {
    {"bind", entry_bind, METH_VARARGS,
     "bind(allocate_key, release_as): the fast path's keyed entry points, as addresses."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef entry_module = {
    PyModuleDef_HEAD_INIT, "slitter._entry",
    "A class's allocate() and release(handle) as C callables: the fast path with no Python frame.",
    -1, entry_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__entry(void)
{
    str_allocate_slow = PyUnicode_InternFromString("_allocate_slow");
    str_release_slow = PyUnicode_InternFromString("_release_slow");
    str_release_other = PyUnicode_InternFromString("_release_other");
    if (str_allocate_slow == NULL || str_release_slow == NULL || str_release_other == NULL)
        return NULL;
    if (PyType_Ready(&AllocateType) < 0 || PyType_Ready(&ReleaseType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&entry_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Allocate", (PyObject *)&AllocateType) < 0 ||
        PyModule_AddObjectRef(m, "Release", (PyObject *)&ReleaseType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
