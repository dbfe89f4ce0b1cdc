/*
 * Fused 5x5 convolution -> 2x2 max-pooling -> ReLU for the seed's Network on the CPU, as two
 * PyTorch operators: fmnist::conv_pool_relu and fmnist::conv_pool_relu_backward.
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
 * differs. Results do not depend on the thread count: the output and the input gradient are
 * computed image by image, and the weight and bias gradients are summed over fixed blocks of
 * BLOCK images, then the blocks' sums are added in block order. Threads come from PyTorch's own
 * pool (at::parallel_for), so torch.set_num_threads governs them.
 *
 * C++17 with GCC/Clang vector extensions (GCC >= 12 or Clang). setup.py compiles it with fixed
 * flags, whatever the build machine has (AVX2 on x86-64, plain -O3 elsewhere, where the vectors
 * lower to NEON etc.), and without contracting w * x + acc into fused multiply-adds, so that every
 * float operation is the one written here and the bits do not depend on the instruction set. The
 * extension module is fmnist._C; fmnist/kernels.py registers the shapes and gradient
 * (torch.library) and checks that the binary was built from this very file.
 */
#include <Python.h>  // first, as Python asks: the module's init function (end of file)

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

constexpr int K = 5;           // kernel size
constexpr int DEAD = 4;        // window index meaning "the ReLU cut this output": no gradient flows back
constexpr int64_t BLOCK = 4;   // images per partial weight gradient: a constant, never the thread count,
                               // so the order of every addition is fixed; small, so that a batch of 100
                               // (25 blocks) still splits evenly over threads

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8 splat(float a) { return v8{a, a, a, a, a, a, a, a}; }
inline v8 load8(const float *p) { v8 r; std::memcpy(&r, p, sizeof r); return r; }
inline void store8(float *p, v8 a) { std::memcpy(p, &a, sizeof a); }
inline float hsum8(v8 a) { return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])); }
inline v8 select8(v8i mask, v8 a, v8 b) { return (v8)((mask & (v8i)a) | (~mask & (v8i)b)); }
inline v8i selecti(v8i mask, v8i a, v8i b) { return (mask & a) | (~mask & b); }
inline v8i spliti(int32_t a) { return v8i{a, a, a, a, a, a, a, a}; }
/* columns 0, 2, ..., 14 and 1, 3, ..., 15 of the 16 floats a:b */
inline v8 even8(v8 a, v8 b) { return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14); }
inline v8 odd8(v8 a, v8 b) { return __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15); }

/*
 * One layer, specialised at compile time on its shape (CI input channels of H x H, CO output
 * channels) so that every loop has a constant trip count. A conv row is HO = H - 4 floats, a
 * multiple of 8 (24 and 8 here): V vectors. Inner loops update many independent accumulators (all
 * output channels at once, or all 5 taps of a kernel row at once), so the additions overlap
 * instead of waiting on each other, but at most 12, so that with the operands they fit in AVX2's
 * 16 vector registers instead of spilling to the stack.
 */
template <int CI, int CO, int H>
struct Layer {
    static constexpr int HO = H - K + 1;              // conv output rows and columns
    static constexpr int P = HO / 2;                  // pooled rows and columns
    static constexpr int V = HO / 8;                  // vectors per conv row
    static constexpr int R = (HO + 15) / 16 * 16;     // a conv row padded to whole 16-column groups
    static constexpr int IN = CI * H * H;
    static constexpr int OUT = CO * P * P;
    static constexpr int ROWS = CO * CI * K;          // kernel rows: (co, ci, u)
    /* The forward's passes: NR conv rows of CG output channels, KV vectors of each row, in
       NR * CG * KV <= 12 accumulators. One row of every channel per pass measured fastest here
       (two or four rows, with fewer channels, were 5-50% slower: the compiler then spills). */
    static constexpr int NR = 1;
    static constexpr int CG = CO;
    static constexpr int KV = CO * V <= 12 ? V : 1;
    static constexpr int PR = NR > 2 ? NR / 2 : 1;    // pooled rows per group of passes
    static_assert(HO % 8 == 0, "a conv row must be whole 8-float vectors");
    static_assert(NR * CG * KV <= 12, "the forward's accumulators must fit in 16 vector registers");
    static_assert(CO % CG == 0 && V % KV == 0 && 2 * PR % NR == 0 && P % PR == 0, "passes must tile the output");

