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

static PyMethodDef methods[] = {
    {"fir_int16", fir_int16, METH_VARARGS, "Polyphase FIR outputs as int16 (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fir", NULL, -1, methods};

PyMODINIT_FUNC
PyInit__fir(void)
{
    return PyModule_Create(&module);
}
