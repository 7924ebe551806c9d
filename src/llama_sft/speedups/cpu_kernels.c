/* Fused elementwise kernels for training on a CPU, loaded by cpu_kernels.py through ctypes.

   PyTorch runs each of these as several passes over memory, each with its own fresh output tensor
   and, for dropout, a boolean mask kept for the backward. Here each is one pass (dropout) or one
   row at a time while the row is in cache (cross-entropy). Plain C, no PyTorch headers: it builds
   in about a second with the system compiler. Tensors are passed as pointers to contiguous data.

   bfloat16 values are handled as the upper 16 bits of a float32 and rounded to nearest even, as
   PyTorch rounds them. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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

/* ---- causal attention, record by record, of a packed row ----------------------------------------

   Each (record, key/value head) is one task: its keys and values are converted to float32 once
   (keys also transposed), then the queries of every head that shares them are taken RB rows at a
   time: their scores against the keys up to the block's last row, the causal softmax (row maximum,
   exponentials, sum; the log of the sum kept for the backward) and the product with the values,
   in float32, rounded once into the output. The backward recomputes the probabilities from the
   scores and that log-sum, as flash attention does, so nothing of size (length x length) is kept:
   dS = P * (dO . V^T - rowsum(dO * O)), dQ = scale dS K, dK += scale dS^T Q, dV += P^T dO, the key
   and value gradients summed over the heads of their group in the task's own float32 buffers.

   Why: PyTorch's math and flash kernels run the forward and backward of one short record with a
   dozen ops and new tensors per record, far below the machine's arithmetic rate; this runs the
   whole row in one call (docs/performance.md, The speed-ups: `packed_attention`). */
#define RB 8  /* query rows per block */
/* Floats per vector tile: one register's worth. Wider than the registers, GCC keeps the
   accumulators on the stack, and on AVX2 the kernel fell behind PyTorch's sdpa
   (docs/performance.md, The speed-ups: `cpu_kernels`). */
#ifdef __AVX512F__
#define JT 16
#else
#define JT 8
#endif

static void load_rows(const void *src, int bf16, int64_t first, int64_t row_stride, int rows, int D,
                      float mul, float *restrict dst, int ld) {
    for (int r = 0; r < rows; r++) {
        if (bf16) {
            const uint16_t *s = (const uint16_t *)src + first + r * row_stride;
            for (int d = 0; d < D; d++) dst[r * ld + d] = bf16_to_float(s[d]) * mul;
        } else {
            const float *s = (const float *)src + first + r * row_stride;
            for (int d = 0; d < D; d++) dst[r * ld + d] = s[d] * mul;
        }
    }
}

static void store_rows(void *dst, int bf16, int64_t first, int64_t row_stride, int rows, int D,
                       const float *restrict src, int ld) {
    for (int r = 0; r < rows; r++) {
        if (bf16) {
            uint16_t *t = (uint16_t *)dst + first + r * row_stride;
            for (int d = 0; d < D; d++) t[d] = float_to_bf16(src[r * ld + d]);
        } else {
            float *t = (float *)dst + first + r * row_stride;
            for (int d = 0; d < D; d++) t[d] = src[r * ld + d];
        }
    }
}

/* JT floats in a vector register (where the CPU has no vector unit, GCC splits it). */
typedef float vec_t __attribute__((vector_size(JT * sizeof(float))));

