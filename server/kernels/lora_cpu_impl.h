/* The kernel's body, written once for any weight type: lora_cpu.c includes it once per type with
 * WT (the weight element), WLOAD (VW weights -> one float vector), W2F (one weight -> float) and
 * FN (the name suffix) defined. Activations (x, y) and accumulation are float32 in every variant.
 */
/* h[k][j] = A[k] · x_j for k < r (r <= RMAX), j < nj. */
static inline __attribute__((always_inline)) void FN(shrink)(
    const float *const *xr, const WT *restrict a, int64_t ars, int64_t in, int64_t r,
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
                __builtin_prefetch((const char *)(a + (k + q) * ars + i) + PREFETCH_BYTES);
                const vf av = WLOAD(a + (k + q) * ars + i);
                for (int j = 0; j < nj; j++) c[q][j] += av * xv[j];
            }
        }
        for (int q = 0; q < RB; q++)
            for (int j = 0; j < nj; j++) {
                float s = hsum(c[q][j]);
                for (int64_t i = iv; i < in; i++) s += W2F(a[(k + q) * ars + i]) * xr[j][i];
                h[k + q][j] = s;
            }
    }
    for (; k < r; k++)
        for (int j = 0; j < nj; j++) {
            float s = 0.f;
            for (int64_t i = 0; i < in; i++) s += W2F(a[k * ars + i]) * xr[j][i];
            h[k][j] = s;
        }
}

/* y_j += Σ_k h[k][j] · Bᵀ[k]: each y vector is loaded and stored once for all r rows. */
static inline __attribute__((always_inline)) void FN(expand)(
    float *const *yr, const WT *restrict bt, int64_t brs, int64_t out, int64_t r,
    float h[][TMAX], const int nj)
{
    const int64_t ov = out - out % VW;
    for (int64_t o = 0; o < ov; o += VW) {
        vf acc[TMAX];
        for (int j = 0; j < nj; j++) acc[j] = vload(yr[j] + o);
        for (int64_t k = 0; k < r; k++) {
            __builtin_prefetch((const char *)(bt + k * brs + o) + PREFETCH_BYTES);
            const vf w = WLOAD(bt + k * brs + o);
            for (int j = 0; j < nj; j++) acc[j] += h[k][j] * w;
        }
        for (int j = 0; j < nj; j++) vstore(yr[j] + o, acc[j]);
    }
    for (int64_t o = ov; o < out; o++)
        for (int j = 0; j < nj; j++) {
            float s = yr[j][o];
            for (int64_t k = 0; k < r; k++) s += h[k][j] * W2F(bt[k * brs + o]);
            yr[j][o] = s;
        }
}

static inline __attribute__((always_inline)) void FN(tokens_pass)(
    const float *x, int64_t xs, float *y, int64_t ys, const WT *a, int64_t ars,
    const WT *bt, int64_t brs, int64_t in, int64_t out, int64_t r, const int64_t *tok, const int nj)
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
        FN(shrink)(xr, a + k0 * ars, ars, in, rc, h, nj);
        FN(expand)(yr, bt + k0 * brs, brs, out, rc, h, nj);
    }
}

/* Up to TMAX tokens of block b, starting at tokens[t]. */
static void FN(block_pass)(const float *x, int64_t xs, float *y, int64_t ys,
                       const WT *a, int64_t a_slot, int64_t ars, const WT *bt, int64_t b_slot, int64_t brs,
                       int64_t in, int64_t out, int64_t r, const int64_t *block_slot, const int64_t *block_start,
                       const int64_t *tokens, int64_t b, int64_t t)
{
    const WT *as = a + block_slot[b] * a_slot, *bs = bt + block_slot[b] * b_slot;
    const int64_t n = block_start[b + 1] - t < TMAX ? block_start[b + 1] - t : TMAX;
    switch (n) {  /* constant nj: each case compiles to its own unrolled loops */
    case 1: FN(tokens_pass)(x, xs, y, ys, as, ars, bs, brs, in, out, r, tokens + t, 1); break;
    case 2: FN(tokens_pass)(x, xs, y, ys, as, ars, bs, brs, in, out, r, tokens + t, 2); break;
    case 3: FN(tokens_pass)(x, xs, y, ys, as, ars, bs, brs, in, out, r, tokens + t, 3); break;
    default: FN(tokens_pass)(x, xs, y, ys, as, ars, bs, brs, in, out, r, tokens + t, 4); break;
    }
}

/* Work items are (block, up to TMAX of its tokens): they write disjoint rows of y, so they run
 * in parallel, and one adapter with many tokens still spreads over the threads. */
void FN(lora_grouped)(const float *x, int64_t xs, float *y, int64_t ys,
                      const WT *a, int64_t a_slot, int64_t ars,
                      const WT *bt, int64_t b_slot, int64_t brs,
                      int64_t in, int64_t out, int64_t r,
                      const int64_t *block_slot, const int64_t *block_start, int64_t nblocks,
                      const int64_t *tokens, int nthreads)
{
#define PASS(b, t) FN(block_pass)(x, xs, y, ys, a, a_slot, ars, bt, b_slot, brs, in, out, r, \
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
