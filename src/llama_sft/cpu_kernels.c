/* Fused elementwise kernels for training on a CPU, loaded by cpu_kernels.py through ctypes.

   PyTorch runs each of these as several passes over memory, each with its own fresh output tensor
   and, for dropout, a boolean mask kept for the backward. Here each is one pass (dropout) or one
   row at a time while the row is in cache (cross-entropy). Plain C, no PyTorch headers: it builds
   in about a second with the system compiler. Tensors are passed as pointers to contiguous data.

   bfloat16 values are handled as the upper 16 bits of a float32 and rounded to nearest even, as
   PyTorch rounds them. */

#include <math.h>
#include <stdint.h>
#include <string.h>

/* ---- random bits: SplitMix64, one 64-bit output per pair of elements ---------------------------

   Element i of a call with seed s takes the low (even i) or high (odd i) 32 bits of
   mix(s + (i / 2) * GAMMA), the SplitMix64 output sequence started at s. The mask of an element
   depends only on (s, i), so the backward rebuilds it instead of keeping it. */

#define GAMMA 0x9e3779b97f4a7c15ULL
#define BLOCK 2048 /* elements per inner block: their random bits stay in L1 */

static inline uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void draw(uint64_t *restrict bits, int64_t first_pair, int64_t pairs, uint64_t seed) {
    for (int64_t j = 0; j < pairs; j++) bits[j] = mix(seed + (uint64_t)(first_pair + j) * GAMMA);
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u) : rounded); /* NaN stays NaN */
}

/* out[i] = x[i] * scale where element i's 32 random bits are >= threshold, else 0. The dropout
   mask and its scaling in one pass; out must not overlap x. */
#define MASKED_SCALE(NAME, T, LOAD, STORE)                                                            \
    void NAME(const T *x, T *out, int64_t n, uint64_t seed, uint32_t threshold, float scale,          \
              int threads) {                                                                          \
        int64_t blocks = (n + BLOCK - 1) / BLOCK;                                                     \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                             \
        for (int64_t b = 0; b < blocks; b++) {                                                        \
            uint64_t bits[BLOCK / 2];                                                                 \
            int64_t start = b * BLOCK, m = n - start < BLOCK ? n - start : BLOCK;                     \
            draw(bits, start / 2, (m + 1) / 2, seed);                                                 \
            const uint32_t *restrict r = (const uint32_t *)bits;                                      \
            const T *restrict src = x + start;                                                        \
            T *restrict dst = out + start;                                                            \
            for (int64_t i = 0; i < m; i++) {                                                         \
                float v = LOAD(src[i]) * (r[i] >= threshold ? scale : 0.0f);                          \
                dst[i] = STORE(v);                                                                    \
            }                                                                                         \
        }                                                                                             \
    }

#define IDENTITY(v) (v)
MASKED_SCALE(masked_scale_f32, float, IDENTITY, IDENTITY)
MASKED_SCALE(masked_scale_bf16, uint16_t, bf16_to_float, float_to_bf16)

/* ---- softmax cross-entropy, row by row ----------------------------------------------------------

   exp for the softmax: 2^k * p(f) with x * log2(e) = k + f, f in [-0.5, 0.5], p the degree-6
   Taylor polynomial of 2^f (relative error under 2e-7); plain arithmetic, so the compiler
   vectorizes the loops. */

static inline float fast_exp(float x) {
    x = x < -87.0f ? -87.0f : x; /* exp(-87) ~ 1.6e-38: smaller terms vanish against the row's max of 1 */
    float t = x * 1.44269504088896341f;
    float k = rintf(t);
    float f = t - k;
    float p = 1.5403530e-4f;
    p = p * f + 1.3333558e-3f;
    p = p * f + 9.6181291e-3f;
    p = p * f + 5.5504109e-2f;
    p = p * f + 2.4022651e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    int32_t e = (int32_t)k + 127;
    uint32_t u = (uint32_t)e << 23;
    float scale;
    memcpy(&scale, &u, 4);
    return p * scale;
}

