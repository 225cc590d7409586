/* The block kernel of resample.py in C: each output sample's polyphase sum, rounded half
 * to even and saturated to int16, in one call per chunk.
 *
 * Why C: at 20 ms chunks the numpy version is a dozen array operations on 160 samples,
 * and their fixed cost per call is most of its time (BENCHMARKS.md, issue 14). No
 * well-kept library offers a stateful polyphase FIR at this per-call cost: scipy's upfirdn
 * and lfilter pay the same Python-level dispatch, and soxr adds tens of milliseconds of
 * delay at the quality the tests demand. Built as an optional extension (setup.py): without
 * a compiler, resample.py computes the same sums with numpy.
 *
 * fir_int16(src, coef, lo, taps, up, down, offset, first, count) -> bytes
 *   src   float64[n]       filter history, then the chunk's input
 *   coef  float64[up * K]  phase f's taps, oldest input first, zero-padded to K
 *   lo    int32[up]        phase f's first input, relative to its output's window
 *   taps  int32[up]        how many of phase f's K coefficients are used
 *   Output o (first <= o < first + count) has phase f = o % up; its inputs start at
 *   src[offset + lo[f] + (o / up) * down]: each `up` outputs the window moves `down` inputs.
 * Returns count native-endian int16 samples.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 256 /* outputs of one phase summed together (the accumulators stay in L1) */

static inline int16_t
to_int16(double v)
{
    v = nearbyint(v); /* half to even, as np.rint */
    return v >= 32767.0 ? 32767 : v <= -32768.0 ? -32768 : (int16_t)v;
}

/* AVX2 where the CPU has it, chosen when the module loads (GCC and Clang with glibc, whose
 * ifunc this needs). FMA was measured slower: its latency lengthens the dot products. */
#if defined(__x86_64__) && defined(__GLIBC__) && (defined(__GNUC__) || defined(__clang__))
#define FIR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FIR_CLONES
#endif

FIR_CLONES static void
fir_run(const double *x, const double *coef, const int32_t *lo, const int32_t *taps, Py_ssize_t k_max,
        Py_ssize_t up, Py_ssize_t down, Py_ssize_t offset, Py_ssize_t first, Py_ssize_t count,
        int16_t *y)
{
    double acc[BLOCK];
    for (Py_ssize_t f = 0; f < up; f++) {
        /* This phase's outputs o = f + up * q within [first, first + count). */
        Py_ssize_t q0 = f >= first ? 0 : (first - f + up - 1) / up;
        Py_ssize_t q1 = (first + count - f + up - 1) / up;
        const double *c = coef + f * k_max;
        const Py_ssize_t k_n = taps[f];
        for (Py_ssize_t qb = q0; qb < q1; qb += BLOCK) {
            const Py_ssize_t nb = q1 - qb < BLOCK ? q1 - qb : BLOCK;
            const double *xb = x + offset + lo[f] + qb * down;
            if (down == 1) {
                /* Upsampling: consecutive outputs of a phase read consecutive inputs, so
                 * each tap is one contiguous multiply-add over the block (vector lanes,
                 * and every output's sum still in tap order). */
                for (Py_ssize_t t = 0; t < nb; t++)
                    acc[t] = 0.0;
                for (Py_ssize_t k = 0; k < k_n; k++) {
                    const double ck = c[k];
                    const double *xk = xb + k;
                    for (Py_ssize_t t = 0; t < nb; t++)
                        acc[t] += ck * xk[t];
                }
            } else {
                /* Downsampling: a dot product per output (setup.py lets the compiler
                 * reorder it into vector lanes; the last bits may differ from BLAS). */
                for (Py_ssize_t t = 0; t < nb; t++) {
                    const double *xt = xb + t * down;
                    double sum = 0.0;
                    for (Py_ssize_t k = 0; k < k_n; k++)
                        sum += c[k] * xt[k];
                    acc[t] = sum;
                }
            }
            int16_t *yb = y + (f + up * qb - first);
            for (Py_ssize_t t = 0; t < nb; t++)
                yb[t * up] = to_int16(acc[t]);
        }
    }
}

static int
get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, const char *name)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->len % itemsize) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "%s: not a whole number of %zd-byte items", name, itemsize);
        return -1;
    }
    return 0;
}

