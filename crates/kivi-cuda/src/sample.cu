// Token sampling on the GPU (launcher: model.rs `CudaBackend::sample_rows`): temperature, top-k
// and top-p over a logits row, with a uniform draw u from the sequence's seeded host sampler.
// One CTA per sampled row. The candidate set is the same as the host sampler's (the softmax at
// T over the top-k logits, cut to the fewest highest-probability tokens whose mass reaches
// top-p; tokens tied at a cut are all kept), found by bisection on the logit's bits instead of
// a sort; the token is then drawn in index order (the host draws in logit order: the same
// distribution, another token for the same u). NaN logits count as -inf. Compiled with NVRTC.

typedef unsigned int u32;
#define INF __int_as_float(0x7f800000)
#define SAMPLE_THREADS 1024

// One row to sample: which logits row, the sampling parameters, the uniform draw in [0, 1).
struct SampleRow {
    int row;
    float temperature;
    int top_k;  // 0: no cut
    float top_p;
    float u;
};

// Unsigned keys that order like the floats (-inf < ... < +inf).
__device__ __forceinline__ u32 order_key(float f) {
    const u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float warp_sum_f(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max_f(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum / max, the same on every thread (a fixed order: deterministic).
__device__ float block_sum(float v) {
    __shared__ float part[SAMPLE_THREADS / 32];
    v = warp_sum_f(v);
    __syncthreads();  // the previous call's readers are done
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = 0.0f;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) t += part[i];
    return t;
}
__device__ float block_max(float v) {
    __shared__ float part[SAMPLE_THREADS / 32];
    v = warp_max_f(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = -INF;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) t = fmaxf(t, part[i]);
    return t;
}

__device__ __forceinline__ float logit_at(const float* l, int i) {
    const float v = l[i];
    return v != v ? -INF : v;
}

// grid: sampled rows; block: SAMPLE_THREADS. out[b] = the token of rows[b].
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_rows(const float* __restrict__ logits, int vocab, const SampleRow* __restrict__ rows,
            u32* __restrict__ out) {
    const SampleRow p = rows[blockIdx.x];
    const float* l = logits + (long long)p.row * vocab;
    const int tid = threadIdx.x, nt = blockDim.x;

    float mx = -INF;
    for (int i = tid; i < vocab; i += nt) mx = fmaxf(mx, logit_at(l, i));
    mx = block_max(mx);
    if (!(mx > -INF)) {  // no finite logit: the first token, as the host's argmax
        if (tid == 0) out[blockIdx.x] = 0;
        return;
    }
    if (p.temperature <= 0.0f || p.top_k == 1) {
        // Greedy: the first index of the maximum.
        int best = 0x7fffffff;
        for (int i = tid; i < vocab; i += nt)
            if (logit_at(l, i) == mx) { best = i; break; }
        const float b = block_max(-(float)best);  // exact: indices < 2^24
        if (tid == 0) out[blockIdx.x] = (u32)(-b);
        return;
    }

    // Top-k: the largest key t with at least k logits >= t (bisection on the key bits).
    u32 kmin = 0u;
    if (p.top_k > 0 && p.top_k < vocab) {
        u32 lo = 0u, hi = order_key(mx) + 1u;  // count(>= lo) = vocab >= k; count(>= hi) = 0
        while (hi - lo > 1u) {
            const u32 mid = lo + (hi - lo) / 2u;
            float c = 0.0f;
            for (int i = tid; i < vocab; i += nt)
                c += order_key(logit_at(l, i)) >= mid ? 1.0f : 0.0f;
            if (block_sum(c) >= (float)p.top_k) lo = mid; else hi = mid;
        }
        kmin = lo;
    }
    const float inv_t = 1.0f / p.temperature;
    float z = 0.0f;
    for (int i = tid; i < vocab; i += nt) {
        const float v = logit_at(l, i);
        if (order_key(v) >= kmin) z += expf((v - mx) * inv_t);
    }
    z = block_sum(z);

    // Top-p: the largest key t >= kmin whose logits >= t carry at least top_p of the mass.
    u32 keep = kmin;
    if (p.top_p < 1.0f) {
        u32 lo = kmin, hi = order_key(mx) + 1u;  // mass(>= lo) = z; mass(>= hi) = 0
        const float need = p.top_p * z;
        while (hi - lo > 1u) {
            const u32 mid = lo + (hi - lo) / 2u;
            float m = 0.0f;
            for (int i = tid; i < vocab; i += nt) {
                const float v = logit_at(l, i);
                if (order_key(v) >= mid) m += expf((v - mx) * inv_t);
            }
            if (block_sum(m) >= need) lo = mid; else hi = mid;
        }
        keep = lo;
    }

    // Draw in index order: thread t owns the contiguous chunk [t c, t c + c); an inclusive scan
    // of the chunks' kept mass gives each chunk its interval [incl(t - 1), incl(t)). The scan's
    // rounding can leave a gap of an ulp between intervals (it sums in a tree), so the draw goes
    // to the last chunk with mass whose interval starts at or before u * total (chunk 0's start
    // is 0: some chunk always qualifies), and a walk that rounding left short takes the chunk's
    // last kept token. (Requiring the interval to hold the target left the output unwritten
    // when the target fell in such a gap after an empty chunk.)
    __shared__ float incl[SAMPLE_THREADS];
    __shared__ float wtot[SAMPLE_THREADS / 32];
    __shared__ int owner;
    const int chunk = (vocab + nt - 1) / nt;
    const int c0 = min(tid * chunk, vocab), c1 = min(c0 + chunk, vocab);
    float s = 0.0f;
    int last_kept = -1;  // the chunk's last token with weight
    for (int i = c0; i < c1; i++) {
        const float v = logit_at(l, i);
        const float w = order_key(v) >= keep ? expf((v - mx) * inv_t) : 0.0f;
        if (w > 0.0f) {
            s += w;
            last_kept = i;
        }
    }
    const int lane = tid & 31, warp = tid >> 5;
    float x = s;
    for (int o = 1; o < 32; o <<= 1) {
        const float y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) wtot[warp] = x;
    if (tid == 0) owner = -1;
    __syncthreads();
    if (warp == 0) {
        float w = lane < (nt >> 5) ? wtot[lane] : 0.0f;
        for (int o = 1; o < 32; o <<= 1) {
            const float y = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += y;
        }
        wtot[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    incl[tid] = x + (warp > 0 ? wtot[warp - 1] : 0.0f);
    __syncthreads();
    const float total = incl[nt - 1];
    const float target = p.u * total;
    const float lo = tid > 0 ? incl[tid - 1] : 0.0f;
    if (s > 0.0f && lo <= target) atomicMax(&owner, tid);
    __syncthreads();
    if (tid == owner) {
        float acc = lo;
        int pick = last_kept;
        for (int i = c0; i < c1; i++) {
            const float v = logit_at(l, i);
            const float w = order_key(v) >= keep ? expf((v - mx) * inv_t) : 0.0f;
            if (w > 0.0f) {
                acc += w;
                if (target < acc) { pick = i; break; }
            }
        }
        out[blockIdx.x] = (u32)pick;
    }
}