/* For each row r of logits (rows x vocab, rows row_stride apart) with target t = targets[r]:
   losses[r] = logsumexp(row) - row[t], or 0 when t == ignore_index. With grad (rows x vocab, the
   same strides; it may be logits itself: a row is read whole before it is written), row r of grad
   becomes softmax(row) - one_hot(t), all zeros for an ignored row, in the logits' dtype.
   Returns the first row whose target is outside [0, vocab) and not ignore_index, or -1. */
#define SOFTMAX_XENT(NAME, T, LOAD, STORE)                                                            \
    int64_t NAME(const T *logits, T *grad, const int64_t *targets, int64_t rows, int64_t vocab,       \
                 int64_t row_stride, int64_t ignore_index, float *losses, int threads) {              \
        int64_t bad = -1;                                                                             \
        _Pragma("omp parallel for schedule(dynamic, 4) num_threads(threads)")                         \
        for (int64_t r = 0; r < rows; r++) {                                                          \
            const T *row = logits + r * row_stride;                                                   \
            T *out = grad == 0 ? 0 : grad + r * row_stride;                                           \
            int64_t t = targets[r];                                                                   \
            if (t == ignore_index) {                                                                  \
                losses[r] = 0.0f;                                                                     \
                if (out) memset(out, 0, (size_t)vocab * sizeof(T));                                   \
                continue;                                                                             \
            }                                                                                         \
            if (t < 0 || t >= vocab) {                                                                \
                _Pragma("omp critical") if (bad < 0 || r < bad) bad = r;                             \
                losses[r] = NAN;                                                                      \
                continue;                                                                             \
            }                                                                                         \
            float top = -INFINITY;                                                                    \
            _Pragma("omp simd reduction(max : top)")                                                  \
            for (int64_t v = 0; v < vocab; v++) {                                                     \
                float z = LOAD(row[v]);                                                               \
                top = z > top ? z : top;                                                              \
            }                                                                                         \
            float sum = 0.0f;                                                                         \
            _Pragma("omp simd reduction(+ : sum)")                                                    \
            for (int64_t v = 0; v < vocab; v++) sum += fast_exp(LOAD(row[v]) - top);                  \
            float lse = top + logf(sum);                                                              \
            float target_logit = LOAD(row[t]);                                                        \
            losses[r] = lse - target_logit;                                                           \
            if (!out) continue;                                                                       \
            for (int64_t v = 0; v < vocab; v++) out[v] = STORE(fast_exp(LOAD(row[v]) - lse));         \
            out[t] = STORE(fast_exp(target_logit - lse) - 1.0f);                                      \
        }                                                                                             \
        return bad;                                                                                   \
    }

SOFTMAX_XENT(softmax_xent_f32, float, IDENTITY, IDENTITY)
SOFTMAX_XENT(softmax_xent_bf16, uint16_t, bf16_to_float, float_to_bf16)

/* ---- RMSNorm, row by row ------------------------------------------------------------------------

   Forward, as transformers' LlamaRMSNorm computes it: in float32, r = 1 / sqrt(mean(x^2) + eps),
   the normalised row x * r rounded to the input dtype, times the weight, rounded again. rstd[i]
   keeps row i's r for the backward, which is for a frozen weight: with g = dy * weight rounded to
   the input dtype (as PyTorch's product gives it), dx = r * g - x * r^3 * mean(g * x). */