static PyObject *
fir_int16(PyObject *self, PyObject *args)
{
    PyObject *src_obj, *coef_obj, *lo_obj, *taps_obj;
    Py_ssize_t up, down, offset, first, count;
    if (!PyArg_ParseTuple(args, "OOOOnnnnn", &src_obj, &coef_obj, &lo_obj, &taps_obj, &up, &down, &offset,
                          &first, &count))
        return NULL;
    if (up <= 0 || down <= 0 || offset < 0 || first < 0 || count < 0) {
        PyErr_SetString(PyExc_ValueError, "fir_int16: negative or empty geometry");
        return NULL;
    }
    Py_buffer src, coef, lo, taps;
    PyObject *out = NULL;
    if (get_buffer(src_obj, &src, sizeof(double), "src") < 0)
        return NULL;
    if (get_buffer(coef_obj, &coef, sizeof(double), "coef") < 0)
        goto release_src;
    if (get_buffer(lo_obj, &lo, sizeof(int32_t), "lo") < 0)
        goto release_coef;
    if (get_buffer(taps_obj, &taps, sizeof(int32_t), "taps") < 0)
        goto release_lo;

    const Py_ssize_t n = src.len / (Py_ssize_t)sizeof(double);
    const Py_ssize_t k_max = coef.len / (Py_ssize_t)sizeof(double) / up;
    const int32_t *lo_f = lo.buf, *taps_f = taps.buf;
    if (lo.len != (Py_ssize_t)sizeof(int32_t) * up || taps.len != lo.len ||
        coef.len != (Py_ssize_t)sizeof(double) * up * k_max) {
        PyErr_SetString(PyExc_ValueError, "fir_int16: coefficient shapes do not match `up`");
        goto release_taps;
    }
    /* Every input read must lie in src: check each phase's first and last output. */
    for (Py_ssize_t f = 0; f < up && count > 0; f++) {
        Py_ssize_t q0 = f >= first ? 0 : (first - f + up - 1) / up;
        Py_ssize_t q1 = (first + count - f + up - 1) / up;
        if (q1 <= q0)
            continue;
        if (lo_f[f] < 0 || taps_f[f] < 0 || taps_f[f] > k_max ||
            offset + lo_f[f] + (q1 - 1) * down + taps_f[f] > n) {
            PyErr_SetString(PyExc_ValueError, "fir_int16: an output reads past the input");
            goto release_taps;
        }
    }
    out = PyBytes_FromStringAndSize(NULL, count * (Py_ssize_t)sizeof(int16_t));
    if (out != NULL)
        fir_run(src.buf, coef.buf, lo_f, taps_f, k_max, up, down, offset, first, count,
                (int16_t *)PyBytes_AS_STRING(out));

release_taps:
    PyBuffer_Release(&taps);
release_lo:
    PyBuffer_Release(&lo);
release_coef:
    PyBuffer_Release(&coef);
release_src:
    PyBuffer_Release(&src);
    return out;
}

/* Stream: one call's resampler in one object, so a 20 ms chunk is one C call. It holds the
 * filter history and the sample counts that resample.py's `Resampler._step` keeps in
 * Python, and runs the same fir_run, so its samples are those of `fir_int16`. Optionally
 * it decodes its input through a table (mu-law bytes -> float64[256]) and encodes its
 * output through one (int16 read as uint16 -> uint8[65536]): the G.711 step of a call's
 * conversion without an array in between.
 *
 * Stream(coef, lo, taps, up, down, m_lo, history, flush_zeros, decode=None, encode=None)
 *   coef, lo, taps, up, down: as fir_int16; m_lo: the oldest input a row's window reads,
 *   relative to its first output's; history: inputs kept between chunks; flush_zeros: the
 *   zeros that push the last input through the filter. Every buffer given is held for the
 *   Stream's life (none can be resized or freed under it).
 * process(data) -> bytes: native int16 in, or bytes through `decode`; every output the
 *   input completes, native int16 or through `encode`.
 * flush() -> bytes: the filter tail (what flush_zeros complete), then reset; nothing, and
 *   only the reset, when no input came since the last one.
 * reset(): forget the history and the counts.
 */
typedef struct {
    PyObject_HEAD
    /* Held for the Stream's life, so the tables can neither change size nor be freed. */
    Py_buffer coef, lo, taps, decode, encode; /* decode.obj, encode.obj: NULL when absent */
    Py_ssize_t k_max, up, down, m_lo, history, flush_zeros;
    double *buf; /* history, then the chunk's input */
    Py_ssize_t cap;
    long long n_in, n_out;
} Stream;

static void
stream_release(Stream *self)
{
    Py_buffer *views[] = {&self->coef, &self->lo, &self->taps, &self->decode, &self->encode};
    for (size_t i = 0; i < sizeof(views) / sizeof(views[0]); i++)
        if (views[i]->obj != NULL)
            PyBuffer_Release(views[i]);
    PyMem_Free(self->buf);
    self->buf = NULL;
}

