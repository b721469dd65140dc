/*
 * slitter._entry: a class's allocate() and release(handle), a heap's view(handle), as C callables.
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
 * `heap.view(h)` is the third: a View calls slitter_object_size_key (the
 * foreign / interior / guard checks of the handle, about 10 ns) and slices
 * the heap's arena memoryview; the rest goes to heap._view_slow(h, size)
 * (closed, forked, guard pages to apply, the named error) and a handle that
 * is no int in [0, 2**48) to heap._view_other(h).
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
#include <structmember.h>

#include "layout.h"   /* SLITTER_KEY_BITS */

typedef uint64_t (*slitter__allocate_key_fn)(uint32_t key);
typedef int (*slitter__release_as_fn)(uint32_t key, uint64_t handle);
typedef int64_t (*slitter__object_size_key_fn)(uint64_t packed);

static slitter__allocate_key_fn allocate_key;
static slitter__release_as_fn release_as;
static slitter__object_size_key_fn object_size_key;
static PyObject *str_allocate_slow, *str_release_slow, *str_release_other, *str_view_slow, *str_view_other;

/* One key (a class's, or a heap's view key), the object whose slow-path methods take over,
 * and for a View the heap's arena memoryview (NULL for the others, and once the heap is closed). */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    uint32_t key;
    PyObject *owner;
    PyObject *arena;
} EntryObject;

/* A call of one positional argument, or the TypeError `usage`. */
static int one_argument(size_t nargsf, PyObject *kwnames, const char *usage)
{
    if (PyVectorcall_NARGS(nargsf) == 1 && (kwnames == NULL || PyTuple_GET_SIZE(kwnames) == 0))
        return 1;
    PyErr_SetString(PyExc_TypeError, usage);
    return 0;
}

/* owner.<method>(h, code): the slow path, given what the fast path returned. */
static PyObject *call_slow(PyObject *owner, PyObject *method, PyObject *h, long long code)
{
    PyObject *boxed = PyLong_FromLongLong(code);
    if (boxed == NULL)
        return NULL;
    PyObject *out = PyObject_CallMethodObjArgs(owner, method, h, boxed, NULL);
    Py_DECREF(boxed);
    return out;
}

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
    if (!one_argument(nargsf, kwnames, "release() takes one handle"))
        return NULL;
    PyObject *h = args[0];
    /* An exact int only: a bool or an int subclass goes the way cffi takes it. */
    if (PyLong_CheckExact(h)) {
        uint64_t handle = PyLong_AsUnsignedLongLong(h);
        if (handle != (uint64_t)-1 || !PyErr_Occurred()) {
            /* The fast path: every check, the live byte's compare-and-swap, a push. */
            int result = release_as(e->key, handle);
            if (result == 0)
                Py_RETURN_NONE;
            return call_slow(e->owner, str_release_slow, h, result);
        }
        PyErr_Clear();   /* OverflowError: negative, or beyond a u64 */
    }
    return PyObject_CallMethodOneArg(e->owner, str_release_other, h);
}

/*
 * A slice of the arena without a slice object: a new memoryview of the
 * arena's managed buffer (PyMemoryView_FromObject of a memoryview shares
 * its exporter, as a slice does, so the mapping stays while it lives),
 * narrowed before anyone sees it, as memoryview's own slicing narrows its
 * copy.  The arena is one-dimensional unsigned bytes, so the view stays
 * contiguous and its flags stay true.  About 40 ns less than arena[a:b],
 * which boxes both bounds and allocates a slice.
 */
static PyObject *arena_slice(PyObject *arena, uint64_t start, int64_t size)
{
    Py_buffer *whole = PyMemoryView_GET_BUFFER(arena);
    /* Never for a handle the checks passed (carved spans lie inside the arena); a slice would clamp. */
    if ((uint64_t)whole->len < start || (uint64_t)(whole->len - start) < (uint64_t)size)
        return PyErr_Format(PyExc_IndexError, "handle %#llx + %lld bytes: past the arena's end",
                            (unsigned long long)start, (long long)size);
    PyObject *out = PyMemoryView_FromObject(arena);   /* ValueError if the arena view was released */
    if (out == NULL)
        return NULL;
    Py_buffer *part = PyMemoryView_GET_BUFFER(out);
    part->buf = (char *)whole->buf + start;
    part->len = (Py_ssize_t)size;
    part->shape[0] = (Py_ssize_t)size;
    return out;
}

static PyObject *view_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    EntryObject *v = (EntryObject *)self;
    if (!one_argument(nargsf, kwnames, "view() takes one handle"))
        return NULL;
    PyObject *h = args[0];
    if (!PyLong_CheckExact(h))
        return PyObject_CallMethodOneArg(v->owner, str_view_other, h);
    uint64_t handle = PyLong_AsUnsignedLongLong(h);
    if ((handle == (uint64_t)-1 && PyErr_Occurred()) || handle >> (64 - SLITTER_KEY_BITS) != 0) {
        PyErr_Clear();   /* negative, or past a handle's 48 bits: the slow path names it */
        return PyObject_CallMethodOneArg(v->owner, str_view_other, h);
    }
    /* The checks: foreign, interior, guard, and the heap open and its guards applied. */
    int64_t size = object_size_key(handle << SLITTER_KEY_BITS | v->key);
    if (size > 0 && v->arena != NULL && PyMemoryView_Check(v->arena))
        return arena_slice(v->arena, handle, size);
    return call_slow(v->owner, str_view_slow, h, size);
}