static inline vec_t load_vec(const float *p) {
    vec_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* out[r][c] = sum_{i < k} a[r][i] * b[i][c] for the RB rows of a (rows lda apart) and the columns
   c < n of b (rows ldb apart), n taken up to a multiple of JT (b and out have the room); out's
   rows are ldo apart. The scores (q K^T against the transposed keys) and the products with values
   or keys (P V, dS K) are both this. */
static void block_times(const float *restrict a, int lda, const float *restrict b, int ldb, int k,
                        int n, float *restrict out, int ldo) {
    for (int c0 = 0; c0 < n; c0 += JT) {
        vec_t acc[RB] = {0};
        for (int i = 0; i < k; i++) {
            vec_t row = load_vec(b + (int64_t)i * ldb + c0);
            _Pragma("GCC unroll 16")
            for (int r = 0; r < RB; r++) acc[r] += a[r * lda + i] * row;
        }
        _Pragma("GCC unroll 16")
        for (int r = 0; r < RB; r++) memcpy(out + r * ldo + c0, &acc[r], sizeof acc[r]);
    }
}

/* m[j][d] += sum_r w[r][j] * a[r][d] for j < jn: rank-RB update of m (jn x D), D a multiple of
   JT; each tile of a's RB rows stays in registers while the rows of m go by. */
static void add_outer(const float *restrict w, int ld, const float *restrict a, int D, int jn,
                      float *restrict m) {
    for (int d0 = 0; d0 < D; d0 += JT) {
        vec_t tile[RB];
        _Pragma("GCC unroll 16")
        for (int r = 0; r < RB; r++) tile[r] = load_vec(a + r * D + d0);
        for (int j = 0; j < jn; j++) {
            float *row = m + (int64_t)j * D + d0;
            vec_t acc = load_vec(row);
            _Pragma("GCC unroll 16")
            for (int r = 0; r < RB; r++) acc += w[r * ld + j] * tile[r];
            memcpy(row, &acc, sizeof acc);
        }
    }
}

struct attn_shape {
    int64_t heads, kv_heads, head_dim;
    int64_t q_row, q_head, k_row, k_head, v_row, v_head; /* element strides of the inputs */
    float scale;
};

/* q (n, heads, D) by q_row/q_head strides, k and v (n, kv_heads, D) likewise; out (n, heads, D)
   contiguous; lse (heads, n) float32. Records are [starts[i], starts[i+1]). */
void causal_attention(const void *q, const void *k, const void *v, void *out, float *lse,
                      const int64_t *starts, int64_t records, const struct attn_shape *sh, int bf16,
                      int threads) {
    int64_t n = starts[records], H = sh->heads, G = sh->heads / sh->kv_heads;
    int D = (int)sh->head_dim;
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads)")
    for (int64_t task = 0; task < records * sh->kv_heads; task++) {
        int64_t rec = task / sh->kv_heads, g = task % sh->kv_heads, s0 = starts[rec];
        int L = (int)(starts[rec + 1] - s0), ld = (L + JT - 1) / JT * JT;
        float *kt = calloc((size_t)D * ld, sizeof(float)), *vb = malloc((size_t)L * D * sizeof(float));
        float *tmp = malloc((size_t)L * D * sizeof(float));
        float *qb = calloc((size_t)RB * D, sizeof(float)), *ob = malloc((size_t)RB * D * sizeof(float));
        float *p = malloc((size_t)RB * ld * sizeof(float));
        load_rows(k, bf16, s0 * sh->k_row + g * sh->k_head, sh->k_row, L, D, 1.0f, tmp, D);
        for (int j = 0; j < L; j++)
            for (int d = 0; d < D; d++) kt[(int64_t)d * ld + j] = tmp[j * D + d];
        load_rows(v, bf16, s0 * sh->v_row + g * sh->v_head, sh->v_row, L, D, 1.0f, vb, D);
        for (int64_t h = g * G; h < (g + 1) * G; h++) {
            for (int i0 = 0; i0 < L; i0 += RB) {
                int rb = L - i0 < RB ? L - i0 : RB, jn = i0 + rb;
                memset(qb, 0, (size_t)RB * D * sizeof(float));
                load_rows(q, bf16, (s0 + i0) * sh->q_row + h * sh->q_head, sh->q_row, rb, D, sh->scale, qb, D);
                block_times(qb, D, kt, ld, D, jn, p, ld);
                float inv[RB];
                for (int r = 0; r < RB; r++) {
                    float *row = p + r * ld;
                    int last = i0 + r < L ? i0 + r : -1;
                    float top = -INFINITY, sum = 0.0f;
                    _Pragma("omp simd reduction(max : top)")
                    for (int j = 0; j <= last; j++) top = row[j] > top ? row[j] : top;
                    _Pragma("omp simd reduction(+ : sum)")
                    for (int j = 0; j < jn; j++) {
                        float e = j <= last ? fast_exp(row[j] - top) : 0.0f;
                        row[j] = e;
                        sum += e;
                    }
                    inv[r] = last >= 0 ? 1.0f / sum : 0.0f;
                    if (last >= 0) lse[h * n + s0 + i0 + r] = top + logf(sum);
                }
                block_times(p, ld, vb, D, jn, D, ob, D);
                for (int r = 0; r < rb; r++)
                    for (int d = 0; d < D; d++) ob[r * D + d] *= inv[r];
                store_rows(out, bf16, (s0 + i0) * H * D + h * D, H * D, rb, D, ob, D);
            }
        }
        free(kt), free(vb), free(tmp), free(qb), free(ob), free(p);
    }
}

