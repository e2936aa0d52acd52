// Elementwise and row kernels of the Llama forward pass (launchers: model.rs). Activations are
// row-major f32; weights and GEMM inputs are 16-bit ("half": f16, or bf16 when compiled with
// -DHALF_BF16=1; stored as u16). GEMMs are cuBLAS, attention is cache.cu. Compiled with NVRTC at
// run time (no CUDA headers: conversions are inline PTX).

typedef unsigned short u16;
#define INF __int_as_float(0x7f800000)
#ifndef HALF_BF16
#define HALF_BF16 0
#endif

// The 16-bit type <-> f32 (round to nearest even).
__device__ __forceinline__ float h2f(u16 h) {
#if HALF_BF16
    return __uint_as_float((unsigned)h << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
#if HALF_BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
}

#define ROW_THREADS 256

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// out[t] = table[tokens[t]] (16-bit rows to f32). grid: rows; block: ROW_THREADS.
extern "C" __global__ void embed_half(const u16* __restrict__ table,
                                     const unsigned* __restrict__ tokens,
                                     float* __restrict__ out, int hidden) {
    const long long row = blockIdx.x;
    const u16* src = table + (long long)tokens[row] * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) out[row * hidden + c] = h2f(src[c]);
}

// out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, and (out16 != null) its 16-bit copy for the next
// GEMMs; with y != null, first x[t] += y[t] (the residual add, stored back: one launch less).
// grid: rows; block: ROW_THREADS. Rows of a multiple of 4 values go as float4, four loads in
// flight per thread: one CTA per row is latency-bound at small batches (the scalar loop
// measured 13 us per row of 4096 on the H200, ~10 % of a Llama-2-7B batch-1 pass).
extern "C" __global__ void __launch_bounds__(ROW_THREADS)
rmsnorm(float* __restrict__ out, u16* __restrict__ out16, float* __restrict__ x,
        const float* __restrict__ y, const float* __restrict__ w, int h, float eps) {
    __shared__ float partial[ROW_THREADS / 32];
    const long long row = blockIdx.x;
    float* xr = x + row * h;
    const float* yr = y ? y + row * h : nullptr;
    float* o = out + row * h;
    const bool vec = (h & 3) == 0;
    float ss = 0.f;
    if (vec) {
        float4* x4 = (float4*)xr;
#pragma unroll 4
        for (int c = threadIdx.x; c < h / 4; c += blockDim.x) {
            float4 v = x4[c];
            if (yr) {
                const float4 a = ((const float4*)yr)[c];
                v = make_float4(v.x + a.x, v.y + a.y, v.z + a.z, v.w + a.w);
                x4[c] = v;
            }
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    } else {
        for (int c = threadIdx.x; c < h; c += blockDim.x) {
            float v = xr[c];
            if (yr) {
                v += yr[c];
                xr[c] = v;
            }
            ss += v * v;
        }
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = ss;
    __syncthreads();
    float total = 0.f;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) total += partial[i];
    const float inv = 1.0f / sqrtf(total / (float)h + eps);
    if (vec) {
        const float4* x4 = (const float4*)xr;
        const float4* w4 = (const float4*)w;
        float4* o4 = (float4*)o;
#pragma unroll 4
        for (int c = threadIdx.x; c < h / 4; c += blockDim.x) {
            const float4 v = x4[c], g = w4[c];
            const float4 y = make_float4(v.x * inv * g.x, v.y * inv * g.y, v.z * inv * g.z,
                                         v.w * inv * g.w);
            o4[c] = y;
            if (out16) {
                uint2 p;
                p.x = (unsigned)f2h(y.x) | ((unsigned)f2h(y.y) << 16);
                p.y = (unsigned)f2h(y.z) | ((unsigned)f2h(y.w) << 16);
                ((uint2*)(out16 + row * h))[c] = p;
            }
        }
    } else {
        for (int c = threadIdx.x; c < h; c += blockDim.x) {
            const float y = xr[c] * inv * w[c];
            o[c] = y;
            if (out16) out16[row * h + c] = f2h(y);
        }
    }
}

// Small-batch matmul (default for 1-2 rows; `KIVI_CUDA_GEMV=0`: cuBLAS): out[r][n] = sum_k x16[r][k] W[n][k] for R <=
// GEMV_MAX_ROWS rows of the 16-bit input copy (what cuBLAS reads) and the 16-bit W [n_out][cols]
// (cols % 8 == 0), f32 products and sums. x16 is staged in shared memory once per CTA (the
// previous version re-read f32 x from L1 for every row: two loads per weight load); one warp
// per output row streams it in 16-byte chunks, GEMV_UNROLL chunks per lane in flight. Up to
// three matrices reading the same input (q/k/v, gate/up) go in one launch: CTAs
// [0, ceil(n0 / 8)) take W0, the next ceil(n1 / 8) W1, the rest W2 (n1 = n2 = 0: one matrix).
// grid: sum of ceil(n_i / 8); block: 256 (8 warps); dynamic shared memory: R * cols * 2 bytes.
#define GEMV_MAX_ROWS 2
#define GEMV_UNROLL 8
__device__ __forceinline__ float dot8(uint4 a, uint4 b) {
    const unsigned av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        s += h2f((u16)(av[j] & 0xffffu)) * h2f((u16)(bv[j] & 0xffffu));
        s += h2f((u16)(av[j] >> 16)) * h2f((u16)(bv[j] >> 16));
    }
    return s;
}