#define RMS_NORM(FORWARD, BACKWARD, T, LOAD, STORE)                                                   \
    void FORWARD(const T *x, const T *weight, T *y, float *rstd, int64_t rows, int64_t width,        \
                 float eps, int threads) {                                                            \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                             \
        for (int64_t i = 0; i < rows; i++) {                                                          \
            const T *restrict row = x + i * width;                                                    \
            T *restrict out = y + i * width;                                                          \
            float squares = 0.0f;                                                                     \
            _Pragma("omp simd reduction(+ : squares)")                                                \
            for (int64_t j = 0; j < width; j++) {                                                     \
                float v = LOAD(row[j]);                                                               \
                squares += v * v;                                                                     \
            }                                                                                         \
            float r = 1.0f / sqrtf(squares / (float)width + eps);                                     \
            rstd[i] = r;                                                                              \
            for (int64_t j = 0; j < width; j++)                                                       \
                out[j] = STORE(LOAD(weight[j]) * LOAD(STORE(LOAD(row[j]) * r)));                      \
        }                                                                                             \
    }                                                                                                 \
    void BACKWARD(const T *grad, const T *x, const T *weight, const float *rstd, T *dx, int64_t rows, \
                  int64_t width, int threads) {                                                       \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                             \
        for (int64_t i = 0; i < rows; i++) {                                                          \
            const T *restrict dy = grad + i * width;                                                  \
            const T *restrict row = x + i * width;                                                    \
            T *restrict out = dx + i * width;                                                         \
            float r = rstd[i], dot = 0.0f;                                                            \
            _Pragma("omp simd reduction(+ : dot)")                                                    \
            for (int64_t j = 0; j < width; j++)                                                       \
                dot += LOAD(STORE(LOAD(dy[j]) * LOAD(weight[j]))) * LOAD(row[j]);                     \
            float c = dot * r * r * r / (float)width;                                                 \
            for (int64_t j = 0; j < width; j++)                                                       \
                out[j] = STORE(LOAD(STORE(LOAD(dy[j]) * LOAD(weight[j]))) * r - LOAD(row[j]) * c);    \
        }                                                                                             \
    }

RMS_NORM(rms_norm_f32, rms_norm_backward_f32, float, IDENTITY, IDENTITY)
RMS_NORM(rms_norm_bf16, rms_norm_backward_bf16, uint16_t, bf16_to_float, float_to_bf16)

/* ---- SwiGLU: silu(gate) * up --------------------------------------------------------------------

   As transformers' LlamaMLP computes it: silu(gate) = gate * sigmoid(gate) in float32, rounded to
   the input dtype, times up, rounded again. The backward recomputes the sigmoid from gate instead
   of keeping silu(gate): with a = silu(gate) as rounded in the forward, d_up = dy * a and
   d_gate = (dy * up) * s * (1 + gate * (1 - s)), the product dy * up rounded first, as PyTorch's
   product and SiLU backward give them. */
static inline float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

#define SWIGLU(FORWARD, BACKWARD, T, LOAD, STORE)                                                     \
    void FORWARD(const T *gate, const T *up, T *out, int64_t n, int threads) {                        \
        _Pragma("omp parallel for simd schedule(static) num_threads(threads)")                        \
        for (int64_t i = 0; i < n; i++) {                                                             \
            float g = LOAD(gate[i]);                                                                  \
            out[i] = STORE(LOAD(STORE(g * sigmoid(g))) * LOAD(up[i]));                                \
        }                                                                                             \
    }                                                                                                 \
    void BACKWARD(const T *grad, const T *gate, const T *up, T *d_gate, T *d_up, int64_t n,           \
                  int threads) {                                                                      \
        _Pragma("omp parallel for simd schedule(static) num_threads(threads)")                        \
        for (int64_t i = 0; i < n; i++) {                                                             \
            float g = LOAD(gate[i]), dy = LOAD(grad[i]), s = sigmoid(g);                              \
            d_up[i] = STORE(dy * LOAD(STORE(g * s)));                                                 \
            d_gate[i] = STORE(LOAD(STORE(dy * LOAD(up[i]))) * s * (1.0f + g * (1.0f - s)));           \
        }                                                                                             \
    }

SWIGLU(swiglu_f32, swiglu_backward_f32, float, IDENTITY, IDENTITY)
SWIGLU(swiglu_bf16, swiglu_backward_bf16, uint16_t, bf16_to_float, float_to_bf16)