/*
 * Class.views: slices of handles the caller has just checked (Class.check,
 * one native call for the batch), as a list, with no per-handle check but
 * the arena's bounds: what `[arena[h:h + size] for h in batch]` does, at
 * about half its cost.  None when the heap is closed (the caller raises).
 */
static PyObject *view_slices(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    EntryObject *v = (EntryObject *)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_slices(handles, size)");
        return NULL;
    }
    Py_ssize_t size = PyLong_AsSsize_t(args[1]);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    if (size <= 0) {
        PyErr_SetString(PyExc_ValueError, "_slices: size must be > 0");
        return NULL;
    }
    if (v->arena == NULL || !PyMemoryView_Check(v->arena))
        Py_RETURN_NONE;
    PyObject *arena = Py_NewRef(v->arena);   /* the heap may close meanwhile: keep the mapping */
    Py_buffer b;
    if (PyObject_GetBuffer(args[0], &b, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        Py_DECREF(arena);
        return NULL;
    }
    PyObject *out = NULL;
    if (b.itemsize != 8 || b.format == NULL || b.format[0] != 'Q' || b.format[1] != '\0') {
        PyErr_SetString(PyExc_TypeError, "_slices takes an array('Q') of handles");
        goto done;
    }
    Py_ssize_t n = b.len / 8;
    out = PyList_New(n);
    if (out == NULL)
        goto done;
    const uint64_t *handles = b.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = arena_slice(arena, handles[i], size);
        if (item == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, item);
    }
done:
    PyBuffer_Release(&b);
    Py_DECREF(arena);
    return out;
}

static PyMethodDef view_methods[] = {
    {"_slices", (PyCFunction)(void (*)(void))view_slices, METH_FASTCALL,
     "_slices(handles, size) -> list[memoryview] | None: unchecked slices of checked handles (Class.views)."},
    {NULL, NULL, 0, NULL},
};

/* The heap sets it once mapped and to None at close: then the mapping goes with the last view.  Anything but
 * a memoryview sends every call to the slow path (the calls check the type, not the setter). */
static PyMemberDef view_members[] = {
    {"arena", T_OBJECT, offsetof(EntryObject, arena), 0, "The heap's arena memoryview, or None."},
    {NULL, 0, 0, 0, NULL},
};


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
    e->arena = NULL;   /* a View's: set by the heap once it has mapped the arena */
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

static PyObject *view_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    return entry_new(type, args, kwds, view_vectorcall);
}

/* The owner is a Class or a Heap, which holds this object: a cycle the GC must see. */
static int entry_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(((EntryObject *)self)->owner);
    Py_VISIT(((EntryObject *)self)->arena);
    return 0;
}

static int entry_clear(PyObject *self)
{
    Py_CLEAR(((EntryObject *)self)->owner);
    Py_CLEAR(((EntryObject *)self)->arena);
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

/* The three types differ only in name, doc and constructor (which sets the vectorcall),
 * and in the View's arena member and _slices method, given as extra fields. */
#define SLITTER_ENTRY_TYPE(NAME, DOC, NEW, ...)                                             \
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
        __VA_ARGS__                                                                         \
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

static PyTypeObject ViewType = SLITTER_ENTRY_TYPE(
    "slitter._entry.View",
    "view(handle) -> memoryview: a writable memoryview of exactly the object's size.\n\n"
    "Raises ForeignAddress or InteriorPointer when the handle is not an object start.",
    view_new,
    .tp_members = view_members,
    .tp_methods = view_methods);

/* Once per process, by slitter._fastpath: a second bind could only point the calls elsewhere. */
static PyObject *entry_bind(PyObject *self, PyObject *args)
{
    unsigned long long allocate, release, object_size;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKK:bind", &allocate, &release, &object_size))
        return NULL;
    if (allocate_key != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "slitter._entry is bound already");
        return NULL;
    }
    if (allocate == 0 || release == 0 || object_size == 0) {
        PyErr_SetString(PyExc_ValueError, "bind: NULL entry point");
        return NULL;
    }
    release_as = (slitter__release_as_fn)(uintptr_t)release;
    object_size_key = (slitter__object_size_key_fn)(uintptr_t)object_size;
    allocate_key = (slitter__allocate_key_fn)(uintptr_t)allocate;
    Py_RETURN_NONE;
}

static PyMethodDef entry_methods[] = {
    {"bind", entry_bind, METH_VARARGS,
     "bind(allocate_key, release_as, object_size_key): the fast path's keyed entry points, as addresses."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef entry_module = {
    PyModuleDef_HEAD_INIT, "slitter._entry",
    "A class's allocate() and release(handle), and a heap's view(handle), as C callables: no Python frame.",
    -1, entry_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__entry(void)
{
    str_allocate_slow = PyUnicode_InternFromString("_allocate_slow");
    str_release_slow = PyUnicode_InternFromString("_release_slow");
    str_release_other = PyUnicode_InternFromString("_release_other");
    str_view_slow = PyUnicode_InternFromString("_view_slow");
    str_view_other = PyUnicode_InternFromString("_view_other");
    if (str_allocate_slow == NULL || str_release_slow == NULL || str_release_other == NULL ||
        str_view_slow == NULL || str_view_other == NULL)
        return NULL;
    if (PyType_Ready(&AllocateType) < 0 || PyType_Ready(&ReleaseType) < 0 || PyType_Ready(&ViewType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&entry_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Allocate", (PyObject *)&AllocateType) < 0 ||
        PyModule_AddObjectRef(m, "Release", (PyObject *)&ReleaseType) < 0 ||
        PyModule_AddObjectRef(m, "View", (PyObject *)&ViewType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
