/*
 * slitter._batch: the batch calls' argument adapter (doc/design.md (e)).
 *
 * allocate_many, check and release_many hand the fast path an array('Q').
 * cffi cannot take a Python object as an argument, so their Python had to
 * test the array's type and typecode, read buffer_info() and pack the
 * address and count into one integer before each call: about 250 ns of a
 * 400 ns check of 64 handles.  This module does those steps in C, and only
 * those: it holds no allocator state and makes no allocator decision.  It
 * calls the fast path's packed batch entry points (slitter_allocate_batch,
 * slitter_check_batch, slitter_release_batch in fast.c) through pointers
 * that slitter._fastpath takes from the cffi module and hands over once
 * (bind), so both modules share one copy of the fast path's state.
 *
 * Each call returns the entry point's result as an int, or None when it
 * did not call it: the argument is not exactly an array('Q'), or it is
 * empty, or too long or too high in memory to pack.  Then the Python
 * caller takes its general path, as it did before for those cases.  The
 * GIL is held throughout, as the cffi module holds it (build_ffi.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "slitter_fast.h"

typedef uint32_t (*slitter__allocate_fn)(uint32_t key, uint64_t batch);
typedef int64_t (*slitter__batch_fn)(uint32_t key, uint64_t batch);

static PyTypeObject *array_type;       /* array.array, exactly: subclasses take the general path */
static slitter__allocate_fn allocate_batch;
static slitter__batch_fn check_batch;
static slitter__batch_fn release_batch;

/* Once per process, by slitter._fastpath: a second bind could only point the calls elsewhere. */
static PyObject *batch_bind(PyObject *self, PyObject *args)
{
    PyObject *type, *addresses[3];
    unsigned long long allocate, check, release;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!OOO:bind", &PyType_Type, &type, &addresses[0], &addresses[1], &addresses[2]))
        return NULL;
    if (array_type != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "slitter._batch is bound already");
        return NULL;
    }
    allocate = PyLong_AsUnsignedLongLong(addresses[0]);
    check = PyLong_AsUnsignedLongLong(addresses[1]);
    release = PyLong_AsUnsignedLongLong(addresses[2]);
    if (PyErr_Occurred())
        return NULL;
    if (allocate == 0 || check == 0 || release == 0) {
        PyErr_SetString(PyExc_ValueError, "bind: NULL entry point");
        return NULL;
    }
    Py_INCREF(type);
    array_type = (PyTypeObject *)type;
    allocate_batch = (slitter__allocate_fn)(uintptr_t)allocate;
    check_batch = (slitter__batch_fn)(uintptr_t)check;
    release_batch = (slitter__batch_fn)(uintptr_t)release;
    Py_RETURN_NONE;
}

/* The key and the array's batch, packed as the entry points take it; 0 when the call must not be made. */
static int batch_args(PyObject *const *args, Py_ssize_t nargs, const char *name, int writable,
                      uint32_t *key, Py_buffer *view, uint64_t *batch)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes a class key and an array('Q')", name);
        return -1;
    }
    if (array_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "slitter._batch is not bound to the fast path");
        return -1;
    }
    unsigned long k = PyLong_AsUnsignedLong(args[0]);
    if (k == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    if (k > UINT32_MAX) {
        PyErr_Format(PyExc_OverflowError, "%s(): class key %lu out of range", name, k);
        return -1;
    }
    *key = (uint32_t)k;
    if (!Py_IS_TYPE(args[1], array_type))
        return 0;
    if (PyObject_GetBuffer(args[1], view, PyBUF_FORMAT | PyBUF_ND | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;   /* an array always exports a buffer: this is an error of its own (memory) */
    Py_ssize_t n = view->len / 8;
    uintptr_t address = (uintptr_t)view->buf;
    if (view->itemsize != 8 || view->format == NULL || strcmp(view->format, "Q") != 0 || n <= 0 ||
        n >= (Py_ssize_t)1 << SLITTER_BATCH_COUNT_BITS || (uint64_t)address >> (64 - SLITTER_BATCH_COUNT_BITS) != 0) {
        PyBuffer_Release(view);
        return 0;
    }
    *batch = (uint64_t)address << SLITTER_BATCH_COUNT_BITS | (uint64_t)n;
    return 1;
}

/* `fn` NULL: allocate, into a writable array; else check or release. */
static PyObject *batch_call(slitter__batch_fn fn, const char *name, PyObject *const *args, Py_ssize_t nargs)
{
    uint32_t key;
    uint64_t batch;
    Py_buffer view;
    int taken = batch_args(args, nargs, name, fn == NULL, &key, &view, &batch);
    if (taken <= 0)
        return taken < 0 ? NULL : Py_NewRef(Py_None);
    int64_t result = fn == NULL ? (int64_t)allocate_batch(key, batch) : fn(key, batch);
    PyBuffer_Release(&view);
    return PyLong_FromLongLong(result);
}

static PyObject *batch_allocate(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    return batch_call(NULL, "allocate", args, nargs);
}

static PyObject *batch_check(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    return batch_call(check_batch, "check", args, nargs);
}

static PyObject *batch_release(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    return batch_call(release_batch, "release", args, nargs);
}

static PyMethodDef batch_methods[] = {
    {"bind", batch_bind, METH_VARARGS,
     "bind(array.array, allocate, check, release): the fast path's packed batch entry points, as addresses."},
    {"allocate", (PyCFunction)(void (*)(void))batch_allocate, METH_FASTCALL,
     "allocate(key, out): fill the array('Q') out with fresh handles (slitter_allocate_batch); how many, or None."},
    {"check", (PyCFunction)(void (*)(void))batch_check, METH_FASTCALL,
     "check(key, handles): slitter_check_batch on an array('Q'); its result, or None."},
    {"release", (PyCFunction)(void (*)(void))batch_release, METH_FASTCALL,
     "release(key, handles): slitter_release_batch on an array('Q'); its result, or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef batch_module = {
    PyModuleDef_HEAD_INIT, "slitter._batch",
    "The batch calls' argument adapter: an array('Q') to the fast path's packed batch entry points.",
    -1, batch_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__batch(void)
{
    return PyModule_Create(&batch_module);
}