    static void forward_one(const float *x, const float *w, const float *b, float *out, uint8_t *idx) {
        v8 bad = splat(0.0f);       // stays 0 unless a conv output is NaN or infinite (x * 0 is NaN)
        float rows[2 * PR][CO][R];  // conv rows 2 p0 .. 2 p0 + 2 PR - 1 of every output channel, zero-padded
        std::memset(rows, 0, sizeof rows);
        for (int p0 = 0; p0 < P; p0 += PR) {
            for (int r0 = 0; r0 < 2 * PR; r0 += NR)
                for (int c0 = 0; c0 < CO; c0 += CG)
                    for (int k0 = 0; k0 < V; k0 += KV) {  // vectors k0 .. k0 + KV - 1 of the rows
                        v8 acc[NR][CG][KV];
                        for (int r = 0; r < NR; r++)
                            for (int c = 0; c < CG; c++)
                                for (int k = 0; k < KV; k++) acc[r][c][k] = splat(b[c0 + c]);
                        for (int ci = 0; ci < CI; ci++)
                            for (int u = 0; u < K; u++) {
                                const float *xr = x + (ci * H + 2 * p0 + r0 + u) * H + 8 * k0;
                                const float *wr = w + ((c0 * CI + ci) * K + u) * K;
                                for (int v = 0; v < K; v++)
                                    for (int c = 0; c < CG; c++) {
                                        const v8 wv = splat(wr[c * CI * K * K + v]);
                                        for (int r = 0; r < NR; r++)
                                            for (int k = 0; k < KV; k++)
                                                acc[r][c][k] += wv * load8(xr + r * H + v + 8 * k);
                                    }
                            }
                        for (int r = 0; r < NR; r++)
                            for (int c = 0; c < CG; c++)
                                for (int k = 0; k < KV; k++) {
                                    store8(&rows[r0 + r][c0 + c][8 * (k0 + k)], acc[r][c][k]);
                                    bad += acc[r][c][k] * 0.0f;
                                }
                    }
            /* 8 windows at a time; lanes past the row's end are not stored */
            for (int pr = 0; pr < PR; pr++)
                for (int co = 0; co < CO; co++)
                    for (int q0 = 0; q0 < P; q0 += 8) {
                        const int p = p0 + pr;
                        const float *r0 = &rows[2 * pr][co][2 * q0], *r1 = &rows[2 * pr + 1][co][2 * q0];
                        const v8 c[4] = {even8(load8(r0), load8(r0 + 8)), odd8(load8(r0), load8(r0 + 8)),
                                         even8(load8(r1), load8(r1 + 8)), odd8(load8(r1), load8(r1 + 8))};
                        v8 m = c[0];
                        v8i k = spliti(0);
                        for (int i = 1; i < 4; i++) {  // strictly greater: the first maximum stays
                            const v8i take = c[i] > m;
                            m = select8(take, c[i], m);
                            k = selecti(take, spliti(i), k);
                        }
                        const v8i live = m > splat(0.0f);
                        m = select8(live, m, splat(0.0f));
                        k = selecti(live, k, spliti(DEAD));
                        const int o = (co * P + p) * P + q0;
                        for (int l = 0; l < 8 && q0 + l < P; l++) {
                            out[o + l] = m[l];
                            idx[o + l] = (uint8_t)k[l];
                        }
                    }
        }
        /* a NaN or infinity in the conv output makes the whole image's output NaN, so that a
           diverged run shows in the loss as it does with PyTorch's layers */
        if (!(hsum8(bad) == 0.0f))
            for (int o = 0; o < OUT; o++) out[o] = NAN;
    }

