/* Grouped LoRA add for CPU decode: y[t] += (A[slot] · x[t]) · Bᵀ[slot] for every token t of
 * every block, where a block is one active slot and the tokens that use it.
 *
 * Why a kernel: in decode each adapter serves a few tokens, so the step is bound by reading
 * every active adapter's A and Bᵀ once. torch's batched GEMM needs the active slots to be
 * contiguous in the slot tensors (one bmm per run of consecutive slots, ~2 ms per extra run
 * per step on SmolLM2) and reads weights at roughly half of streaming speed at these shapes.
 * Here each block reads its slot's rows in place, whatever the slot number, once per group of
 * up to four tokens, with the tokens' partial sums held in registers.
 *
 * The pure-torch path in server/adapters/layers.py is the reference; tests compare the two.
 * Built at first use with the machine's C compiler (server/kernels/cpu.py), -march=native.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define VW 16   /* floats per vector: one AVX-512 register, two AVX2 ones (GCC splits it) */
#define RB 8    /* rows of A per pass over x: eight FMA chains per token hide the FMA latency */
#define RMAX 64 /* ranks above this are processed in chunks of RMAX rows */
#define TMAX 4  /* tokens per pass over a slot's weights */

typedef float vf __attribute__((vector_size(VW * 4), aligned(4)));  /* unaligned loads allowed */
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef float v4 __attribute__((vector_size(16), aligned(4)));

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