/* Gradients of causal_attention: dq (n, heads, D), dk and dv (n, kv_heads, D), all contiguous,
   from grad (n, heads, D) contiguous, the inputs, out and lse. */
void causal_attention_backward(const void *grad, const void *q, const void *k, const void *v,
                               const void *out, const float *lse, void *dq, void *dk, void *dv,
                               const int64_t *starts, int64_t records, const struct attn_shape *sh,
                               int bf16, int threads) {
    int64_t n = starts[records], H = sh->heads, KV = sh->kv_heads, G = H / KV;
    int D = (int)sh->head_dim;
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads)")
    for (int64_t task = 0; task < records * KV; task++) {
        int64_t rec = task / KV, g = task % KV, s0 = starts[rec];
        int L = (int)(starts[rec + 1] - s0), ld = (L + JT - 1) / JT * JT;
        float *kt = calloc((size_t)D * ld, sizeof(float)), *vt = calloc((size_t)D * ld, sizeof(float));
        float *kb = malloc((size_t)L * D * sizeof(float)), *vb = malloc((size_t)L * D * sizeof(float));
        float *dkb = calloc((size_t)L * D, sizeof(float)), *dvb = calloc((size_t)L * D, sizeof(float));
        float *qb = calloc((size_t)RB * D, sizeof(float)), *gb = calloc((size_t)RB * D, sizeof(float));
        float *ob = calloc((size_t)RB * D, sizeof(float)), *dqb = malloc((size_t)RB * D * sizeof(float));
        float *p = malloc((size_t)RB * ld * sizeof(float)), *ds = malloc((size_t)RB * ld * sizeof(float));
        load_rows(k, bf16, s0 * sh->k_row + g * sh->k_head, sh->k_row, L, D, 1.0f, kb, D);
        load_rows(v, bf16, s0 * sh->v_row + g * sh->v_head, sh->v_row, L, D, 1.0f, vb, D);
        for (int j = 0; j < L; j++)
            for (int d = 0; d < D; d++) {
                kt[(int64_t)d * ld + j] = kb[j * D + d];
                vt[(int64_t)d * ld + j] = vb[j * D + d];
            }
        for (int64_t h = g * G; h < (g + 1) * G; h++) {
            for (int i0 = 0; i0 < L; i0 += RB) {
                int rb = L - i0 < RB ? L - i0 : RB, jn = i0 + rb;
                int64_t row0 = (s0 + i0) * H * D + h * D;
                memset(qb, 0, (size_t)RB * D * sizeof(float));
                memset(gb, 0, (size_t)RB * D * sizeof(float));
                memset(ob, 0, (size_t)RB * D * sizeof(float));
                load_rows(q, bf16, (s0 + i0) * sh->q_row + h * sh->q_head, sh->q_row, rb, D, sh->scale, qb, D);
                load_rows(grad, bf16, row0, H * D, rb, D, 1.0f, gb, D);
                load_rows(out, bf16, row0, H * D, rb, D, 1.0f, ob, D);
                block_times(qb, D, kt, ld, D, jn, p, ld);  /* scores */
                block_times(gb, D, vt, ld, D, jn, ds, ld); /* d(probabilities) */
                for (int r = 0; r < RB; r++) {
                    int last = i0 + r < L ? i0 + r : -1;
                    float top = last >= 0 ? lse[h * n + s0 + i0 + r] : 0.0f, dot = 0.0f;
                    _Pragma("omp simd reduction(+ : dot)")
                    for (int d = 0; d < D; d++) dot += gb[r * D + d] * ob[r * D + d];
                    float *pr = p + r * ld, *dr = ds + r * ld;
                    for (int j = 0; j < jn; j++) {
                        float e = j <= last ? fast_exp(pr[j] - top) : 0.0f;
                        pr[j] = e;
                        dr[j] = e * (dr[j] - dot);
                    }
                }
                block_times(ds, ld, kb, D, jn, D, dqb, D);
                for (int r = 0; r < rb; r++)
                    for (int d = 0; d < D; d++) dqb[r * D + d] *= sh->scale;
                store_rows(dq, bf16, row0, H * D, rb, D, dqb, D);
                add_outer(ds, ld, qb, D, jn, dkb); /* qb holds scale * q */
                add_outer(p, ld, gb, D, jn, dvb);
            }
        }
        store_rows(dk, bf16, s0 * KV * D + g * D, KV * D, L, D, dkb, D);
        store_rows(dv, bf16, s0 * KV * D + g * D, KV * D, L, D, dvb, D);
        free(kt), free(vt), free(kb), free(vb), free(dkb), free(dvb);
        free(qb), free(gb), free(ob), free(dqb), free(p), free(ds);
    }
}