static int
hold(PyObject *obj, Py_buffer *view, Py_ssize_t len, const char *name)
{
    if (get_buffer(obj, view, 1, name) < 0)
        return -1;
    if (len >= 0 && view->len != len) {
        PyErr_Format(PyExc_ValueError, "Stream: %s must be %zd bytes, not %zd", name, len, view->len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int
Stream_init(Stream *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"coef", "lo", "taps", "up", "down", "m_lo", "history", "flush_zeros",
                             "decode", "encode", NULL};
    PyObject *coef, *lo, *taps, *decode = Py_None, *encode = Py_None;
    Py_ssize_t up, down, m_lo, history, flush_zeros;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOnnnnn|OO", kwlist, &coef, &lo, &taps, &up, &down, &m_lo,
                                     &history, &flush_zeros, &decode, &encode))
        return -1;
    stream_release(self); /* a second __init__ starts afresh */
    if (up <= 0 || down <= 0 || history < 0 || flush_zeros < 0) {
        PyErr_SetString(PyExc_ValueError, "Stream: negative or empty geometry");
        return -1;
    }
    if (hold(coef, &self->coef, -1, "coef") < 0 || hold(lo, &self->lo, (Py_ssize_t)sizeof(int32_t) * up, "lo") < 0 ||
        hold(taps, &self->taps, (Py_ssize_t)sizeof(int32_t) * up, "taps") < 0 ||
        (decode != Py_None && hold(decode, &self->decode, 256 * (Py_ssize_t)sizeof(double), "decode") < 0) ||
        (encode != Py_None && hold(encode, &self->encode, 65536, "encode") < 0))
        goto fail;
    if (self->coef.len % ((Py_ssize_t)sizeof(double) * up)) {
        PyErr_SetString(PyExc_ValueError, "Stream: coefficient shapes do not match `up`");
        goto fail;
    }
    self->k_max = self->coef.len / (Py_ssize_t)sizeof(double) / up;
    const int32_t *lo_f = self->lo.buf, *taps_f = self->taps.buf;
    for (Py_ssize_t f = 0; f < up; f++) {
        if (lo_f[f] < 0 || taps_f[f] < 0 || taps_f[f] > self->k_max) {
            PyErr_SetString(PyExc_ValueError, "Stream: a phase's taps lie outside its window");
            goto fail;
        }
    }
    self->up = up;
    self->down = down;
    self->m_lo = m_lo;
    self->history = history;
    self->flush_zeros = flush_zeros;
    self->cap = history + 480; /* a 20 ms chunk at 24 kHz without growing */
    self->buf = PyMem_Calloc(self->cap, sizeof(double));
    if (self->buf == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    self->n_in = self->n_out = 0;
    return 0;
fail:
    stream_release(self);
    return -1;
}

static void
Stream_dealloc(Stream *self)
{
    stream_release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}


static void
stream_reset(Stream *self)
{
    for (Py_ssize_t i = 0; i < self->history; i++)
        self->buf[i] = 0.0;
    self->n_in = self->n_out = 0;
}

/* Append n inputs (filled by the caller into buf + history) and return their outputs. */
static PyObject *
stream_run(Stream *self, Py_ssize_t n)
{
    const Py_ssize_t up = self->up, down = self->down, history = self->history;
    const long long total = self->n_in + n;
    const long long k_end = total * up / down;
    const long long base = total - (history + n); /* input index of buf[0] */
    const Py_ssize_t count = (Py_ssize_t)(k_end - self->n_out);
    const double *coef = self->coef.buf;
    const int32_t *lo = self->lo.buf, *taps = self->taps.buf;
    const uint8_t *encode = self->encode.buf; /* NULL when absent */
    const size_t out_size = encode != NULL ? 1 : sizeof(int16_t);
    PyObject *out = PyBytes_FromStringAndSize(NULL, count * (Py_ssize_t)out_size);
    if (out == NULL)
        return NULL;
    if (count > 0) {
        const long long k0 = self->n_out - self->n_out % up; /* the row phase pattern's start */
        const Py_ssize_t offset = (Py_ssize_t)((k0 / up) * down + self->m_lo - base);
        const Py_ssize_t first = (Py_ssize_t)(self->n_out - k0);
        for (Py_ssize_t f = 0; f < up; f++) {
            Py_ssize_t q0 = f >= first ? 0 : (first - f + up - 1) / up;
            Py_ssize_t q1 = (first + count - f + up - 1) / up;
            if (q1 > q0 && (offset + lo[f] < 0 || offset + lo[f] + (q1 - 1) * down + taps[f] > history + n)) {
                Py_DECREF(out);
                PyErr_SetString(PyExc_ValueError, "Stream: an output reads past the input");
                return NULL;
            }
        }
        if (encode == NULL) {
            fir_run(self->buf, coef, lo, taps, self->k_max, up, down, offset, first, count,
                    (int16_t *)PyBytes_AS_STRING(out));
        } else {
            int16_t *pcm = PyMem_Malloc(count * sizeof(int16_t));
            if (pcm == NULL) {
                Py_DECREF(out);
                return PyErr_NoMemory();
            }
            fir_run(self->buf, coef, lo, taps, self->k_max, up, down, offset, first, count, pcm);
            uint8_t *y = (uint8_t *)PyBytes_AS_STRING(out);
            for (Py_ssize_t i = 0; i < count; i++)
                y[i] = encode[(uint16_t)pcm[i]];
            PyMem_Free(pcm);
        }
    }
    /* The newest inputs are the next chunk's history. */
    memmove(self->buf, self->buf + n, history * sizeof(double));
    self->n_in = total;
    self->n_out = k_end;
    return out;
}

static int
stream_reserve(Stream *self, Py_ssize_t n)
{
    if (self->history + n <= self->cap)
        return 0;
    double *grown = PyMem_Realloc(self->buf, (self->history + n) * sizeof(double));
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->buf = grown;
    self->cap = self->history + n;
    return 0;
}

static int
stream_ready(Stream *self)
{
    if (self->buf != NULL)
        return 0;
    PyErr_SetString(PyExc_ValueError, "Stream: not initialised");
    return -1;
}

static PyObject *
Stream_process(Stream *self, PyObject *data)
{
    if (stream_ready(self) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    const double *decode = self->decode.buf; /* NULL when absent */
    Py_ssize_t n = decode != NULL ? view.len : view.len / (Py_ssize_t)sizeof(int16_t);
    if (decode == NULL && view.len % (Py_ssize_t)sizeof(int16_t)) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "Stream.process: not a whole number of int16 samples");
        return NULL;
    }
    if (stream_reserve(self, n) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    double *x = self->buf + self->history;
    if (decode != NULL) {
        const uint8_t *in = view.buf;
        for (Py_ssize_t i = 0; i < n; i++)
            x[i] = decode[in[i]];
    } else {
        const int16_t *in = view.buf;
        for (Py_ssize_t i = 0; i < n; i++)
            x[i] = (double)in[i];
    }
    PyBuffer_Release(&view);
    return stream_run(self, n);
}

static PyObject *
Stream_flush(Stream *self, PyObject *Py_UNUSED(ignored))
{
    if (stream_ready(self) < 0)
        return NULL;
    const Py_ssize_t zeros = self->flush_zeros;
    if (self->n_in == 0) {
        stream_reset(self);
        return PyBytes_FromStringAndSize(NULL, 0);
    }
    if (stream_reserve(self, zeros) < 0)
        return NULL;
    for (Py_ssize_t i = 0; i < zeros; i++)
        self->buf[self->history + i] = 0.0;
    PyObject *out = stream_run(self, zeros);
    stream_reset(self);
    return out;
}

static PyObject *
Stream_reset(Stream *self, PyObject *Py_UNUSED(ignored))
{
    if (stream_ready(self) < 0)
        return NULL;
    stream_reset(self);
    Py_RETURN_NONE;
}

static PyMethodDef Stream_methods[] = {
    {"process", (PyCFunction)Stream_process, METH_O, "Resample a chunk (see the module source)."},
    {"flush", (PyCFunction)Stream_flush, METH_NOARGS, "The filter tail, then a reset."},
    {"reset", (PyCFunction)Stream_reset, METH_NOARGS, "Forget the history and the counts."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject StreamType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ivr_bridge.audio._fir.Stream",
    .tp_basicsize = sizeof(Stream),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A streaming polyphase FIR (see the module source).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Stream_init,
    .tp_dealloc = (destructor)Stream_dealloc,
    .tp_methods = Stream_methods,
};

static PyMethodDef methods[] = {
    {"fir_int16", fir_int16, METH_VARARGS, "Polyphase FIR outputs as int16 (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fir", NULL, -1, methods};

PyMODINIT_FUNC
PyInit__fir(void)
{
    if (PyType_Ready(&StreamType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&StreamType);
    if (PyModule_AddObject(m, "Stream", (PyObject *)&StreamType) < 0) {
        Py_DECREF(&StreamType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