static inline float hsum(vf v)
{
    v8 a, b;
    memcpy(&a, &v, 32);
    memcpy(&b, (const char *)&v + 32, 32);
    a += b;
    v4 c, d;
    memcpy(&c, &a, 16);
    memcpy(&d, (const char *)&a + 16, 16);
    c += d;
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* h[k][j] = A[k] · x_j for k < r (r <= RMAX), j < nj. */
static inline __attribute__((always_inline)) void shrink(
    const float *const *xr, const float *restrict a, int64_t ars, int64_t in, int64_t r,
    float h[][TMAX], const int nj)
{
    const int64_t iv = in - in % VW;
    int64_t k = 0;
    for (; k + RB <= r; k += RB) {
        vf c[RB][TMAX];
        for (int q = 0; q < RB; q++)
            for (int j = 0; j < nj; j++) c[q][j] = (vf){0};
        for (int64_t i = 0; i < iv; i += VW) {
            vf xv[TMAX];
            for (int j = 0; j < nj; j++) xv[j] = vload(xr[j] + i);
            for (int q = 0; q < RB; q++) {
                const vf av = vload(a + (k + q) * ars + i);
                for (int j = 0; j < nj; j++) c[q][j] += av * xv[j];
            }
        }
        for (int q = 0; q < RB; q++)
            for (int j = 0; j < nj; j++) {
                float s = hsum(c[q][j]);
                for (int64_t i = iv; i < in; i++) s += a[(k + q) * ars + i] * xr[j][i];
                h[k + q][j] = s;
            }
    }
    for (; k < r; k++)
        for (int j = 0; j < nj; j++) {
            float s = 0.f;
            for (int64_t i = 0; i < in; i++) s += a[k * ars + i] * xr[j][i];
            h[k][j] = s;
        }
}

/* y_j += Σ_k h[k][j] · Bᵀ[k]: each y vector is loaded and stored once for all r rows. */
static inline __attribute__((always_inline)) void expand(
    float *const *yr, const float *restrict bt, int64_t brs, int64_t out, int64_t r,
    float h[][TMAX], const int nj)
{
    const int64_t ov = out - out % VW;
    for (int64_t o = 0; o < ov; o += VW) {
        vf acc[TMAX];
        for (int j = 0; j < nj; j++) acc[j] = vload(yr[j] + o);
        for (int64_t k = 0; k < r; k++) {
            const vf w = vload(bt + k * brs + o);
            for (int j = 0; j < nj; j++) acc[j] += h[k][j] * w;
        }
        for (int j = 0; j < nj; j++) vstore(yr[j] + o, acc[j]);
    }
    for (int64_t o = ov; o < out; o++)
        for (int j = 0; j < nj; j++) {
            float s = yr[j][o];
            for (int64_t k = 0; k < r; k++) s += h[k][j] * bt[k * brs + o];
            yr[j][o] = s;
        }
}

static inline __attribute__((always_inline)) void tokens_pass(
    const float *x, int64_t xs, float *y, int64_t ys, const float *a, int64_t ars,
    const float *bt, int64_t brs, int64_t in, int64_t out, int64_t r, const int64_t *tok, const int nj)
{
    const float *xr[TMAX];
    float *yr[TMAX];
    for (int j = 0; j < nj; j++) {
        xr[j] = x + tok[j] * xs;
        yr[j] = y + tok[j] * ys;
    }
    float h[RMAX][TMAX];
    for (int64_t k0 = 0; k0 < r; k0 += RMAX) {
        const int64_t rc = r - k0 < RMAX ? r - k0 : RMAX;
        shrink(xr, a + k0 * ars, ars, in, rc, h, nj);
        expand(yr, bt + k0 * brs, brs, out, rc, h, nj);
    }
}

/* Up to TMAX tokens of block b, starting at tokens[t]. */
static void block_pass(const float *x, int64_t xs, float *y, int64_t ys,
                       const float *a, int64_t a_slot, int64_t ars, const float *bt, int64_t b_slot, int64_t brs,
                       int64_t in, int64_t out, int64_t r, const int64_t *block_slot, const int64_t *block_start,
                       const int64_t *tokens, int64_t b, int64_t t)
{
    const float *as = a + block_slot[b] * a_slot, *bs = bt + block_slot[b] * b_slot;
    const int64_t n = block_start[b + 1] - t < TMAX ? block_start[b + 1] - t : TMAX;
    switch (n) {  /* constant nj: each case compiles to its own unrolled loops */
    case 1: tokens_pass(x, xs, y, ys, as, ars, bs, brs, in, out, r, tokens + t, 1); break;
    case 2: tokens_pass(x, xs, y, ys, as, ars, bs, brs, in, out, r, tokens + t, 2); break;
    case 3: tokens_pass(x, xs, y, ys, as, ars, bs, brs, in, out, r, tokens + t, 3); break;
    default: tokens_pass(x, xs, y, ys, as, ars, bs, brs, in, out, r, tokens + t, 4); break;
    }
}

/* Work items are (block, up to TMAX of its tokens): they write disjoint rows of y, so they run
 * in parallel, and one adapter with many tokens still spreads over the threads. */
void lora_grouped_f32(const float *x, int64_t xs, float *y, int64_t ys,
                      const float *a, int64_t a_slot, int64_t ars,
                      const float *bt, int64_t b_slot, int64_t brs,
                      int64_t in, int64_t out, int64_t r,
                      const int64_t *block_slot, const int64_t *block_start, int64_t nblocks,
                      const int64_t *tokens, int nthreads)
{
#define PASS(b, t) block_pass(x, xs, y, ys, a, a_slot, ars, bt, b_slot, brs, in, out, r, \
                              block_slot, block_start, tokens, (b), (t))
    int64_t nitems = 0;
    for (int64_t b = 0; b < nblocks; b++) nitems += (block_start[b + 1] - block_start[b] + TMAX - 1) / TMAX;
    int64_t *items = nthreads > 1 && nitems > 1 ? malloc((size_t)nitems * 2 * sizeof(int64_t)) : NULL;
    if (items == NULL) {  /* one thread (or no memory for the work list): in order */
        for (int64_t b = 0; b < nblocks; b++)
            for (int64_t t = block_start[b]; t < block_start[b + 1]; t += TMAX) PASS(b, t);
        return;
    }
    int64_t n = 0;
    for (int64_t b = 0; b < nblocks; b++)
        for (int64_t t = block_start[b]; t < block_start[b + 1]; t += TMAX) {
            items[2 * n] = b;
            items[2 * n++ + 1] = t;
        }
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t i = 0; i < nitems; i++) PASS(items[2 * i], items[2 * i + 1]);
    free(items);
#undef PASS
}