template <int R>
__device__ __forceinline__ void gemv_rows(const u16* __restrict__ w, const u16* __restrict__ x16,
                                          float* __restrict__ out, int n_out, int cols, int blk) {
    extern __shared__ uint4 xs[];
    const int chunks = cols / 8;  // 16-byte chunks of a row
    const uint4* xg = (const uint4*)x16;
    for (int i = threadIdx.x; i < R * chunks; i += blockDim.x) xs[i] = xg[i];
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int n = blk * 8 + (threadIdx.x >> 5);
    if (n >= n_out) return;
    const uint4* wr = (const uint4*)(w + (long long)n * cols);
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.f;
    for (int c0 = lane; c0 < chunks; c0 += 32 * GEMV_UNROLL) {
        uint4 wv[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            const int c = c0 + 32 * u;
            wv[u] = c < chunks ? wr[c] : uint4{0u, 0u, 0u, 0u};
        }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            const int c = c0 + 32 * u;
            if (c < chunks) {
#pragma unroll
                for (int r = 0; r < R; r++) acc[r] += dot8(wv[u], xs[r * chunks + c]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        const float v = warp_sum(acc[r]);
        if (lane == 0) out[(long long)r * n_out + n] = v;
    }
}

extern "C" __global__ void __launch_bounds__(256)
gemv_small(const u16* w0, const u16* w1, const u16* w2, float* out0, float* out1, float* out2,
           int n0, int n1, int n2, const u16* __restrict__ x16, int rows, int cols) {
    int blk = blockIdx.x;
    const int c0 = (n0 + 7) / 8, c1 = (n1 + 7) / 8;
    const u16* w = w0;
    float* out = out0;
    int n_out = n0;
    if (blk >= c0 + c1) {
        blk -= c0 + c1;
        w = w2;
        out = out2;
        n_out = n2;
    } else if (blk >= c0) {
        blk -= c0;
        w = w1;
        out = out1;
        n_out = n1;
    }
    if (rows == 1) {
        gemv_rows<1>(w, x16, out, n_out, cols, blk);
    } else {
        gemv_rows<2>(w, x16, out, n_out, cols, blk);
    }
}

// Elementwise kernels take four elements per access where their pointers allow it (16-byte f32,
// 8-byte 16-bit), the rest one by one: one 4-byte load per thread and loop step kept too few
// bytes in flight (on the H200 at a Llama-2-7B batch of 1046 rows: to_half 2.7x and swiglu
// 1.4x the time of their bytes at 4.4 TB/s). Launch: elementwise(ceil(n / 4)).
__device__ __forceinline__ bool quads_ok(const void* f32a, const void* f32b, const void* h16) {
    return (((unsigned long long)f32a | (unsigned long long)f32b) & 15) == 0 && ((unsigned long long)h16 & 7) == 0;
}
__device__ __forceinline__ uint2 half4(float a, float b, float c, float d) {
    return make_uint2((unsigned)f2h(a) | (unsigned)f2h(b) << 16, (unsigned)f2h(c) | (unsigned)f2h(d) << 16);
}

// y = (half) x, n elements. GEMM inputs.
extern "C" __global__ void to_half(const float* __restrict__ x, u16* __restrict__ y, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x, first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long n4 = quads_ok(x, x, y) ? n / 4 : 0;
    for (long long i = first; i < n4; i += stride) {
        const float4 v = ((const float4*)x)[i];
        ((uint2*)y)[i] = half4(v.x, v.y, v.z, v.w);
    }
    for (long long i = 4 * n4 + first; i < n; i += stride) y[i] = f2h(x[i]);
}

// x[i] += b[i % width], n elements.
extern "C" __global__ void add_bias(float* __restrict__ x, const float* __restrict__ b, int width,
                                    long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] += b[i % width];
}

// x += y, n elements.
extern "C" __global__ void add_inplace(float* __restrict__ x, const float* __restrict__ y,
                                       long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] += y[i];
}

