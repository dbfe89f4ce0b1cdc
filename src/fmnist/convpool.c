/*
 * Fused 5x5 convolution -> 2x2 max-pooling -> ReLU for the seed's Network on the CPU.
 *
 * PyTorch runs these layers as three kernels (oneDNN convolution, max_pool2d_with_indices, ReLU)
 * built for wide channel counts; with 1->5 and 5->12 channels they spend most of their time on
 * overhead and scalar loops. Here one pass per image computes two conv rows of every output
 * channel in registers, pools them and applies ReLU, keeping a 2-bit window index per output for
 * the backward pass.
 *
 * Layouts are contiguous NCHW float32. The arithmetic is PyTorch's: conv = bias + sum over
 * (ci, u, v) of w * x; pooling keeps the first maximum of each window in row-major order, like
 * max_pool2d; ReLU passes no gradient where its output is 0. Only the order of the float additions
 * differs. Results are deterministic for a given thread count: images are split among threads
 * statically and per-thread weight gradients are summed in thread order.
 *
 * Portable C11 with GCC/Clang vector extensions (GCC >= 12 or Clang): -march=native turns them
 * into AVX2/AVX-512 on x86 and NEON on ARM. fmnist/kernels.py builds and loads this file, and
 * uses PyTorch's layers where it cannot.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define K 5    /* kernel size */
#define DEAD 4 /* window index meaning "the ReLU cut this output": no gradient flows back */

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8 splat(float a) { return (v8){a, a, a, a, a, a, a, a}; }
static inline v8 load8(const float *p) { v8 r; memcpy(&r, p, sizeof r); return r; }
static inline void store8(float *p, v8 a) { memcpy(p, &a, sizeof a); }
static inline float hsum8(v8 a) { return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])); }
static inline v8 select8(v8i mask, v8 a, v8 b) { return (v8)((mask & (v8i)a) | (~mask & (v8i)b)); }
static inline v8i selecti(v8i mask, v8i a, v8i b) { return (mask & a) | (~mask & b); }
static inline v8i spliti(int32_t a) { return (v8i){a, a, a, a, a, a, a, a}; }
/* columns 0, 2, ..., 14 and 1, 3, ..., 15 of the 16 floats a:b */
static inline v8 even8(v8 a, v8 b) { return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14); }
static inline v8 odd8(v8 a, v8 b) { return __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15); }

/*
 * One layer, specialised at compile time on its shape (CI input channels of H x H, CO output
 * channels) so that every loop has a constant trip count. A conv row is HO = H - 4 floats, a
 * multiple of 8 (24 and 8 here): V vectors. Inner loops update many independent accumulators (all
 * output channels at once, or all 25 taps at once), so the additions overlap instead of waiting
 * on each other.
 */
