/* A copy whose stores bypass the cache (non-temporal stores), for the shared-memory collectives'
 * copies into large results (collcomm/transport/shm/stream.py says when and why).
 *
 * An ordinary store first reads the line it writes (read for ownership), so a copy into a buffer
 * that is not in the cache moves every destination byte twice across the memory bus; a
 * non-temporal store writes whole lines without reading them. glibc's memcpy switches to such
 * stores only for copies of a large share of the last-level cache (and a virtual machine can
 * report a cache ten times its real size, which puts that switch out of reach): never for the
 * segment-sized pieces a collective copies, although the buffer they land in is far larger than
 * the cache. SSE2 is part of x86-64, so no check of the processor is needed; other machines get
 * plain memcpy (the shared-memory transport runs on x86-64 only).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define STREAMS 1
#else
#define STREAMS 0
#endif

static void stream_copy(char *dst, const char *src, size_t n)
{
#if STREAMS
    /* ordinary stores up to the first 64-byte line of dst, whole lines streamed, the rest ordinary */
    size_t head = (size_t)(-(uintptr_t)dst) & 63;
    if (head > n)
        head = n;
    memcpy(dst, src, head);
    dst += head;
    src += head;
    n -= head;
    size_t body = n & ~(size_t)63;
    for (size_t i = 0; i < body; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
    memcpy(dst + body, src + body, n - body);
    /* streamed stores are weakly ordered: make them visible before anything this process
       publishes next (a step number a peer reads) */
    _mm_sfence();
#else
    memcpy(dst, src, n);
#endif
}

static PyObject *copy(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "copy(dst, src) takes 2 arguments, got %zd", nargs);
        return NULL;
    }
    Py_buffer d, s;
    if (PyObject_GetBuffer(args[0], &d, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &s, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&d);
        return NULL;
    }
    const char *dp = d.buf, *sp = s.buf;
    PyObject *result = Py_None;
    if (d.len != s.len) {
        PyErr_Format(PyExc_ValueError, "copy: dst has %zd bytes, src %zd", d.len, s.len);
        result = NULL;
    } else if (dp == sp) {
        /* the same bytes (an in-place call): nothing to copy */
    } else if (d.len && dp < sp + s.len && sp < dp + d.len) {
        PyErr_SetString(PyExc_ValueError, "copy: dst and src overlap");
        result = NULL;
    } else {
        Py_BEGIN_ALLOW_THREADS
        stream_copy(d.buf, s.buf, (size_t)d.len);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&s);
    PyBuffer_Release(&d);
    Py_XINCREF(result);
    return result;
}

static PyMethodDef methods[] = {
    {"copy", (PyCFunction)(void (*)(void))copy, METH_FASTCALL,
     "copy(dst, src): dst's bytes = src's (both C-contiguous, the same size, the same bytes or not "
     "overlapping), "
     "with stores that bypass the cache."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_stream", "A copy with non-temporal stores (see stream.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__stream(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "STREAMS", STREAMS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