// gate = silu(gate) * up, n elements, and its 16-bit copy for the next GEMM.
__device__ __forceinline__ float silu_times(float g, float u) { return g / (1.0f + expf(-g)) * u; }
extern "C" __global__ void swiglu(float* __restrict__ gate, u16* __restrict__ gate16,
                                  const float* __restrict__ up, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x, first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long n4 = quads_ok(gate, up, gate16) ? n / 4 : 0;
    for (long long i = first; i < n4; i += stride) {
        const float4 g = ((const float4*)gate)[i], u = ((const float4*)up)[i];
        const float4 y = make_float4(silu_times(g.x, u.x), silu_times(g.y, u.y), silu_times(g.z, u.z),
                                     silu_times(g.w, u.w));
        ((float4*)gate)[i] = y;
        ((uint2*)gate16)[i] = half4(y.x, y.y, y.z, y.w);
    }
    for (long long i = 4 * n4 + first; i < n; i += stride) {
        const float y = silu_times(gate[i], up[i]);
        gate[i] = y;
        gate16[i] = f2h(y);
    }
}

// RoPE on x [rows][heads][d]; row t's position = toks[5t+1] + toks[5t+2] (the cache batch's
// per-token (slot, n_old, i, off, n_new) records). neox: pairs (i, i+d/2), else (2i, 2i+1).
__device__ __forceinline__ void rope_pair(float* head, int i, int half, int neox, float s, float c) {
    const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    const float x0 = head[a], x1 = head[b];
    head[a] = x0 * c - x1 * s;
    head[b] = x0 * s + x1 * c;
}