#define CONVPOOL(NAME, CI, CO, H)                                                                  \
    enum {                                                                                         \
        NAME##_HO = (H) - K + 1,              /* conv output rows and columns */                   \
        NAME##_P = NAME##_HO / 2,             /* pooled rows and columns */                        \
        NAME##_V = NAME##_HO / 8,             /* vectors per conv row */                           \
        NAME##_R = (NAME##_HO + 15) / 16 * 16, /* a conv row padded to whole 16-column groups */   \
        NAME##_IN = (CI) * (H) * (H),                                                              \
        NAME##_OUT = (CO) * NAME##_P * NAME##_P,                                                   \
        NAME##_NW = (CO) * (CI) * K * K,                                                           \
    };                                                                                             \
                                                                                                   \
    static void NAME##_forward_one(const float *x, const float *w, const float *b, float *out,     \
                                   uint8_t *idx) {                                                \
        enum { HO = NAME##_HO, P = NAME##_P, V = NAME##_V, R = NAME##_R };                         \
        v8 bad = splat(0.0f); /* stays 0 unless a conv output is NaN or infinite (x * 0 is NaN) */ \
        float rows[2][CO][R]; /* conv rows 2p and 2p + 1 of every output channel, zero-padded */   \
        memset(rows, 0, sizeof rows);                                                              \
        for (int p = 0; p < P; p++) {                                                              \
            for (int r = 0; r < 2; r++) {                                                          \
                v8 acc[CO][V];                                                                     \
                for (int co = 0; co < (CO); co++)                                                  \
                    for (int k = 0; k < V; k++) acc[co][k] = splat(b[co]);                         \
                for (int ci = 0; ci < (CI); ci++)                                                  \
                    for (int u = 0; u < K; u++) {                                                  \
                        const float *xr = x + (ci * (H) + 2 * p + r + u) * (H);                    \
                        for (int v = 0; v < K; v++)                                                \
                            for (int k = 0; k < V; k++) {                                          \
                                const v8 xv = load8(xr + v + 8 * k);                               \
                                for (int co = 0; co < (CO); co++)                                  \
                                    acc[co][k] += w[((co * (CI) + ci) * K + u) * K + v] * xv;      \
                            }                                                                      \
                    }                                                                              \
                for (int co = 0; co < (CO); co++)                                                  \
                    for (int k = 0; k < V; k++) {                                                  \
                        store8(&rows[r][co][8 * k], acc[co][k]);                                   \
                        bad += acc[co][k] * 0.0f;                                                  \
                    }                                                                              \
            }                                                                                      \
            /* 8 windows at a time; lanes past the row's end are not stored */       \
            for (int co = 0; co < (CO); co++)                                                      \
                for (int q0 = 0; q0 < P; q0 += 8) {                                                \
                    const float *r0 = &rows[0][co][2 * q0], *r1 = &rows[1][co][2 * q0];            \
                    const v8 c[4] = {even8(load8(r0), load8(r0 + 8)), odd8(load8(r0), load8(r0 + 8)), \
                                     even8(load8(r1), load8(r1 + 8)), odd8(load8(r1), load8(r1 + 8))}; \
                    v8 m = c[0];                                                                   \
                    v8i k = spliti(0);                                                             \
                    for (int i = 1; i < 4; i++) { /* strictly greater: the first maximum stays */  \
                        const v8i take = c[i] > m;                                                 \
                        m = select8(take, c[i], m);                                                \
                        k = selecti(take, spliti(i), k);                                           \
                    }                                                                              \
                    const v8i live = m > splat(0.0f);                                              \
                    m = select8(live, m, splat(0.0f));                                             \
                    k = selecti(live, k, spliti(DEAD));                                            \
                    const int o = (co * P + p) * P + q0;                                           \
                    for (int l = 0; l < 8 && q0 + l < P; l++) {                                    \
                        out[o + l] = m[l];                                                         \
                        idx[o + l] = (uint8_t)k[l];                                                \
                    }                                                                              \
                }                                                                                  \
        }                                                                                          \
        /* a NaN or infinity in the conv output makes the whole image's output NaN, so that a      \
           diverged run shows in the loss as it does with PyTorch's layers */                      \
        if (!(hsum8(bad) == 0.0f))                                                                 \
            for (int o = 0; o < NAME##_OUT; o++) out[o] = NAN;                                     \
    }                                                                                              \
                                                                                                   \
    void NAME##_forward(const float *x, const float *w, const float *b, float *out, uint8_t *idx,  \
                        int64_t n) {                                                               \
        _Pragma("omp parallel for schedule(static)") for (int64_t i = 0; i < n; i++)               \
            NAME##_forward_one(x + i * NAME##_IN, w, b, out + i * NAME##_OUT, idx + i * NAME##_OUT); \
    }                                                                                              \
                                                                                                   \
    /* gw: this thread's per-lane weight-gradient sums; gb: its bias sums; gx: this image's input  \
       gradient (zeroed), or NULL when the input needs none */                                     \
    static void NAME##_backward_one(const float *x, const float *w, const float *gout,            \
                                    const uint8_t *idx, float *gx, v8 *gw, float *gb) {           \
        enum { HO = NAME##_HO, P = NAME##_P, V = NAME##_V };                                       \
        /* the conv output's gradient: the pooled gradient at each window's maximum, else 0; row   \
           HO catches what the ReLU cut, so the scatter needs no branch */                         \
        float g[CO][HO + 1][HO];                                                                   \
        memset(g, 0, sizeof g);                                                                    \
        for (int co = 0; co < (CO); co++) {                                                        \
            float sum = 0.0f;                                                                      \
            for (int o = co * P * P; o < (co + 1) * P * P; o++) {                                  \
                const int k = idx[o], live = k != DEAD, p = o / P % P, q = o % P;                  \
                const float go = live ? gout[o] : 0.0f;                                            \
                *(live ? &g[co][2 * p + (k >> 1)][2 * q + (k & 1)] : &g[co][HO][0]) = go;          \
                sum += go;                                                                         \
            }                                                                                      \
            gb[co] += sum;                                                                         \
        }                                                                                          \
        for (int co = 0; co < (CO); co++)                                                          \
            for (int ci = 0; ci < (CI); ci++) {                                                    \
                v8 acc[K * K]; /* one accumulator per tap, in registers */                         \
                memcpy(acc, gw + (co * (CI) + ci) * K * K, sizeof acc);                            \
                for (int i = 0; i < HO; i++)                                                       \
                    for (int k = 0; k < V; k++) {                                                  \
                        const v8 gv = load8(&g[co][i][8 * k]);                                     \
                        for (int u = 0; u < K; u++)                                                \
                            for (int v = 0; v < K; v++)                                            \
                                acc[u * K + v] += gv * load8(x + (ci * (H) + i + u) * (H) + v + 8 * k); \
                    }                                                                              \
                memcpy(gw + (co * (CI) + ci) * K * K, acc, sizeof acc);                            \
            }                                                                                      \
        if (gx)                                                                                    \
            for (int ci = 0; ci < (CI); ci++)                                                      \
                for (int u = 0; u < K; u++)                                                        \
                    for (int v = 0; v < K; v++)                                                    \
                        for (int i = 0; i < HO; i++)                                               \
                            for (int k = 0; k < V; k++) {                                          \
                                v8 s = splat(0.0f);                                                \
                                for (int co = 0; co < (CO); co++)                                  \
                                    s += w[((co * (CI) + ci) * K + u) * K + v] * load8(&g[co][i][8 * k]); \
                                float *d = gx + (ci * (H) + i + u) * (H) + v + 8 * k;              \
                                store8(d, load8(d) + s);                                           \
                            }                                                                      \
    }                                                                                              \
                                                                                                   \
    /* gx: zeroed, or NULL when the input needs no gradient; gw, gb: written, not accumulated */    \
    void NAME##_backward(const float *x, const float *w, const float *gout, const uint8_t *idx,    \
                         float *gx, float *gw, float *gb, int64_t n) {                             \
        enum { NW = NAME##_NW };                                                                   \
        const int nt = omp_get_max_threads();                                                      \
        float *part = calloc((size_t)nt * (NW + (CO)), sizeof(float));                             \
        v8 *lanes = aligned_alloc(32, (size_t)nt * NW * sizeof(v8));                               \
        _Pragma("omp parallel num_threads(nt)") {                                                  \
            const int t = omp_get_thread_num();                                                    \
            v8 *mine = lanes + (size_t)t * NW;                                                     \
            float *sums = part + (size_t)t * (NW + (CO));                                          \
            for (int i = 0; i < NW; i++) mine[i] = splat(0.0f);                                    \
            _Pragma("omp for schedule(static) nowait") for (int64_t i = 0; i < n; i++)             \
                NAME##_backward_one(x + i * NAME##_IN, w, gout + i * NAME##_OUT, idx + i * NAME##_OUT, \
                                    gx ? gx + i * NAME##_IN : NULL, mine, sums + NW);              \
            for (int i = 0; i < NW; i++) sums[i] = hsum8(mine[i]);                                 \
        }                                                                                          \
        memcpy(gw, part, NW * sizeof(float));                                                      \
        memcpy(gb, part + NW, (CO) * sizeof(float));                                               \
        for (int t = 1; t < nt; t++) {                                                             \
            const float *src = part + (size_t)t * (NW + (CO));                                     \
            for (int i = 0; i < NW; i++) gw[i] += src[i];                                          \
            for (int i = 0; i < (CO); i++) gb[i] += src[NW + i];                                   \
        }                                                                                          \
        free(lanes);                                                                               \
        free(part);                                                                                \
    }

/* The seed's Network: conv1 1 -> 5 channels on 28 x 28, conv2 5 -> 12 channels on 12 x 12. */
CONVPOOL(conv1, 1, 5, 28)
CONVPOOL(conv2, 5, 12, 12)