    static void forward(const float *x, const float *w, const float *b, float *out, uint8_t *idx, int64_t n) {
        at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; i++)
                forward_one(x + i * IN, w, b, out + i * OUT, idx + i * OUT);
        });
    }

    /* gw: this block's weight-gradient rows (lane v of row (co, ci, u) is w[co, ci, u, v]'s);
       gb: its bias sums; wt: the kernel with the input channels in the lanes (lane ci of wt[(co * K + u) * K
       + v] is w[co, ci, u, v]); gx: this image's input gradient (written), or nullptr when none is needed */
    static void backward_one(const float *x, const v8 *wt, const float *gout, const uint8_t *idx, float *gx,
                             v8 *gw, float *gb) {
        constexpr int W = H + 4;
        /* the image with each row padded to W floats, so that an 8-wide load at any window
           column stays inside the buffer */
        float xp[CI][H][W];
        for (int ci = 0; ci < CI; ci++)
            for (int y = 0; y < H; y++) {
                std::memcpy(xp[ci][y], x + (ci * H + y) * H, H * sizeof(float));
                std::memset(xp[ci][y] + H, 0, 4 * sizeof(float));
            }
        /* Only each window's maximum gets a gradient (outputs the ReLU cut carry 0, which saves a
           branch): add gout times the 5 x 5 input patch under it to the weight gradient, and gout
           times the kernel to the input gradient. Each sum runs over the windows in row-major order,
           output channel by output channel. */
        float go[CO][P * P];  // each window's gradient
        int at[CO][P * P];    // where its maximum's 5 x 5 patch starts: row i, column j as i * W + j
        for (int co = 0; co < CO; co++) {
            float sum = 0.0f;
            for (int p = 0; p < P; p++)
                for (int q = 0; q < P; q++) {
                    const int o = (co * P + p) * P + q, k = idx[o], live = k != DEAD;
                    go[co][p * P + q] = live ? gout[o] : 0.0f;
                    at[co][p * P + q] = (2 * p + (k >> 1 & 1)) * W + 2 * q + (k & 1);
                    sum += go[co][p * P + q];
                }
            gb[co] += sum;
        }
        /* The weight gradient, two kernels (co, ci) at a time: 10 accumulators, 8 columns (5 used)
           of a patch row each, so that the additions overlap and still fit 16 vector registers. */
        constexpr int PAIRS = CO * CI;
        constexpr int PAIRED = CI > 1 ? PAIRS / 2 * 2 : 0;  // conv1's are long enough alone (144 windows)
        for (int c0 = 0; c0 < PAIRED; c0 += 2) {
            const int c1 = c0 + 1, co0 = c0 / CI, co1 = c1 / CI;
            const float *x0 = &xp[c0 % CI][0][0], *x1 = &xp[c1 % CI][0][0];
            v8 acc0[K], acc1[K];
            std::memcpy(acc0, gw + c0 * K, sizeof acc0);
            std::memcpy(acc1, gw + c1 * K, sizeof acc1);
            for (int o = 0; o < P * P; o++) {
                const v8 g0 = splat(go[co0][o]), g1 = splat(go[co1][o]);
                const float *p0 = x0 + at[co0][o], *p1 = x1 + at[co1][o];
                for (int u = 0; u < K; u++) {
                    acc0[u] += g0 * load8(p0 + u * W);
                    acc1[u] += g1 * load8(p1 + u * W);
                }
            }
            std::memcpy(gw + c0 * K, acc0, sizeof acc0);
            std::memcpy(gw + c1 * K, acc1, sizeof acc1);
        }
        for (int c = PAIRED; c < PAIRS; c++) {  // the rest one by one
            const int co = c / CI;
            const float *x0 = &xp[c % CI][0][0];
            v8 acc[K];
            std::memcpy(acc, gw + c * K, sizeof acc);
            for (int o = 0; o < P * P; o++) {
                const v8 g = splat(go[co][o]);
                for (int u = 0; u < K; u++) acc[u] += g * load8(x0 + at[co][o] + u * W);
            }
            std::memcpy(gw + c * K, acc, sizeof acc);
        }
        if (!gx) return;
        /* The input gradient with the input channels in the lanes: every window adds to whole
           8-float cells, never to part of one that an earlier window wrote, so the loads that follow
           stores get their data forwarded. */
        static_assert(CI <= 8, "the input channels must fit in the lanes of one vector");
        v8 gxt[H * H];
        for (int c = 0; c < H * H; c++) gxt[c] = splat(0.0f);
        for (int co = 0; co < CO; co++)
            for (int o = 0; o < P * P; o++) {
                const v8 gv = splat(go[co][o]);
                const int a = at[co][o], i = a / W, j = a % W;
                v8 *d = gxt + i * H + j;
                const v8 *wk = wt + co * K * K;
                for (int u = 0; u < K; u++)
                    for (int v = 0; v < K; v++) d[u * H + v] += gv * wk[u * K + v];
            }
        for (int ci = 0; ci < CI; ci++)
            for (int c = 0; c < H * H; c++) gx[ci * H * H + c] = gxt[c][ci];
    }

    /* gx (or nullptr when the input needs no gradient), gw, gb: written, not accumulated. */
    static void backward(const float *x, const float *w, const float *gout, const uint8_t *idx, float *gx,
                         float *gw, float *gb, int64_t n) {
        v8 wt[CO * K * K];  // the kernel with the input channels in the lanes, zeros past CI
        for (int r = 0; r < CO * K * K; r++) {
            wt[r] = splat(0.0f);
            for (int ci = 0; ci < CI; ci++) wt[r][ci] = w[((r / (K * K) * CI + ci) * K * K) + r % (K * K)];
        }
        /* each block's weight-gradient rows (8 floats each) and bias sums, in block order */
        constexpr int64_t SLAB = ROWS * 8 + CO;
        const int64_t blocks = (n + BLOCK - 1) / BLOCK;
        const at::Tensor partial = at::empty({std::max<int64_t>(blocks, 1), SLAB}, at::kFloat);
        float *part = partial.data_ptr<float>();
        at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
            for (int64_t blk = begin; blk < end; blk++) {
                v8 rows[ROWS];  // the accumulators live on this thread's stack: no false sharing
                float bias[CO] = {0};
                for (int r = 0; r < ROWS; r++) rows[r] = splat(0.0f);
                for (int64_t i = blk * BLOCK; i < std::min(n, (blk + 1) * BLOCK); i++)
                    backward_one(x + i * IN, wt, gout + i * OUT, idx + i * OUT, gx ? gx + i * IN : nullptr,
                                 rows, bias);
                float *slab = part + blk * SLAB;
                for (int r = 0; r < ROWS; r++) store8(slab + 8 * r, rows[r]);
                std::memcpy(slab + ROWS * 8, bias, sizeof bias);
            }
        });
        /* the blocks' sums, added in block order on one thread: the same additions in the same
           order whatever the thread count */
        v8 rows[ROWS];
        float bias[CO] = {0};
        for (int r = 0; r < ROWS; r++) rows[r] = splat(0.0f);
        for (int64_t blk = 0; blk < blocks; blk++) {
            const float *slab = part + blk * SLAB;
            for (int r = 0; r < ROWS; r++) rows[r] += load8(slab + 8 * r);
            for (int c = 0; c < CO; c++) bias[c] += slab[ROWS * 8 + c];
        }
        for (int r = 0; r < ROWS; r++)
            for (int v = 0; v < K; v++) gw[r * K + v] = rows[r][v];
        std::memcpy(gb, bias, sizeof bias);
    }
};