// CTA (row t, chunk y of ROPE_HEADS heads), ROPE_THREADS threads: the row's d / 2 angles' sine
// and cosine once into shared memory, then the chunk's heads four values per access, every
// thread's accesses independent of each other. d % 8 == 0, d <= 2 * ROPE_MAX_HALF (launcher).
// (Was one CTA of d / 2 threads per token looping over the heads, one pair per access: 20 us per
// call at 1046 rows x 32 heads x 128 on the H200, 2.6x its bytes' time at 4.4 TB/s; now 12.8 us,
// the same with 16 or 32 heads per CTA.)
#define ROPE_THREADS 128
#define ROPE_HEADS 8
#define ROPE_MAX_HALF 128
extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
    rope_heads(float* __restrict__ x, const int* __restrict__ toks, const float* __restrict__ inv_freq,
               int heads, int d, int neox) {
    __shared__ __align__(16) float sn[ROPE_MAX_HALF], cs[ROPE_MAX_HALF];
    const int t = blockIdx.x, half = d / 2;
    const float p = (float)(toks[5 * t + 1] + toks[5 * t + 2]);
    for (int i = threadIdx.x; i < half; i += ROPE_THREADS) sincosf(p * inv_freq[i], &sn[i], &cs[i]);
    __syncthreads();
    const int h0 = blockIdx.y * ROPE_HEADS, nh = min(ROPE_HEADS, heads - h0);
    float* row = x + ((long long)t * heads + h0) * d;
    if (neox) {
        // Unit u: head u / q, values 4k..4k + 3 (k = u % q) and their partners half + 4k..
        const int q = half / 4;
#pragma unroll 2
        for (int u = threadIdx.x; u < nh * q; u += ROPE_THREADS) {
            const int k = 4 * (u % q);
            float4* a = (float4*)(row + (u / q) * d + k);
            float4* b = (float4*)(row + (u / q) * d + half + k);
            const float4 x0 = *a, x1 = *b, s = *(const float4*)(sn + k), c = *(const float4*)(cs + k);
            *a = make_float4(x0.x * c.x - x1.x * s.x, x0.y * c.y - x1.y * s.y, x0.z * c.z - x1.z * s.z,
                             x0.w * c.w - x1.w * s.w);
            *b = make_float4(x0.x * s.x + x1.x * c.x, x0.y * s.y + x1.y * c.y, x0.z * s.z + x1.z * c.z,
                             x0.w * s.w + x1.w * c.w);
        }
    } else {
        // Unit u: head u / q, values 4k..4k + 3 (k = u % q): pairs 2k and 2k + 1.
        const int q = d / 4;
#pragma unroll 2
        for (int u = threadIdx.x; u < nh * q; u += ROPE_THREADS) {
            const int k = u % q;
            float4* a = (float4*)(row + (u / q) * d + 4 * k);
            const float4 v = *a;
            const float2 s = *(const float2*)(sn + 2 * k), c = *(const float2*)(cs + 2 * k);
            *a = make_float4(v.x * c.x - v.y * s.x, v.x * s.x + v.y * c.x, v.z * c.y - v.w * s.y,
                             v.z * s.y + v.w * c.y);
        }
    }
}

// Any even d (head dims that rope_heads does not take): one CTA per (row, head). grid: (rows,
// heads); block: d/2.
extern "C" __global__ void rope_per_head(float* __restrict__ x, const int* __restrict__ toks,
                                         const float* __restrict__ inv_freq, int heads, int d,
                                         int neox) {
    const int t = blockIdx.x, h = blockIdx.y, i = threadIdx.x;
    const int half = d / 2;
    if (i >= half) return;
    const float p = (float)(toks[5 * t + 1] + toks[5 * t + 2]);
    float s, c;
    sincosf(p * inv_freq[i], &s, &c);
    rope_pair(x + ((long long)t * heads + h) * d, i, half, neox, s, c);
}

// out[j] = x[rows[j]] (rows of `width`). grid: picked rows; block: ROW_THREADS.
extern "C" __global__ void gather_rows(const float* __restrict__ x, const int* __restrict__ rows,
                                       float* __restrict__ out, int width) {
    const long long src = (long long)rows[blockIdx.x] * width, dst = (long long)blockIdx.x * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) out[dst + c] = x[src + c];
}

// out[r] = argmax of logits row r (first index of the maximum; NaN never wins).
// grid: rows; block: 1024.
extern "C" __global__ void __launch_bounds__(1024)
argmax_rows(const float* __restrict__ logits, int vocab, unsigned* __restrict__ out) {
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    const float* l = logits + (long long)blockIdx.x * vocab;
    float bv = -INF;
    int bi = 0x7fffffff;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
        const float v = l[c];
        if (v > bv) { bv = v; bi = c; }  // c increases: ties keep the first
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) { best_v[warp] = bv; best_i[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        const int nw = blockDim.x >> 5;
        bv = lane < nw ? best_v[lane] : -INF;
        bi = lane < nw ? best_i[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
        if (lane == 0) out[blockIdx.x] = bi == 0x7fffffff ? 0u : (unsigned)bi;
    }
}

// Deterministic pseudo-random 16-bit weights: center + spread * u, u uniform in [-1, 1) from a hash
// of (seed, index). Random-weights mode on the GPU (no host generation of billions of values).
extern "C" __global__ void fill_random_half(u16* __restrict__ w, long long n, float center,
                                           float spread, unsigned long long seed) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        unsigned long long z = seed + 0x9e3779b97f4a7c15ull * (unsigned long long)(i + 1);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        const float u = (float)(z >> 40) * (2.0f / 16777216.0f) - 1.0f;
        w[i] = f2h(center + spread * u);
    }
}
