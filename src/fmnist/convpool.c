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
    /* gw: this thread's weight-gradient rows (lane v of row (co, ci, u) is w[co, ci, u, v]'s);     \
       gb: its bias sums; gx: this image's input gradient (written), or NULL when none is needed */ \
    static void NAME##_backward_one(const float *x, const v8 *wrows, const float *gout,           \
                                    const uint8_t *idx, float *gx, v8 *gw, float *gb) {           \
        enum { P = NAME##_P, W = (H) + 4 };                                                        \
        /* the image with each row padded to W floats, so that an 8-wide load at any window        \
           column stays inside the buffer */                                                       \
        float xp[CI][H][W];                                                                        \
        for (int ci = 0; ci < (CI); ci++)                                                          \
            for (int y = 0; y < (H); y++) {                                                        \
                memcpy(xp[ci][y], x + (ci * (H) + y) * (H), (H) * sizeof(float));                  \
                memset(xp[ci][y] + (H), 0, 4 * sizeof(float));                                    \
            }                                                                                      \
        /* Only each window's maximum gets a gradient (outputs the ReLU cut carry 0, which saves a   \
           branch): add gout times the 5 x 5 input patch under it to the weight gradient, and gout \
           times the kernel to the input gradient, 8 columns (5 used) at a time. */                \
        float gxp[CI][H][W]; /* the input gradient, rows padded like xp */                         \
        if (gx) memset(gxp, 0, sizeof gxp);                                                        \
        for (int co = 0; co < (CO); co++) {                                                        \
            v8 acc[CI][K];                                                                         \
            memcpy(acc, gw + co * (CI) * K, sizeof acc);                                           \
            float sum = 0.0f;                                                                      \
            for (int p = 0; p < P; p++)                                                            \
                for (int q = 0; q < P; q++) {                                                      \
                    const int o = (co * P + p) * P + q, k = idx[o], live = k != DEAD;              \
                    const float go = live ? gout[o] : 0.0f;                                        \
                    const int i = 2 * p + (k >> 1 & 1), j = 2 * q + (k & 1);                       \
                    const v8 gv = splat(go);                                                       \
                    for (int ci = 0; ci < (CI); ci++)                                              \
                        for (int u = 0; u < K; u++) acc[ci][u] += gv * load8(&xp[ci][i + u][j]);  \
                    if (gx)                                                                        \
                        for (int ci = 0; ci < (CI); ci++)                                          \
                            for (int u = 0; u < K; u++) {                                          \
                                float *d = &gxp[ci][i + u][j];                                     \
                                store8(d, load8(d) + gv * wrows[(co * (CI) + ci) * K + u]);        \
                            }                                                                      \
                    sum += go;                                                                     \
                }                                                                                  \
            memcpy(gw + co * (CI) * K, acc, sizeof acc);                                           \
            gb[co] += sum;                                                                         \
        }                                                                                          \
        if (gx)                                                                                    \
            for (int ci = 0; ci < (CI); ci++)                                                      \
                for (int y = 0; y < (H); y++) memcpy(gx + (ci * (H) + y) * (H), gxp[ci][y], (H) * sizeof(float)); \
    }                                                                                              \
                                                                                                   \
    /* gx (or NULL when the input needs no gradient), gw, gb: written, not accumulated.            \
       Returns 0, or -1 when out of memory. */                                                     \
    int NAME##_backward(const float *x, const float *w, const float *gout, const uint8_t *idx,     \
                        float *gx, float *gw, float *gb, int64_t n) {                              \
        enum { NW = NAME##_NW, ROWS = (CO) * (CI) * K };                                           \
        const int nt = omp_get_max_threads();                                                      \
        int team = 1; /* threads the runtime actually gives (OMP_DYNAMIC may give fewer than nt) */ \
        float *part = calloc((size_t)nt * (NW + (CO)), sizeof(float)); /* per thread, in order */  \
        if (!part) return -1;                                                                      \
        v8 wrows[ROWS]; /* kernel rows padded to 8 lanes with zeros */                             \
        for (int r = 0; r < ROWS; r++) {                                                           \
            wrows[r] = splat(0.0f);                                                                \
            for (int v = 0; v < K; v++) wrows[r][v] = w[r * K + v];                                \
        }                                                                                          \
        _Pragma("omp parallel num_threads(nt)") {                                                  \
            _Pragma("omp single") team = omp_get_num_threads();                                    \
            v8 rows[ROWS]; /* the accumulators live on each thread's own stack: no false sharing */ \
            float bias[CO] = {0};                                                                  \
            for (int r = 0; r < ROWS; r++) rows[r] = splat(0.0f);                                  \
            _Pragma("omp for schedule(static) nowait") for (int64_t i = 0; i < n; i++)             \
                NAME##_backward_one(x + i * NAME##_IN, wrows, gout + i * NAME##_OUT, idx + i * NAME##_OUT, \
                                    gx ? gx + i * NAME##_IN : NULL, rows, bias);                   \
            float *sums = part + (size_t)omp_get_thread_num() * (NW + (CO));                       \
            for (int r = 0; r < ROWS; r++)                                                         \
                for (int v = 0; v < K; v++) sums[r * K + v] = rows[r][v];                          \
            memcpy(sums + NW, bias, sizeof bias);                                                  \
        }                                                                                          \
        memcpy(gw, part, NW * sizeof(float));                                                      \
        memcpy(gb, part + NW, (CO) * sizeof(float));                                               \
        for (int t = 1; t < team; t++) {                                                           \
            const float *src = part + (size_t)t * (NW + (CO));                                     \
            for (int i = 0; i < NW; i++) gw[i] += src[i];                                          \
            for (int i = 0; i < (CO); i++) gb[i] += src[NW + i];                                   \
        }                                                                                          \
        free(part);                                                                                \
        return 0;                                                                                  \
    }

/* The seed's Network: conv1 1 -> 5 channels on 28 x 28, conv2 5 -> 12 channels on 12 x 12. */
CONVPOOL(conv1, 1, 5, 28)
CONVPOOL(conv2, 5, 12, 12)