/* The seed's Network: conv1 1 -> 5 channels on 28 x 28, conv2 5 -> 12 channels on 12 x 12. */
using Conv1 = Layer<1, 5, 28>;
using Conv2 = Layer<5, 12, 12>;

/* Whether conv1's specialisation computes this layer (else conv2's); an error naming the shapes
   when neither does. */
bool is_conv1(const at::Tensor &x, const at::Tensor &weight) {
    for (const at::Tensor *t : {&x, &weight}) {
        TORCH_CHECK(t->device().is_cpu(), "fmnist::conv_pool_relu: CPU tensors only, got ", t->device());
        TORCH_CHECK(t->scalar_type() == at::kFloat, "fmnist::conv_pool_relu: float32 only, got ", t->scalar_type());
    }
    TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "fmnist::conv_pool_relu: x and weight must be 4-D, got ",
                x.sizes(), " and ", weight.sizes());
    const int64_t ci = weight.size(1), co = weight.size(0), size = x.size(2);
    const bool shaped = x.size(1) == ci && x.size(3) == size && weight.size(2) == K && weight.size(3) == K;
    TORCH_CHECK(shaped && ((ci == 1 && co == 5 && size == 28) || (ci == 5 && co == 12 && size == 12)),
                "fmnist::conv_pool_relu is built for the seed Network's two layers only (weight [5, 1, 5, 5] on ",
                "x [N, 1, 28, 28], weight [12, 5, 5, 5] on x [N, 5, 12, 12]); got weight ", weight.sizes(), " on x ",
                x.sizes());
    return ci == 1;
}

/* The pooled output's shape [N, CO, P, P]. */
std::vector<int64_t> output_shape(const at::Tensor &x, const at::Tensor &weight) {
    const int64_t p = (x.size(2) - K + 1) / 2;
    return {x.size(0), weight.size(0), p, p};
}

std::tuple<at::Tensor, at::Tensor> conv_pool_relu(const at::Tensor &x_, const at::Tensor &weight_,
                                                  const at::Tensor &bias_) {
    const bool conv1 = is_conv1(x_, weight_);
    TORCH_CHECK(bias_.dim() == 1 && bias_.size(0) == weight_.size(0) && bias_.scalar_type() == at::kFloat &&
                    bias_.device().is_cpu(),
                "fmnist::conv_pool_relu: bias must be float32 of shape [", weight_.size(0), "], got ",
                bias_.scalar_type(), " ", bias_.sizes());
    // NCHW; for one channel channels-last is the same memory, so conv1's input is not copied
    const at::Tensor x = x_.contiguous(), weight = weight_.contiguous(), bias = bias_.contiguous();
    const auto shape = output_shape(x, weight);
    at::Tensor out = at::empty(shape, x.options());
    at::Tensor idx = at::empty(shape, x.options().dtype(at::kByte));
    (conv1 ? Conv1::forward : Conv2::forward)(x.data_ptr<float>(), weight.data_ptr<float>(), bias.data_ptr<float>(),
                                              out.data_ptr<float>(), idx.data_ptr<uint8_t>(), x.size(0));
    return {out, idx};
}