/* ---- rotary position embedding ------------------------------------------------------------------

   transformers' apply_rotary_pos_emb for one tensor: out = x * cos + rotate_half(x) * sin, where
   rotate_half(x) = (-x2, x1) for the two halves of each head's row, each product and the sum
   rounded to x's dtype as PyTorch's ops round them. With backward set, x is the output's gradient
   g and out the input's: g * cos + (g2 * sin2, -(g1 * sin1)), rounded the same way. x is
   (n, heads, D) in any token and head strides with contiguous rows; cos and sin (n, D) contiguous;
   out (n, heads, D) contiguous.

   Why: PyTorch runs it as two products, a negation, a concatenation and a sum per tensor forward,
   and zero-filled slices and sums backward, each a new tensor: a noticeable share of a training
   step (docs/performance.md, The speed-ups: `rotary_kernel`). */
#define ROPE(NAME, T, LOAD, STORE)                                                                    \
    void NAME(const T *x, int64_t x_row, int64_t x_head, const T *cos, const T *sin, T *out,         \
              int64_t n, int64_t heads, int64_t D, int backward, int threads) {                       \
        int64_t half = D / 2;                                                                         \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                             \
        for (int64_t t = 0; t < n; t++) {                                                             \
            const T *restrict c = cos + t * D, *restrict s = sin + t * D;                             \
            for (int64_t h = 0; h < heads; h++) {                                                     \
                const T *restrict row = x + t * x_row + h * x_head;                                   \
                T *restrict o = out + (t * heads + h) * D;                                            \
                /* sign -1 forward (rotate_half), +1 backward (its transpose); the sine index */ \
                float sign = backward ? 1.0f : -1.0f;                                                 \
                int64_t first = backward ? half : 0, second = backward ? 0 : half;                   \
                _Pragma("omp simd")                                                                   \
                for (int64_t d = 0; d < half; d++) {                                                  \
                    float x1 = LOAD(row[d]), x2 = LOAD(row[d + half]);                                \
                    o[d] = STORE(LOAD(STORE(x1 * LOAD(c[d]))) + sign * LOAD(STORE(x2 * LOAD(s[d + first])))); \
                    o[d + half] =                                                                     \
                        STORE(LOAD(STORE(x2 * LOAD(c[d + half]))) - sign * LOAD(STORE(x1 * LOAD(s[d + second])))); \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
    }

ROPE(rotary_f32, float, IDENTITY, IDENTITY)
ROPE(rotary_bf16, uint16_t, bf16_to_float, float_to_bf16)
