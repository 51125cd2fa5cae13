/* Grouped LoRA add for CPU decode: y[t] += (A[slot] · x[t]) · Bᵀ[slot] for every token t of
 * every block, where a block is one active slot and the tokens that use it.
 *
 * Why a kernel: in decode each adapter serves a few tokens, so the step is bound by reading
 * every active adapter's A and Bᵀ once. torch's batched GEMM needs the active slots to be
 * contiguous in the slot tensors (one bmm per run of consecutive slots) and reads weights well
 * below streaming speed at these shapes (bench/NOTES.md, "CPU kernel").
 * Here each block reads its slot's rows in place, whatever the slot number, once per group of
 * up to four tokens, with the tokens' partial sums held in registers.
 *
 * Two variants, one body (lora_cpu_impl.h): float32 weights (lora_grouped_f32) and float16
 * weights widened to float32 as they are loaded (lora_grouped_f16, where the CPU converts in
 * hardware: F16C / AVX-512). Decode with many adapters is bound by reading their weights, so
 * half the bytes is most of the time saved (settings.slot_dtype).
 *
 * The pure-torch path in server/adapters/runtime/layers.py is the reference; tests compare the two.
 * Built at first use with the machine's C compiler (server/kernels/cpu.py), -march=native.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#define VW 16   /* floats per vector: one AVX-512 register, two AVX2 ones (GCC splits it) */
#define RB 8    /* rows of A per pass over x: eight FMA chains per token hide the FMA latency */
#define RMAX 64 /* ranks above this are processed in chunks of RMAX rows */
#define TMAX 4  /* tokens per pass over a slot's weights */
/* Software prefetch distance along each weight row. The rows are many short streams (a slot's A is
 * r rows of `in` weights, read 8 at a time; Bᵀ r rows read side by side), which the hardware
 * prefetcher ramps up on late; 2 lines ahead was the best distance tried (bench/NOTES.md, "CPU kernel"). */
#define PREFETCH_BYTES 128

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

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUFFIX)

#define WT float
#define WLOAD(p) vload(p)
#define W2F(w) (w)
#define SUFFIX _f32
#include "lora_cpu_impl.h"
#undef WT
#undef WLOAD
#undef W2F
#undef SUFFIX

#if defined(__F16C__)
/* VW float16 weights (raw IEEE half bits) widened in registers: one vcvtph2ps per 16 (AVX-512) or 8. */
static inline vf hload(const uint16_t *p)
{
    vf v;
#if defined(__AVX512F__)
    const __m512 w = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    memcpy(&v, &w, sizeof v);
#else
    const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)));
    memcpy(&v, &lo, 32);
    memcpy((char *)&v + 32, &hi, 32);
#endif
    return v;
}

#define WT uint16_t
#define WLOAD(p) hload(p)
#define W2F(w) _cvtsh_ss(w)
#define SUFFIX _f16
#include "lora_cpu_impl.h"
#endif