/* grad_x has 0 elements unless input_grad: conv1's input, the images, needs no gradient. */
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_pool_relu_backward(const at::Tensor &x_, const at::Tensor &weight_,
                                                                       const at::Tensor &grad_out_,
                                                                       const at::Tensor &idx_, bool input_grad) {
    const bool conv1 = is_conv1(x_, weight_);
    const auto shape = output_shape(x_, weight_);
    TORCH_CHECK(grad_out_.sizes() == shape && grad_out_.scalar_type() == at::kFloat && grad_out_.device().is_cpu(),
                "fmnist::conv_pool_relu_backward: grad_out must be float32 of shape ", shape, ", got ",
                grad_out_.scalar_type(), " ", grad_out_.sizes());
    TORCH_CHECK(idx_.sizes() == shape && idx_.scalar_type() == at::kByte && idx_.device().is_cpu(),
                "fmnist::conv_pool_relu_backward: idx must be uint8 of shape ", shape, ", got ", idx_.scalar_type(),
                " ", idx_.sizes());
    const at::Tensor x = x_.contiguous(), weight = weight_.contiguous(), grad_out = grad_out_.contiguous(),
                     idx = idx_.contiguous();
    at::Tensor gx = input_grad ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());  // all written
    at::Tensor gw = at::empty(weight.sizes(), weight.options());
    at::Tensor gb = at::empty({weight.size(0)}, weight.options());
    (conv1 ? Conv1::backward : Conv2::backward)(x.data_ptr<float>(), weight.data_ptr<float>(),
                                                grad_out.data_ptr<float>(), idx.data_ptr<uint8_t>(),
                                                input_grad ? gx.data_ptr<float>() : nullptr, gw.data_ptr<float>(),
                                                gb.data_ptr<float>(), x.size(0));
    return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY(fmnist, m) {
    m.def("conv_pool_relu(Tensor x, Tensor weight, Tensor bias) -> (Tensor out, Tensor idx)",
          {at::Tag::pt2_compliant_tag});
    m.def("conv_pool_relu_backward(Tensor x, Tensor weight, Tensor grad_out, Tensor idx, bool input_grad)"
          " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)",
          {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(fmnist, CPU, m) {
    m.impl("conv_pool_relu", &conv_pool_relu);
    m.impl("conv_pool_relu_backward", &conv_pool_relu_backward);
}

/* What fmnist/kernels.py checks before it uses the operators: the SHA-256 of this file when it was
   compiled (setup.py passes it; a binary built from another version is stale), the torch it was
   compiled against, and the instruction set the compiler targeted. */
#define FMNIST_STR_(x) #x
#define FMNIST_STR(x) FMNIST_STR_(x)
#ifndef FMNIST_SOURCE_SHA256
#define FMNIST_SOURCE_SHA256 unknown
#endif
#if defined(__AVX512F__)
#define FMNIST_ISA "x86-64 avx512"  // not setup.py's flags: CFLAGS from the environment added it
#elif defined(__AVX2__)
#define FMNIST_ISA "x86-64 avx2"
#elif defined(__x86_64__)
#define FMNIST_ISA "x86-64 baseline"
#elif defined(__aarch64__)
#define FMNIST_ISA "aarch64"
#else
#define FMNIST_ISA "generic"
#endif

/* Importing fmnist._C loads this library, which runs the TORCH_LIBRARY registrations above. */
PyMODINIT_FUNC PyInit__C(void) {
    static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                                 "Registers the fmnist:: operators (fused conv-pool-ReLU) with PyTorch.", -1,
                                 nullptr};
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddStringConstant(m, "SOURCE_SHA256", FMNIST_STR(FMNIST_SOURCE_SHA256)) < 0 ||
              PyModule_AddStringConstant(m, "TORCH_VERSION", TORCH_VERSION) < 0 ||
              PyModule_AddStringConstant(m, "ISA", FMNIST_ISA) < 0)) {
        Py_DECREF(m);
        return nullptr;
    }
    return m;
}
