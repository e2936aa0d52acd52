// KIVI / f16 KV-cache kernels: quantize-and-pack on append, flash-decoding attention over
// [quantized | f16 window | new tokens], and the split reduction. Compiled with NVRTC at run time
// (no CUDA headers: f16 conversions are inline PTX).
//
// Paged layout (vLLM style). A pool of blocks of BLOCK_TOKENS token positions; one block id
// indexes the same place in every layer's arenas. Sequence ("slot") position p lives in block
// table[slot][p / BLOCK_TOKENS] at position p % BLOCK_TOKENS. Per layer (arenas head-major, so
// that a head's consecutive blocks are contiguous; strides in CacheBufs):
//   keys, quantized per channel: codes  [Hkv][block][BT * D * bits / 32] u32, interleaved (see
//                                        key_word)
//                                scale, min [Hkv][block][BT/G][D] f16
//                                window [slot][Hkv][W][D] f16, token p at slot p % W (W = R, or G
//                                        for the R = 0 staging of the partial group)
//   values, quantized per token: codes  [Hkv][block][BT * D * bits / 32] u32, interleaved (see
//                                        value_word), scale, min [Hkv][block][BT][D/G]
//                                window [slot][Hkv][R][D] f16, token p at slot p % R
//   f16 cache: keys and values [Hkv][block][BT][D] f16 (in the "window" buffers, paged).
// The windows are per slot, outside the pool. BT is a multiple of every supported G (G divides
// D <= 128 and is a multiple of 32), so a key group never straddles two blocks.
// Sequence positions: keys [0, nqk) quantized, [nqk, n) window; values [0, nqv) quantized,
// [nqv, n) window; with R > 0: nqk = n - n % R, nqv = max(n - R, 0); R = 0: nqk = nqv = n.
// Offsets are 64-bit.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

// Token positions per pool block (BLOCK_TOKENS in cache.rs) and the longest attention split
// (MAX_SPLIT in cache.rs; a multiple of BLOCK_TOKENS).
#define BLOCK_TOKENS 128
#define MAX_SPLIT 2048
#define NEG_INF (-__int_as_float(0x7f800000))

// The inline-PTX helpers are defined by the host emulator instead when it compiles this file
// (KIVI_EMU, crates/kivi-cuda/emu).
#ifndef KIVI_EMU
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
// 2^x by MUFU.EX2 alone, where exp2f adds a denormal range check (three more instructions per
// weight of the softmax); results below 2^-126 flush to zero.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#endif
__device__ __forceinline__ double h2d(u16 h) { return (double)h2f(h); }

// ---------------------------------------------------------------------------------------------
// Quantization parameters, bit-exact with kivi_core::quant::group_params.

__device__ __forceinline__ u16 h_next_up(u16 b) {
    if (b == 0x8000 || b == 0) return 0x0001;
    return (b & 0x8000) == 0 ? (u16)(b + 1) : (u16)(b - 1);
}
__device__ __forceinline__ u16 h_next_down(u16 b) {
    if (b == 0 || b == 0x8000) return 0x8001;
    return (b & 0x8000) == 0 ? (u16)(b - 1) : (u16)(b + 1);
}
// Largest f16 <= v.
__device__ u16 h_round_down(double v) {
    u16 h = f2h((float)v);
    while (h2d(h) > v) h = h_next_down(h);
    while (true) {
        u16 u = h_next_up(h);
        if ((u & 0x7c00) == 0x7c00 || h2d(u) > v) break;
        h = u;
    }
    return h;
}
// Smallest f16 >= v.
__device__ u16 h_round_up(double v) {
    u16 h = f2h((float)v);
    while (h2d(h) < v) h = h_next_up(h);
    while (true) {
        u16 d = h_next_down(h);
        if ((d & 0x7c00) == 0x7c00 || h2d(d) < v) break;
        h = d;
    }
    return h;
}

struct GroupParams {
    u16 scale, min;
};

__device__ __forceinline__ GroupParams group_params(float mn, float mx, int bits) {
    GroupParams p;
    p.min = h_round_down((double)mn);
    double range = (double)mx - h2d(p.min);
    p.scale = range == 0.0 ? (u16)0 : h_round_up(range / (double)((1 << bits) - 1));
    return p;
}

__device__ __forceinline__ u32 quantize_value(float x, GroupParams p, int bits) {
    float s = h2f(p.scale);
    if (s == 0.0f) return 0;
    float c = rintf(__fdiv_rn(x - h2f(p.min), s));
    c = fminf(fmaxf(c, 0.0f), (float)((1 << bits) - 1));
    return (u32)c;
}

// A new token enters the cache rounded to f16.
__device__ __forceinline__ float f16_round(float x) { return h2f(f2h(x)); }

struct CacheBufs {
    u32* kq;
    u16* ks;
    u16* km;
    u16* kwin;
    u32* vq;
    u16* vs;
    u16* vm;
    u16* vwin;
    const int* table;  // [slot][table_stride] block ids
    u64 table_stride;
    // Element strides (64-bit) per block and per KV head of the paged arenas.
    u64 kq_block, kq_head, ksm_block, ksm_head, vq_block, vq_head, vsm_block, vsm_head;
    // Windows: strides per unit (KIVI: slot; f16 cache: block, the rows are paged) and KV head.
    u64 kwin_unit, kwin_head, vwin_unit, vwin_head;
    int n_kv, head_dim, group, resid, k_bits, v_bits;
    // Key window modulus: R, or G for the R = 0 staging (unused by the f16 cache).
    int kwin_mod;
    int is_f16;
    // KIVI sink tokens: a sequence's first `sinks` positions, kept in f16 ([slot][Hkv][S][D]).
    // Every other kernel sees only the stream after them (positions counted from the first
    // token after the sinks; the host gives them stream-relative records).
    u16* ksink;
    u16* vsink;
    u64 sink_unit, sink_head;
    int sinks;
};

// Block holding position p of a slot.
__device__ __forceinline__ u64 block_of(const CacheBufs& c, int slot, int p) {
    return (u64)c.table[(u64)slot * c.table_stride + p / BLOCK_TOKENS];
}

// Codes are interleaved, so that every m-tile of the tensor-core paths (16 tokens of a key
// block, 16 channels of a value block) lies in one 32-wide quarter, the span of a key scale
// group (G = 32) or of a value one: one B operand per quarter then serves all the m-tile's
// rows, with the scales folded in (tc_key_block_heads). Per pool block and KV head, 2-bit codes
// in 16-byte groups of four words:
//   keys   [D / 4 channel quads][8 slots][4 quarters] u32: word k of (quad, slot s) holds in
//          byte e channel 4 quad + e's tokens 32 k + s + 8 i (i < 4) at bits 2 i;
//   values [BT / 4 token quads][8 slots][D / 32 quarters] u32: word k of (quad, slot s) holds
//          in byte e token 4 quad + e's channels 32 k + s + 8 i (i < 4) at bits 2 i.
// A byte holds rows g (i = 0) and g + 8 (i = 1) of m-tile 2k and the same of m-tile 2k + 1
// (i = 2, 3) for the lane of slot g, and the four bytes of a word are four consecutive k
// indices of the MMA: one mask (code_bits) makes a word an A register of the integer tensor
// cores, and a lane's four words are one 16-byte load.
// Those 16-byte groups are stored chunk-major in units of four rows (quads): group c of row r
// at words (r & ~3) W + 16 c + 4 (r & 3), W the row's words (keys 32, values D / 4), so that
// the eight lanes of a quarter warp, lanes (g, t) of slots g = 2q, 2q + 1 and rows t of a unit,
// load one contiguous 128 bytes: one L1 wavefront where row-major rows took four (Nsight
// Compute, GQA KIVI-2 B = 32 T = 32K: 44.3 M -> 32.4 M wavefronts; docs/benchmarks.md "CUDA
// decode attention (H200)" -> "Session 31").
// 4-bit codes are two planes of that geometry, 8 D words each: plane hm holds the half hm of
// every quarter (i = 2 hm + r at bits 4 r of the byte: tokens, or channels, 32 k + 16 hm + s +
// 8 r), so that every 2-bit load at word w is a 4-bit load at w and w + 8 D, and a nibble mask
// makes an A register of rows g (r = 0) or g + 8 (r = 1) of m-tile 2k + hm.
// Word `w` of row `r` (rows of W words, grouped as above).
template <int W>
__device__ __forceinline__ u64 code_word(int r, int w) {
    return (u64)(r >> 2) * (4 * W) + (w >> 2) * 16 + (r & 3) * 4 + (w & 3);
}
// A lane's 16-byte group (g, t) in a unit: row t, group c (keys and D = 128 values: slot g; D = 64
// values: slots 2c, 2c + 1), plus PAD words after every W (a staged copy's padding).
template <int W, int PAD = 0>
__device__ __forceinline__ constexpr int group_word(int c, int t) {
    return 16 * c + 4 * t + PAD * ((16 * c + 4 * t) / W);
}
template <int BITS>
__device__ __forceinline__ u64 key_word(int D, int d, int b) {
    return (BITS == 4 ? (u64)((b >> 4) & 1) * 8 * D : 0) + code_word<32>(d >> 2, (b & 7) * 4 + ((b >> 5) & 3));
}
template <int BITS>
__device__ __forceinline__ int key_shift(int d, int b) {
    return 8 * (d & 3) + (BITS == 2 ? 2 * ((b >> 3) & 3) : 4 * ((b >> 3) & 1));
}
template <int BITS>
__device__ __forceinline__ u64 value_word(int D, int b, int ch) {
    const u64 plane = BITS == 4 ? (u64)((ch >> 4) & 1) * 8 * D : 0;
    const int w = (ch & 7) * (D / 32) + (ch >> 5);
    return plane + (D == 128 ? code_word<32>(b >> 2, w) : code_word<16>(b >> 2, w));
}
template <int BITS>
__device__ __forceinline__ int value_shift(int b, int ch) {
    return 8 * (b & 3) + (BITS == 2 ? 2 * ((ch >> 3) & 3) : 4 * ((ch >> 3) & 1));
}
// The channel of code j (bits BITS j) of a token's row word w (< D / 16) in plane hm: the
// token's byte of each of its quad's words 4 w .. 4 w + 3 of the plane, so byte x is in-quad
// word 4 w + x = slot s (D / 32) + quarter k, and code j channel 32 k + s + 8 i (2-bit, i = j % 4)
// or 32 k + 16 hm + s + 8 r (4-bit, r = j % 2).
template <int D, int BITS>
__device__ __forceinline__ constexpr int value_channel(int hm, int w, int j) {
    return 32 * ((4 * w + j / (8 / BITS)) % (D / 32)) + (4 * w + j / (8 / BITS)) / (D / 32) +
           (BITS == 2 ? 8 * (j % 4) : 16 * hm + 8 * (j % 2));
}
// Byte `k` of the word at `w` (little-endian), written alone: other threads write its other
// bytes (other key groups of the block, other value groups of the token).
__device__ __forceinline__ void store_byte(u32* w, int k, u32 v) { ((unsigned char*)w)[k] = (unsigned char)v; }

// Batch item: slot, n_old, n_new, offset of its first token in the packed token arrays.
struct Item {
    int slot, n_old, n_new, tok_off;
};

// Query / new token i of an item (packed token index tok_off + i): attends positions
// [0, n_old + i]; the item brings n_new tokens.
struct Tok {
    int slot, n_old, i, tok_off, n_new;
};

__device__ __forceinline__ int key_quant_end(const CacheBufs& c, int n) {
    return c.resid > 0 ? n - n % c.resid : n;
}
__device__ __forceinline__ int val_quant_end(const CacheBufs& c, int n) {
    return c.resid > 0 ? max(n - c.resid, 0) : n;
}

// (item, key group) and (item, position) records of the groups / value tokens an append
// quantizes: flat lists built by the host, so a step mixing one long prompt with many decode
// tokens launches one CTA per real unit of work (not the longest item's count per item).
struct Rec {
    int item, at;
};

#ifndef ATTN_D  // the append kernels: not in the per-variant attention modules
// Position (within a 32-position chunk) of value k of thread j of a channel's four: the
// positions of slots 2j and 2j + 1 (key_word: slot = position % 8), i = k / 2 (position
// slot + 8 i: 2-bit, bits 2 i of the slot's byte; 4-bit, plane i / 2, bits 4 (i % 2)).
__device__ __forceinline__ int key_tok(int j, int k) {
    return 2 * j + (k & 1) + 8 * (k >> 1);
}
// Raw bits of thread j's 8 positions of the chunk from p0, 0 from the n-th on: f16 window rows
// (low 16 bits) or f32 new tokens. Every load is issued before any value is used.
__device__ __forceinline__ void key_raw8(const CacheBufs& c, const Item& it, const float* knew, u64 kwin, int h, int d,
                                         int j, int p0, int n, u32 (&raw)[8]) {
    const int D = c.head_dim, mod = c.kwin_mod;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        const int tl = key_tok(j, k), p = p0 + tl;
        if (tl >= n)
            raw[k] = 0u;
        else if (p < it.n_old)
            raw[k] = c.kwin[kwin + (u64)(p % mod) * D + d];
        else
            raw[k] = __float_as_uint(knew[((u64)(it.tok_off + p - it.n_old) * c.n_kv + h) * D + d]);
    }
}
// Position p's value from its raw bits (a new token rounded to f16, as the window stores it).
__device__ __forceinline__ float key_value(const Item& it, int p, u32 raw) {
    return p < it.n_old ? h2f((u16)raw) : f16_round(__uint_as_float(raw));
}
// Four threads per (key group record, KV head, channel): (re)quantizes a key group that this
// append completes (R > 0: whole R-chunks; R = 0: every group touched, the partial last one
// with its current statistics). grid = (records, Hkv), block = 4 D; thread 4 d + j holds 8 of
// each 32 positions of channel d (key_tok: whole output bytes of the interleaved layout), the
// group's min and max by two shuffles. One thread per channel (32
// positions in sequence) took 26.7-28.0 us for 32 groups x 32 heads on the H200, this takes
// 24.7-26.1 (docs/benchmarks.md "CUDA end-to-end (H200)" -> "Session 28": a smaller gain than
// the value quantization's, whose one warp per CTA had nothing to hide its chain behind).
// Indices are static so that raw stays in registers.
template <int BITS>
__device__ __forceinline__ void quantize_key_group(const CacheBufs& c, const Item& it, const float* knew, int h,
                                                   int d, int j, int g) {
    const int D = c.head_dim, G = c.group;
    const int q1 = key_quant_end(c, it.n_old + it.n_new);
    const int p0 = g * G, cnt = min(G, q1 - p0);
    const u64 kwin = (u64)it.slot * c.kwin_unit + (u64)h * c.kwin_head;
    u32 raw[8];
    float mn = __int_as_float(0x7f800000), mx = -mn;
    for (int t0 = 0; t0 < cnt; t0 += 32) {
        key_raw8(c, it, knew, kwin, h, d, j, p0 + t0, cnt - t0, raw);
#pragma unroll
        for (int k = 0; k < 8; k++)
            if (t0 + key_tok(j, k) < cnt) {
                const float x = key_value(it, p0 + t0 + key_tok(j, k), raw[k]);
                mn = fminf(mn, x);
                mx = fmaxf(mx, x);
            }
    }
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
        mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    }
    const GroupParams gp = group_params(mn, mx, BITS);
    const u64 blk = block_of(c, it.slot, p0);
    const int b0 = p0 % BLOCK_TOKENS;
    const u64 kq = blk * c.kq_block + (u64)h * c.kq_head;
    for (int t0 = 0; t0 < G; t0 += 32) {
        if (G > 32) key_raw8(c, it, knew, kwin, h, d, j, p0 + t0, cnt - t0, raw);  // (G = 32: raw holds the group)
        u32 code[8];
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const int tl = t0 + key_tok(j, k);
            code[k] = tl < cnt ? quantize_value(key_value(it, p0 + tl, raw[k]), gp, BITS) : 0u;
        }
        // Slots 2j and 2j + 1 of quarter k of the block: positions slot + 8 i at bits 2 i
        // (4-bit: of plane i / 2, at bits 4 (i % 2)).
        const int k = (b0 + t0) / 32;
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int b = 32 * k + 2 * j + e;
            if (BITS == 2) {
                const u32 byte = code[e] | code[2 + e] << 2 | code[4 + e] << 4 | code[6 + e] << 6;
                store_byte(c.kq + kq + key_word<2>(D, d, b), key_shift<2>(d, b) / 8, byte);
            } else {
#pragma unroll
                for (int hm = 0; hm < 2; hm++)
                    store_byte(c.kq + kq + key_word<4>(D, d, b + 16 * hm), key_shift<4>(d, b) / 8,
                               code[4 * hm + e] | code[4 * hm + 2 + e] << 4);
            }
        }
    }
    if (j == 0) {
        const u64 m = blk * c.ksm_block + (u64)h * c.ksm_head + (u64)(b0 / G) * D + d;
        c.ks[m] = gp.scale;
        c.km[m] = gp.min;
    }
}
extern "C" __global__ void kivi_quantize_keys(CacheBufs c, const Item* items, const Rec* groups,
                                              const float* knew) {
    const Rec r = groups[blockIdx.x];
    const Item it = items[r.item];
    const int d = threadIdx.x / 4, j = threadIdx.x % 4;
    if (d >= c.head_dim) return;  // (block = 4 D: whole warps, as the shuffles need)
    if (c.k_bits == 2)
        quantize_key_group<2>(c, it, knew, blockIdx.y, d, j, r.at);
    else
        quantize_key_group<4>(c, it, knew, blockIdx.y, d, j, r.at);
}

// Quantizes every value group of position p of the sequence in `slot` (n0 stored positions; new
// tokens packed from tok_off), from the window when p < n0 (f16), else from vnew (rounded to f16
// as the window stores it), with the whole CTA (blockDim.x a multiple of 32): four threads per
// 32 channels, 8 values each, the group's min and max by warp shuffles. With one thread per
// group a decode step's CTA ran a serial chain of ~3400 instructions in one warp: 9.1 us per
// Mistral-7B layer at B = 1, now 5.4 (Nsight Compute, docs/benchmarks.md "CUDA end-to-end
// (H200)" -> "Session 28"). Thread j of a 32-channel chunk owns whole output bytes: slots 2j and
// 2j+1 (channels 2j + {0,1} + 8k, value_word's interleaved layout; 4-bit: of both planes).
__device__ __forceinline__ void quantize_value_token(const CacheBufs& c, int slot, int n0, int tok_off, int p,
                                                     const float* vnew) {
    const int D = c.head_dim, G = c.group, gpt = D / G, bits = c.v_bits;
    const int total = c.n_kv * D / 8;  // threads: 4 per 32 channels
    const int lanes = G / 8;           // threads per group (4, 8 or 16: a group never spans warps)
    const bool old = p < n0;
    const u64 blk = block_of(c, slot, p);
    const int b = p % BLOCK_TOKENS;
    for (int base = threadIdx.x & ~31; base < total; base += blockDim.x) {
        const int t = base + (threadIdx.x & 31);
        const bool live = t < total;
        const int chunk = t / 4, j = t % 4, h = chunk / (D / 32), ch0 = (chunk % (D / 32)) * 32;
        // Value pair k: channels ch0 + off(k) and the next one.
        float v[8];
        float mn = __int_as_float(0x7f800000), mx = -mn;
        if (live) {
            const u64 vwin = (u64)slot * c.vwin_unit + (u64)h * c.vwin_head +
                             (u64)(c.resid > 0 ? p % c.resid : 0) * D;
            const float* src = vnew + ((u64)(tok_off + p - n0) * c.n_kv + h) * D;
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const int ch = ch0 + 2 * j + 8 * k;
                if (old) {
                    const u32 w = *(const u32*)(c.vwin + vwin + ch);
                    v[2 * k] = h2f((u16)w);
                    v[2 * k + 1] = h2f((u16)(w >> 16));
                } else {
                    const float2 x = *(const float2*)(src + ch);
                    v[2 * k] = f16_round(x.x);
                    v[2 * k + 1] = f16_round(x.y);
                }
            }
#pragma unroll
            for (int e = 0; e < 8; e++) {
                mn = fminf(mn, v[e]);
                mx = fmaxf(mx, v[e]);
            }
        }
        for (int o = 1; o < lanes; o <<= 1) {
            mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        }
        if (!live) continue;
        const GroupParams gp = group_params(mn, mx, bits);
        const u64 vq = blk * c.vq_block + (u64)h * c.vq_head;
        const int sl = ch0 + 2 * j;
        if (bits == 2) {
            u32 lo = 0u, hi = 0u;  // slots 2j and 2j + 1
#pragma unroll
            for (int k = 0; k < 4; k++) {
                lo |= quantize_value(v[2 * k], gp, 2) << (2 * k);
                hi |= quantize_value(v[2 * k + 1], gp, 2) << (2 * k);
            }
            store_byte(c.vq + vq + value_word<2>(D, b, sl), value_shift<2>(b, sl) / 8, lo);
            store_byte(c.vq + vq + value_word<2>(D, b, sl + 1), value_shift<2>(b, sl + 1) / 8, hi);
        } else {
            // Value pair k = 2 hm + r: bits 4 r of plane hm's bytes of slots 2j, 2j + 1.
#pragma unroll
            for (int hm = 0; hm < 2; hm++) {
                const u32 lo = quantize_value(v[4 * hm], gp, 4) | quantize_value(v[4 * hm + 2], gp, 4) << 4;
                const u32 hi = quantize_value(v[4 * hm + 1], gp, 4) | quantize_value(v[4 * hm + 3], gp, 4) << 4;
                store_byte(c.vq + vq + value_word<4>(D, b, sl + 16 * hm), value_shift<4>(b, sl) / 8, lo);
                store_byte(c.vq + vq + value_word<4>(D, b, sl + 16 * hm + 1), value_shift<4>(b, sl + 1) / 8, hi);
            }
        }
        if (t % lanes == 0) {
            const u64 m = blk * c.vsm_block + (u64)h * c.vsm_head + (u64)b * gpt + ch0 / G;
            c.vs[m] = gp.scale;
            c.vm[m] = gp.min;
        }
    }
}

// Quantizes the values of one position per CTA (quantize_value_token, the decode step's writer
// too). grid = value token records, block = 128.
extern "C" __global__ void kivi_quantize_values(CacheBufs c, const Item* items, const Rec* toks,
                                                const float* vnew) {
    const Rec r = toks[blockIdx.x];
    const Item it = items[r.item];
    quantize_value_token(c, it.slot, it.n_old, it.tok_off, r.at, vnew);
}

// Writes new tokens that are sink positions into the sink rows. rec = (packed token, slot,
// position). grid = (records, Hkv), block = D.
extern "C" __global__ void kivi_write_sinks(CacheBufs c, const int* recs, const float* knew,
                                            const float* vnew) {
    const int* r = recs + 3 * blockIdx.x;
    const int h = blockIdx.y, d = threadIdx.x, D = c.head_dim;
    if (d >= D) return;
    const u64 src = ((u64)r[0] * c.n_kv + h) * D + d;
    const u64 dst = (u64)r[1] * c.sink_unit + (u64)h * c.sink_head + (u64)r[2] * D + d;
    c.ksink[dst] = f2h(knew[src]);
    c.vsink[dst] = f2h(vnew[src]);
}

// Writes packed token `packed` (record tk) into the windows if it stays in full precision; the
// CTA's threads take 4 channels of a KV head at a time.
__device__ __forceinline__ void write_window_token(const CacheBufs& c, const Tok& tk, int packed, const float* knew,
                                                   const float* vnew) {
    const int D = c.head_dim;
    const int n0 = tk.n_old, n1 = n0 + tk.n_new, p = n0 + tk.i;
    bool kw = true, vw = true;  // the f16 cache stores every row
    if (!c.is_f16) {
        if (c.resid > 0) {
            kw = p >= key_quant_end(c, n1);
            vw = p >= val_quant_end(c, n1);
        } else {
            kw = p >= n1 - n1 % c.group;  // staging of the partial key group
            vw = false;                   // no value window
        }
    }
    if (!kw && !vw) return;
    for (int e = 4 * threadIdx.x; e < c.n_kv * D; e += 4 * blockDim.x) {
        const int h = e / D, d = e % D;
        const u64 src = (u64)packed * c.n_kv * D + e;
        u64 krow, vrow;
        if (c.is_f16) {
            krow = vrow = block_of(c, tk.slot, p) * c.kwin_unit + (u64)h * c.kwin_head + (u64)(p % BLOCK_TOKENS) * D + d;
        } else {
            krow = (u64)tk.slot * c.kwin_unit + (u64)h * c.kwin_head + (u64)(p % c.kwin_mod) * D + d;
            vrow = (u64)tk.slot * c.vwin_unit + (u64)h * c.vwin_head + (u64)(p % max(c.resid, 1)) * D + d;
        }
        if (kw) {
            const float4 x = *(const float4*)(knew + src);
            *(uint2*)(c.kwin + krow) = make_uint2(f2h(x.x) | ((u32)f2h(x.y) << 16), f2h(x.z) | ((u32)f2h(x.w) << 16));
        }
        if (vw) {
            const float4 x = *(const float4*)(vnew + src);
            *(uint2*)(c.vwin + vrow) = make_uint2(f2h(x.x) | ((u32)f2h(x.y) << 16), f2h(x.z) | ((u32)f2h(x.w) << 16));
        }
    }
}

// Writes the new tokens that stay in full precision into the windows (after the quantize
// kernels, which read the old window slots). One CTA per token (a CTA per (token, KV head) of
// 128 one-element threads was launch-bound at B = 1046). grid = tokens, block = 128.
extern "C" __global__ void kivi_write_window(CacheBufs c, const Tok* toks, const float* knew,
                                             const float* vnew) {
    write_window_token(c, toks[blockIdx.x], blockIdx.x, knew, vnew);
}

// A decode step's value quantization and window writes in one launch (the host uses it when
// every item brings one token and none is a sink): one CTA per token. The value leaving a full
// window (position n0 - R) sits in the slot the new token takes (n0 % R), so this CTA quantizes
// it before the barrier and writes the window after it; CTAs of other tokens touch other slots.
// (Key groups to flush, read from the key window, are quantized by kivi_quantize_keys first.)
// grid = tokens, block = 128.
extern "C" __global__ void kivi_append_decode(CacheBufs c, const Tok* toks, const float* knew,
                                              const float* vnew) {
    const Tok tk = toks[blockIdx.x];
    const int v0 = val_quant_end(c, tk.n_old), v1 = val_quant_end(c, tk.n_old + 1);
    if (v1 > v0) quantize_value_token(c, tk.slot, tk.n_old, tk.tok_off, v0, vnew);
    __syncthreads();
    write_window_token(c, tk, blockIdx.x, knew, vnew);
}
#endif  // ATTN_D

// ---------------------------------------------------------------------------------------------
// Decode attention (flash-decoding). One CTA = one packed query token x one KV head x NG of its
// query heads x one split of the sequence: packed K/V of a KV head is read once for all the query
// heads sharing it. Scores of the split stay in shared memory; the CTA writes its unnormalised
// output, max and sum. The last CTA of a (token, head group) to finish then combines the splits
// (`tickets`), or, when the host asks for it (several waves of CTAs, sink or prefill parts from
// other kernels), kivi_attn_reduce does.


struct AttnParams {
    CacheBufs c;
    const float* q;     // [T][H][D]
    const float* knew;  // [T][Hkv][D]
    const float* vnew;  // [T][Hkv][D]
    const Tok* toks;    // [T]
    float* part_o;      // [T][H][nsplit][D]
    float* part_ml;     // [T][H][nsplit][2]
    float* out;         // [T][H][D]: the kernel writes the output (one split, or `tickets`), else null
    // Non-null with `out` and several splits: [T][H / NG] counters, zero between launches; the
    // last CTA of a (token, head group) to finish combines the splits (no reduce launch).
    int* tickets;
    int n_head, nsplit, split_len;
    // Floats per head's row of the split's scores (split_len, padded with several heads per CTA
    // so that the heads' rows start in different banks: SCORE_ROW_PAD on the host).
    int sc_stride;
    float scale_log2;   // log2(e) / sqrt(D)
    int tensor_cores;   // whole quantized blocks through mma.sync (else the CUDA-core path)
    int tc_multiple;    // ... in multiples of this many blocks (the rest: CUDA cores)
    int tc_partial_min; // a last partial block with >= this many quantized tokens too (0: never)
    // 1: tokens of items with several new tokens attend only the stored positions [0, n_old)
    // here; kivi_attn_prefill adds the new ones as split nsplit - 1.
    int prefill;
};

// Code j of word w as f = 1 + c / 2^b (mantissa bits 21..22 at 2 bits, 19..22 at 4 bits), so
// s*c + m = (2^b s) f + (m - 2^b s): one shift, one LOP3, one FFMA per code.
template <int B>
__device__ __forceinline__ float code_as_float(u32 w, int j) {
    const int top = 23 - B;
    const int pos = j * B;
    u32 x = pos <= top ? (w << (top - pos)) : (w >> (pos - top));
    return __int_as_float((x & (((1u << B) - 1) << top)) | 0x3f800000u);
}

// One halving step of transpose_reduce: lanes with bit O set keep the upper half of a[0..2O).
// Template recursion keeps every array index a compile-time constant (registers, no local memory).
template <int O>
__device__ __forceinline__ void tr_step(float* a, int lane) {
    const bool upper = lane & O;
#pragma unroll
    for (int k = 0; k < O; k++) {
        const float send = upper ? a[k] : a[k + O];
        const float keep = upper ? a[k + O] : a[k];
        a[k] = keep + __shfl_xor_sync(0xffffffffu, send, O);
    }
    if constexpr (O > 1) tr_step<O / 2>(a, lane);
}

// Lane l ends with the warp-wide sum of a[l % N] (N a power of two <= 32).
template <int N>
__device__ __forceinline__ float transpose_reduce(float (&a)[N], int lane) {
    tr_step<N / 2>(a, lane);
    float v = a[0];
#pragma unroll
    for (int o = N; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Combines the first `nread` splits' partials of NG query heads (h0..) of packed token `tok`
// into out, by the calling CTA of W warps (D: head_dim). Everything here is latency: a head's
// max and sum by one warp, a lane per split; then each thread takes XPT quads of channels and
// loads all their partials of SPR splits per round trip (one dependent load per split made the
// reduce take 18 us for 33 splits at GQA B = 1 T = 32K; one loop per quad, 4 rounds per split
// group in one-warp CTAs of four heads). Every element sums its splits in order, so the
// attention kernel's combination and kivi_attn_reduce's give the same bits. Loads bypass L1
// (partials written by other CTAs of the same launch). Splits whose max is -inf (empty) count
// for nothing; their outputs are not written.
template <int NG, int D, int W>
__device__ __forceinline__ void combine_splits(const float* part_o, const float* part_ml, float* out, int tok,
                                               int n_head, int h0, int nsplit, int nread, float* sred) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    float m0[NG], l0[NG];
#pragma unroll
    for (int g = 0; g < NG; g++) {
        m0[g] = NEG_INF;
        l0[g] = 0.0f;
        if (g % nwarps == warp && lane < nread) {
            const float* ml = part_ml + ((u64)tok * n_head + h0 + g) * nsplit * 2;
            m0[g] = __ldcg(ml + 2 * lane);
            l0[g] = __ldcg(ml + 2 * lane + 1);
        }
    }
#pragma unroll
    for (int g = 0; g < NG; g++) {
        if (g % nwarps != warp) continue;
        const float* ml = part_ml + ((u64)tok * n_head + h0 + g) * nsplit * 2;
        float mx = m0[g];
        for (int s = lane + 32; s < nread; s += 32) mx = fmaxf(mx, __ldcg(ml + 2 * s));
        mx = warp_max(mx);
        float den = m0[g] == NEG_INF ? 0.0f : exp2f(m0[g] - mx) * l0[g];
        for (int s = lane + 32; s < nread; s += 32) {
            const float m = __ldcg(ml + 2 * s);
            den += m == NEG_INF ? 0.0f : exp2f(m - mx) * __ldcg(ml + 2 * s + 1);
        }
        den = warp_sum(den);
        if (lane == 0) {
            sred[2 * g] = mx;
            sred[2 * g + 1] = den;
        }
    }
    __syncthreads();
    constexpr int NT = 32 * W, COLS = D / 4, ITEMS = NG * COLS, XPT = (ITEMS + NT - 1) / NT, SPR = XPT >= 4 ? 2 : 4;
    float4 acc[XPT];
#pragma unroll
    for (int i = 0; i < XPT; i++) acc[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int s = 0; s < nread; s += SPR) {
        float m[XPT][SPR];
        float4 v[XPT][SPR];
#pragma unroll
        for (int i = 0; i < XPT; i++) {
            const int x = (int)threadIdx.x + i * NT, g = x / COLS, c = 4 * (x % COLS);
            const u64 row = (u64)tok * n_head + h0 + g;
#pragma unroll
            for (int j = 0; j < SPR; j++) {
                const bool ok = x < ITEMS && s + j < nread;
                m[i][j] = ok ? __ldcg(part_ml + (row * nsplit + s + j) * 2) : NEG_INF;
                v[i][j] = ok ? __ldcg((const float4*)(part_o + (row * nsplit + s + j) * D + c))
                             : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
        }
#pragma unroll
        for (int i = 0; i < XPT; i++) {
            const int g = ((int)threadIdx.x + i * NT) / COLS;
            const float mx = sred[2 * (g < NG ? g : 0)];
#pragma unroll
            for (int j = 0; j < SPR; j++) {
                if (m[i][j] != NEG_INF) {
                    const float w = exp2f(m[i][j] - mx);
                    acc[i].x += w * v[i][j].x;
                    acc[i].y += w * v[i][j].y;
                    acc[i].z += w * v[i][j].z;
                    acc[i].w += w * v[i][j].w;
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < XPT; i++) {
        const int x = (int)threadIdx.x + i * NT, g = x / COLS, c = 4 * (x % COLS);
        if (x < ITEMS) {
            const float den = sred[2 * g + 1];
            *(float4*)(out + ((u64)tok * n_head + h0 + g) * D + c) =
                make_float4(acc[i].x / den, acc[i].y / den, acc[i].z / den, acc[i].w / den);
        }
    }
}

// blockIdx.y and .z read again (volatile), so that the combination's uses cannot stretch the
// kernel's first reads across the split. (ptxas gives the same registers and spills with plain
// blockIdx and 56-88 fewer instructions, but on the H200 (session 17, same call, alternating
// processes) KIVI-2 MHA B = 32 T = 32K took 808-816 us with plain blockIdx against 795-803.)
#ifndef KIVI_EMU
__device__ __forceinline__ int ctaid_y_again() {
    int v;
    asm volatile("mov.u32 %0, %%ctaid.y;" : "=r"(v));
    return v;
}
__device__ __forceinline__ int ctaid_z_again() {
    int v;
    asm volatile("mov.u32 %0, %%ctaid.z;" : "=r"(v));
    return v;
}
#else
inline int ctaid_y_again() { return blockIdx.y; }
inline int ctaid_z_again() { return blockIdx.z; }
#endif

// With P.tickets: after a CTA's partials are written, the last CTA of its (token, head group)
// combines all splits into P.out and resets the counter for the next launch.
template <int D, int NG, int W>
__device__ __forceinline__ void last_cta_combines(const AttnParams& P, int tok, int group) {
    __shared__ int s_last;
    __shared__ float s_red[2 * NG];
    __threadfence();  // this CTA's partials reach L2 before its ticket
    __syncthreads();
    if (threadIdx.x == 0) {
        int* t = P.tickets + (u64)tok * (P.n_head / NG) + group;
        s_last = atomicAdd(t, 1) == P.nsplit - 1;
        if (s_last) *t = 0;  // every CTA of the group has taken its ticket
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    combine_splits<NG, D, W>(P.part_o, P.part_ml, P.out, tok, P.n_head, group * NG, P.nsplit, P.nsplit, s_red);
}

// CPL contiguous f16 values -> f32.
template <int CPL>
__device__ __forceinline__ void load_f16(const u16* p, float (&x)[CPL]) {
    if (CPL == 4) {
        uint2 u = *(const uint2*)p;
        x[0] = h2f(u.x & 0xffff);
        x[1] = h2f(u.x >> 16);
        x[2] = h2f(u.y & 0xffff);
        x[3] = h2f(u.y >> 16);
    } else if (CPL == 2) {
        u32 u = *(const u32*)p;
        x[0] = h2f(u & 0xffff);
        x[1] = h2f(u >> 16);
    } else {
#pragma unroll
        for (int c = 0; c < CPL; c++) x[c] = h2f(p[c]);
    }
}
template <int CPL>
__device__ __forceinline__ void load_f32(const float* p, float (&x)[CPL]) {
#pragma unroll
    for (int c = 0; c < CPL; c++) x[c] = p[c];
}


// Raw row chunk of CPL channels: f16 bits packed two per word, or f32 bits. Loads are issued raw
// (several in flight) and converted only when all are issued.
template <int CPL>
__device__ __forceinline__ void raw_f16(const u16* p, u32 (&r)[CPL]) {
    if (CPL == 4) {
        uint2 u = *(const uint2*)p;
        r[0] = u.x;
        r[1] = u.y;
    } else {
        r[0] = *(const u32*)p;
    }
}
template <int CPL>
__device__ __forceinline__ void raw_f32(const float* p, u32 (&r)[CPL]) {
#pragma unroll
    for (int c = 0; c < CPL; c++) r[c] = __float_as_uint(p[c]);
}
template <int CPL>
__device__ __forceinline__ void raw_to_float(const u32 (&r)[CPL], bool is_f32, float (&x)[CPL]) {
    if (is_f32) {
#pragma unroll
        for (int c = 0; c < CPL; c++) x[c] = __uint_as_float(r[c]);
    } else {
#pragma unroll
        for (int c = 0; c < CPL; c++) x[c] = h2f((u16)(r[c / 2] >> (16 * (c % 2))));
    }
}


// ---------------------------------------------------------------------------------------------
// Tensor-core paths. The f16 cache's blocks go through mma.sync m16n8k16 as they are stored,
// the query (keys) or the softmax weights (values) as the B operand split into f16 hi + lo parts
// in columns 2h and 2h + 1 of head h (up to 4 heads in the 8 columns), so neither is rounded to
// f16: lane t of each quad ends with head t's two parts in c0/c1 and c2/c3 and adds them. The
// quantized blocks go through mma.sync m16n8k32 as u8 codes, the scales folded into a 16-bit
// fixed-point B operand (tc_key_block_i8 and the rest below).

#ifndef KIVI_EMU
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}
// f16 pair, `lo` in the low half.
__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ void mma_16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#endif  // KIVI_EMU

// Part 0 (hi = f16(x)) or part 1 (x - hi, exact in f32; rounded to f16 when packed) of x.
__device__ __forceinline__ float split_part(float x, int part) {
    const float hi = h2f(f2h(x));
    return part ? x - hi : hi;
}
// x as f16 hi (low half) and lo (high half) bits.
__device__ __forceinline__ u32 split_bits(float x) {
    const u16 hi = f2h(x);
    return (u32)hi | ((u32)f2h(x - h2f(hi)) << 16);
}


// ---- Integer tensor-core keys: the codes go into mma.sync m16n8k32 as the u8 integers they
// are, with no conversion to f16 at all; the scales go into the B operand instead (q s per
// channel and 32-token quarter of the block, as 16-bit fixed point split into two s8 columns),
// and the mins' term q . m is added per quarter. (Dequantizing the codes to f16 pairs for
// mma.sync m16n8k16 took ~1085 SASS instructions per block and lane, this ~890 with the plain
// 4-bit packing of session 12.)

// 1: the integer paths' 2-bit A operands are the code bits masked where they lie in the word,
// c 2^s for a code s bits up (s <= 6: at most 192, still a u8), not shifted down first: one LOP3
// per register instead of a shift and a LOP3. Every register of an m-tile row has the same s,
// so the row's sums come out times 2^s, and the factor that turns them into floats divides it
// out (unshift below; exact, a power of two). Measured on the H200 (µs, shifted -> in place):
// MHA B = 32 T = 32K KIVI-2 1027 / 1020 -> 956 / 964, B = 1024 T = 330 KIVI-2 R = 32 528 -> 499.
// MASK_IN_PLACE4: the same for 4-bit codes (s = 4, at most 240). With the plain 4-bit packing
// (before the planes of key_word) it moved the four-warp kernel's spills (44 / 84 -> 48 / 92 B)
// and measured slower (MHA B = 32 T = 32K KIVI-4 1411 / 1398 -> 1461 / 1456); with the planes
// the same (session 29, GQA B = 32 T = 32K KIVI-4, 0 / 1: 434.9 / 433.8 us).
#ifndef MASK_IN_PLACE
#define MASK_IN_PLACE 1
#endif
#ifndef MASK_IN_PLACE4
#define MASK_IN_PLACE4 1
#endif
// Code mask `mask` (a code's bits at bit 0 of each byte) of word x at bit s: x & (mask << s)
// in place, else (x >> s) & mask.
template <int BITS>
__device__ __forceinline__ u32 code_bits(u32 x, u32 mask, int s) {
    return (BITS == 2 ? MASK_IN_PLACE : MASK_IN_PLACE4) ? x & (mask << s) : (x >> s) & mask;
}
// 2^-s where code_bits left a row's codes s bits up, else 1.
template <int BITS>
__device__ __forceinline__ constexpr float unshift(int s) {
    return (BITS == 2 ? MASK_IN_PLACE : MASK_IN_PLACE4) ? 1.0f / (float)(1 << s) : 1.0f;
}

#ifndef KIVI_EMU
// mma.sync m16n8k32 of u8 A and s8 B (B_SIGNED) or u8 B into s32.
template <bool B_SIGNED = true>
__device__ __forceinline__ void imma_16832(int (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#define IMMA_16832(BTYPE)                                                                                   \
    asm("mma.sync.aligned.m16n8k32.row.col.s32.u8." BTYPE ".s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "        \
        "{%8, %9}, {%0, %1, %2, %3};"                                                                        \
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])                                                     \
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1))
    if constexpr (B_SIGNED)
        IMMA_16832("s8");
    else
        IMMA_16832("u8");
#undef IMMA_16832
}
__device__ __forceinline__ void imma_16832_uu(int (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    imma_16832<false>(c, a0, a1, a2, a3, b0, b1);
}
#endif

// 1: the integer key and value blocks copy their codes into the warp's shared memory (cp.async,
// 16 bytes per lane and instruction) while they build the B operand, and read them from there:
// Nsight Compute (MHA B = 32 T = 32K KIVI-2) put 43 % of the kernel's stall samples on loads
// (L1TEX scoreboard), the value k-steps' code words first (17 % at one PRMT: each k-step loaded
// its words and waited for them), as the 80-register cap leaves no registers to load further
// ahead. A warp's buffer: the block's codes and their padding, 5 KiB at 2 bits (D = 128), so six
// four-warp CTAs still fit an SM. Measured on the H200 (µs, MHA, pool -> staged, same call): B = 32
// T = 32K KIVI-2 956 / 958 -> 871 / 881, B = 8 T = 32K 267 / 269 -> 244 / 245. (Copying each
// warp's next block too, double-buffered with scales and mins, left 12 warps per SM for lack of
// shared memory: 1024 -> 1282 µs, KIVI-4 1397 -> 1911, GQA KIVI-2 454 -> 520.) One-warp CTAs
// (serving; 5 KiB each, 23 fit an SM), against loading only their first k-step's words ahead
// of the B operand as before: MHA B = 1024 T = 330 KIVI-2 R = 32 502 -> 461, R = 128 668 ->
// 625, B = 256 131 -> 117 (9/3/64, SmolLM2's shape: equal).
#ifndef STAGE_CODES
#define STAGE_CODES 1
#endif
// The same for 4-bit codes in four-warp CTAs (10 KiB per warp with padding: the CTAs' shared
// memory then allows 4 per SM, so those kernels take the register cap of 4,
// QUANT_MIN_CTAS_STAGED). Measured on the H200 with the plain 4-bit packing (µs, MHA B = 32,
// pool-reading / staged at 5 CTAs / staged at 4 CTAs): T = 32K KIVI-4 1402 / 1435 / 1339 (again
// 1404 / 1412 / 1378), T = 16K 718 / 722 / 689, B = 8 T = 32K 381 / 379 / 362.
#ifndef STAGE_CODES4
#define STAGE_CODES4 1
#endif
// Staged interleaved codes (key_word, value_word): words of padding after every row's worth of
// the copy (keys: 32 words; values: D / 4). Row-major rows needed them so that the eight 16-byte
// loads of a quarter-warp fell in different banks; the chunk-major units (code_word) read 128
// contiguous bytes per quarter warp without them, but 0 measured slower on the H200 (session 31,
// MHA B = 32 T = 32K, 8 -> 0: KIVI-4 1194.6 -> 1401.9 us, KIVI-2 746.9 -> 779.8). (With the
// plain 4-bit packing, 4 words after each 32-token key sub-tile measured on the H200, MHA
// B = 32 T = 32K, 0 -> 4: KIVI-2 871 / 864 -> 847 / 848, KIVI-4 1320 / 1318 -> 1266 / 1266.)
#ifndef STAGE2_PAD
#define STAGE2_PAD 8
#endif

#ifndef KIVI_EMU
// A shared-memory address (32 bits) of a generic pointer into shared memory.
typedef u32 SmemAddr;
__device__ __forceinline__ SmemAddr smem_addr(const void* p) {
    u64 a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (SmemAddr)a;
}
// 16 bytes from global `src + OFF` to shared `dst + OFF`, asynchronously (in the group of the
// next commit); OFF an immediate, so that a warp's copies share two base registers. CA: through
// L1 (cp.async.ca), else L2 only (.cg).
template <int DOFF, int SOFF, bool CA = false>
__device__ __forceinline__ void cp_async16(SmemAddr dst, const void* src) {
    if constexpr (CA)
        asm volatile("cp.async.ca.shared.global [%0+%2], [%1+%3], 16;" ::"r"(dst), "l"(src), "n"(DOFF), "n"(SOFF)
                     : "memory");
    else
        asm volatile("cp.async.cg.shared.global [%0+%2], [%1+%3], 16;" ::"r"(dst), "l"(src), "n"(DOFF), "n"(SOFF)
                     : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Waits until at most N of the thread's committed groups are in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
#endif
// Rounds I.. of a warp's copy: round I moves bytes [512 I, 512 I + 512) to the same offset
// plus PAD bytes per SEG bytes before it (SEG a power of two of at least 16 bytes; below 512,
// the lane's share of the padding is in `dst`).
template <int I, int N, int SEG, int PAD>
__device__ __forceinline__ void cp_async_rounds(SmemAddr dst, const char* src) {
    if constexpr (I < N) {
        cp_async16<512 * I + PAD * (512 * I / SEG), 512 * I>(dst, src);
        cp_async_rounds<I + 1, N, SEG, PAD>(dst, src);
    }
}
// One warp starts copying BYTES (whole rounds of 16 per lane) from src to dst (its shared-memory
// address, smem_addr), as one group, with PAD bytes of padding after every SEG.
template <int BYTES, int SEG = BYTES, int PAD = 0>
__device__ __forceinline__ void warp_copy_async(SmemAddr dst, const u32* src, int lane) {
    static_assert(BYTES % (16 * 32) == 0 && SEG % 16 == 0 && (SEG & (SEG - 1)) == 0, "whole rounds of 16 bytes");
    cp_async_rounds<0, BYTES / 512, SEG, PAD>(dst + 16 * lane + PAD * (16 * lane / SEG), (const char*)src + 16 * lane);
    cp_async_commit();
}

// Sum (or max) of a[j] over the warp for j = 0..3, in 6 shuffles: lane l ends with j = (l >> 3) & 3.
template <bool MAX>
__device__ __forceinline__ float reduce4(const float (&a)[4], int lane) {
    const bool h16 = lane & 16, h8 = lane & 8;
    const float r0 = __shfl_xor_sync(0xffffffffu, h16 ? a[0] : a[2], 16);
    const float r1 = __shfl_xor_sync(0xffffffffu, h16 ? a[1] : a[3], 16);
    const float k0 = h16 ? a[2] : a[0], k1 = h16 ? a[3] : a[1];
    const float b0 = MAX ? fmaxf(k0, r0) : k0 + r0, b1 = MAX ? fmaxf(k1, r1) : k1 + r1;
    const float r = __shfl_xor_sync(0xffffffffu, h8 ? b0 : b1, 8);
    float x = h8 ? b1 : b0;
    x = MAX ? fmaxf(x, r) : x + r;
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) {
        const float y = __shfl_xor_sync(0xffffffffu, x, o);
        x = MAX ? fmaxf(x, y) : x + y;
    }
    return x;
}

// Fixed-point range of the B operand: |v| <= KEY_FIX, so that hi = (v + 128) >> 8 fits in s8.
#define KEY_FIX 32512.0f

// The B operand of tc_key_block_i8 for key block blk, into the warp's buffer bbuf ([D / 32
// k-steps][32 lanes][2], the fragments as loaded): column 2j + part holds quarter j's (tokens
// 32j..32j + 31, scale group 32j / G) v = round(q s KEY_FIX / sigma_j) (sigma_j = max |q s|
// over the channels), part 0 its high byte ((v + 128) >> 8) and part 1 its low byte (v - 256
// hi, in [-128, 127]). Lane l computes channels 4l..4l + 3 of every quarter. Returns lane
// (g, t)'s factor sigma_t / KEY_FIX and mins' term q . m of quarter t, times scale_log2.
// qshift: log2(G / 32), so that quarter j's scale group is j >> qshift.
template <int D>
__device__ __forceinline__ void key_b_i8(const AttnParams& P, int kvh, u64 blk, int qshift, const float* sq, u32* bbuf,
                                         int lane, float& fac, float& bias) {
    const CacheBufs& c = P.c;
    const int ch = 4 * lane;
    const u64 sm = blk * c.ksm_block + (u64)kvh * c.ksm_head + ch;
    const u16* ks = c.ks + sm;
    const u16* km = c.km + sm;
    const bool has = ch < D;
    float q[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (has) {
        const float4 v = *(const float4*)(sq + ch);
        q[0] = v.x;
        q[1] = v.y;
        q[2] = v.z;
        q[3] = v.w;
    }
    float qs[4][4], amax[4], qm[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        uint2 s2 = {0u, 0u}, m2 = {0u, 0u};
        if (has) {
            s2 = *(const uint2*)(ks + (j >> qshift) * D);
            m2 = *(const uint2*)(km + (j >> qshift) * D);
        }
        const u32 sw[4] = {s2.x, s2.x >> 16, s2.y, s2.y >> 16};
        const u32 mw[4] = {m2.x, m2.x >> 16, m2.y, m2.y >> 16};
        amax[j] = 0.0f;
        qm[j] = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            qs[j][i] = q[i] * h2f((u16)sw[i]);
            amax[j] = fmaxf(amax[j], fabsf(qs[j][i]));
            qm[j] += q[i] * h2f((u16)mw[i]);
        }
    }
    const float xmax = reduce4<true>(amax, lane);
    const float xsum = reduce4<false>(qm, lane);
    const int t = lane & 3;
    const float sigma_t = __shfl_sync(0xffffffffu, xmax, 8 * t);
    fac = sigma_t * (1.0f / KEY_FIX) * P.scale_log2;
    bias = __shfl_sync(0xffffffffu, xsum, 8 * t) * P.scale_log2;
    // Lane l's channels are k-step l / 8, rows 16e + 4t' .. + 3 of B (e = (l >> 2) & 1, t' = l & 3).
    const int kstep = lane >> 3, e = (lane >> 2) & 1;
    __syncwarp();  // the previous block's readers of bbuf are done
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const float sigma = __shfl_sync(0xffffffffu, xmax, 8 * j);
        // (Approximate: any inv <= ~1.004 KEY_FIX / sigma keeps |v| within the s8 pair's range.)
        const float inv = sigma > 0.0f ? __fdividef(KEY_FIX, sigma) : 0.0f;
        u32 v[4], u[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            v[i] = (u32)__float2int_rn(qs[j][i] * inv);
            u[i] = v[i] + 128u;
        }
        const u32 lo = prmt(prmt(v[0], v[1], 0x0040u), prmt(v[2], v[3], 0x0040u), 0x5410u);
        const u32 hi = prmt(prmt(u[0], u[1], 0x0051u), prmt(u[2], u[3], 0x0051u), 0x5410u);
        if (has) {
            bbuf[(kstep * 32 + 4 * (2 * j) + t) * 2 + e] = hi;
            bbuf[(kstep * 32 + 4 * (2 * j + 1) + t) * 2 + e] = lo;
        }
    }
    __syncwarp();
}

// The A register of rows g (r = 0) or g + 8 (r = 1) of m-tile 2k + hm of a block's interleaved
// codes (key_word, value_word), from the lane's words x[plane][quarter k]: 2-bit, bits 2 (2 hm +
// r) of each byte; 4-bit, bits 4 r of plane hm's. a_shift: the bit the codes are left at (the
// row's sums come out times 2^a_shift, see unshift).
template <int BITS>
__device__ __forceinline__ constexpr int a_shift(int hm, int r) {
    return BITS == 2 ? 4 * hm + 2 * r : 4 * r;
}
template <int BITS>
__device__ __forceinline__ u32 a_code(const u32 (&x)[BITS / 2][4], int k, int hm, int r) {
    if constexpr (BITS == 2)
        return code_bits<2>(x[0][k], 0x03030303u, a_shift<2>(hm, r));
    else
        return code_bits<4>(x[hm][k], 0x0f0f0f0fu, a_shift<4>(hm, r));
}

// tc_key_block for one-head CTAs on the integer tensor cores. Lane (g, t) holds slot g of the
// block's interleaved codes (key_word): in m-tile m = 2k + hm (tokens 32k + 16hm + [0, 16)),
// rows g and g + 8, and in the 32-channel k-step, channels 4t..4t + 3 (a0, a1) and 16 + 4t..
// (a2, a3): the bytes of its words, one mask each (a_code). Column 2j + part of the result is
// quarter j's part, so lane (g, t) holds the scores of m-tiles 2t and 2t + 1.
template <int D, int KB, bool STAGED = false>
__device__ __forceinline__ void tc_key_block_i8(const AttnParams& P, int kvh, u64 blk, int pb, int s0, int valid,
                                                int qshift, const float* sq, u32* bbuf, float* sc, int lane,
                                                u32* cbuf = nullptr) {
    const CacheBufs& c = P.c;
    constexpr int NP = KB / 2;  // code planes
    const int g = lane >> 2, t = lane & 3;
    // The lane's slot g of channel quads 8 k + t (+ 4): quad rows of QS words (STAGE2_PAD words
    // of padding after each in the staged copy), planes of PS words. Every load below is at a
    // constant offset from kq. STAGED: in the warp's copy of the block's codes (STAGE_CODES),
    // started here.
    constexpr int QS = STAGED ? 32 + STAGE2_PAD : 32, PS = D / 4 * QS;
    const u32* words = c.kq + blk * c.kq_block + (u64)kvh * c.kq_head;
    const u32* kq;
    if constexpr (STAGED) {
        warp_copy_async<BLOCK_TOKENS * D * KB / 8, 128, STAGE2_PAD * 4>(smem_addr(cbuf), words, lane);
        kq = cbuf + group_word<32, STAGE2_PAD>(g, t);
    } else {
        kq = words + group_word<32>(g, t);
    }
    float fac, bias;
    key_b_i8<D>(P, kvh, blk, qshift, sq, bbuf, lane, fac, bias);
    if constexpr (STAGED) {
        cp_async_wait<0>();
        __syncwarp();
    }
    int acc[8][4];
#pragma unroll
    for (int m = 0; m < 8; m++)
#pragma unroll
        for (int x = 0; x < 4; x++) acc[m][x] = 0;
// k-steps unrolled: 2-bit two at a time (all 4 measured best with the plain layout, 1: MHA B = 32
// T = 32K 1018 -> 1064 us; with the interleaved codes all 4 spill in the loop: 792 -> 831 us,
// session 19).
#ifndef KEY_I8_UNROLL
#define KEY_I8_UNROLL 2
#endif
#ifndef KEY_I8_UNROLL_K4
#define KEY_I8_UNROLL_K4 2
#endif
#pragma unroll(KB == 2 ? KEY_I8_UNROLL : KEY_I8_UNROLL_K4)
    for (int kstep = 0; kstep < D / 32; kstep++) {
        const uint2 b = ((const uint2*)bbuf)[kstep * 32 + lane];
        // Channels 32 kstep + 16 e + 4 t + i: quad 8 kstep + 4 e + t; word k: quarter k.
        u32 xa[NP][4], xb[NP][4];
#pragma unroll
        for (int hp = 0; hp < NP; hp++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const uint4 u = *(const uint4*)(kq + hp * PS + (8 * kstep + 4 * e) * QS);
                const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    if (e)
                        xb[hp][k] = w[k];
                    else
                        xa[hp][k] = w[k];
                }
            }
#pragma unroll
        for (int m = 0; m < 8; m++) {
            const int k = m >> 1, hm = m & 1;
            imma_16832(acc[m], a_code<KB>(xa, k, hm, 0), a_code<KB>(xa, k, hm, 1), a_code<KB>(xb, k, hm, 0),
                       a_code<KB>(xb, k, hm, 1), b.x, b.y);
        }
    }
    // Only the block's first `valid` tokens are quantized keys. M-tile m is tokens 32 (m / 2) +
    // 16 (m & 1) + [0, 16) of quarter m / 2, whose columns lane (g, t) holds when t = m / 2.
    float* row = sc + (pb - s0) + g;
#pragma unroll
    for (int m = 0; m < 8; m++) {
        const int b = 16 * m, hm = m & 1;
        if ((m >> 1) == t && b + g < valid)
            row[b] = (float)(256 * acc[m][0] + acc[m][1]) * (fac * unshift<KB>(a_shift<KB>(hm, 0))) + bias;
        if ((m >> 1) == t && b + g + 8 < valid)
            row[b + 8] = (float)(256 * acc[m][2] + acc[m][3]) * (fac * unshift<KB>(a_shift<KB>(hm, 1))) + bias;
    }
    if constexpr (STAGED) __syncwarp();  // the buffer is read: the next block's copy may start
}

// The B fragments of the query heads `sq` ([NG][D] f32) for the f16 MMAs (tc_f16_key_block,
// key_mins_terms), fragment x = k-step x / 32 of lane x % 32, written by threads `tid`, `tid +
// nthreads`, ...: column g holds head g / 2's part g % 2 (split_part).
// F16_ROWS: the channel order of tc_f16_key_block (k-steps 2j and 2j + 1 of lane t take
// channels 32j + 8t .. 32j + 8t + 7, so that its A registers come from one 16-byte load per row).
template <int D, int NG, bool F16_ROWS = false>
__device__ __forceinline__ void query_fragments(const float* sq, uint2* sqf, int tid, int nthreads) {
    for (int x = tid; x < (D / 16) * 32; x += nthreads) {
        const int kstep = x / 32, l = x % 32, g = l >> 2, t = l & 3, part = g & 1;
        const int hg = g >> 1;
        uint2 f;
        f.x = 0u;
        f.y = 0u;
        if (hg < NG && F16_ROWS) {
            const float* qq = sq + hg * D + 32 * (kstep / 2) + 8 * t + 4 * (kstep % 2);
            f.x = pack_h2(split_part(qq[0], part), split_part(qq[1], part));
            f.y = pack_h2(split_part(qq[2], part), split_part(qq[3], part));
        } else if (hg < NG) {
            const float* qq = sq + hg * D + 16 * kstep + 2 * t;
            f.x = pack_h2(split_part(qq[0], part), split_part(qq[1], part));
            f.y = pack_h2(split_part(qq[8], part), split_part(qq[9], part));
        }
        sqf[x] = f;
    }
}

// ---- The f16 cache on the tensor cores (F16_TC): a block's 128 stored rows are the MMA's A
// operand as they are, no dequantization. The host turns it off (P.tensor_cores = 0) for
// batches of short sequences, where it measured slower (cache.rs, F16_TC_MIN_LEN).
#ifndef F16_TC
#define F16_TC 1
#endif
// The f16 cache's whole blocks left over after a split's rounds of one block per warp
// (P.tc_multiple) go through the tensor cores too, unevenly over the warps, when there are at
// least this many (fewer stay with the CUDA-core rows, spread over all warps), in splits that
// had a round. Measured on the H200 (session 14, µs, leftovers on the tensor cores vs the CUDA
// cores): 3 left after rounds, GQA B = 8 T = 4K 58.1 -> 48.7, MHA B = 1 T = 16K 86.1 -> 80.8;
// 1 left (so not), MHA B = 8 T = 1K 43.6 -> 48.7, GQA B = 32 T = 1K 48.4 -> 50.7; 3 in a split
// without a round (so not), MHA B = 8 T = 1K 43.9 -> 46.8, GQA B = 32 T = 1K 48.5 -> 50.0.
#ifndef F16_TC_REST
#define F16_TC_REST 2
#endif
// Row pairs (keys) and 16-token k-steps (values) of an f16 block whose loads are in flight
// together, in one-head CTAs and (_HEADS) in CTAs of several heads. (Session 13 on the H200: 4
// or 8 of each, also with register caps of 3 or 2 CTAs per SM (F16_MIN_CTAS), were no faster
// where the f16 kernel trails SDPA, small GQA batches, and the 2-CTA cap made MHA B = 8 T = 1K
// 1.36x slower; docs/benchmarks.md, "Session 13". Session 16: one key row pair at a time in GQA
// CTAs, B = 32 T = 32K 1047 -> 993 us, B = 8 T = 16K 145 -> 138; one value k-step at a time in
// one-head CTAs, MHA B = 32 T = 32K 3851 -> 3810, B = 8 T = 32K 978 -> 968.)
#ifndef F16_KEY_UNROLL
#define F16_KEY_UNROLL 2
#endif
#ifndef F16_KEY_UNROLL_HEADS
#define F16_KEY_UNROLL_HEADS 1
#endif
#ifndef F16_VALUE_UNROLL
#define F16_VALUE_UNROLL 1
#endif
#ifndef F16_VALUE_UNROLL_HEADS
#define F16_VALUE_UNROLL_HEADS 2
#endif

// Which rows of an f16 key block lane group g computes in m-tile m: F16_KEY_CONTIG, rows
// 16 m + 2 g and + 1 (an m-tile is 16 consecutive rows: each step of a warp reads 4 KB in one
// piece, and a head's scores are stored to consecutive words); else 16 g + 2 m and + 1 (as the
// quantized blocks once did: 8 pieces of 512 bytes, 4 KB apart). Measured on the H200 (session
// 17, µs, 0 -> 1): 0.5-1.6 % faster on the one-wave shapes (GQA B = 1 T = 4K 19.0 -> 18.7,
// B = 32 T = 4K 139.7 -> 138.1, MHA B = 8 T = 4K 133.2 -> 131.8), within +-0.5 % on the large
// ones.
#ifndef F16_KEY_CONTIG
#define F16_KEY_CONTIG 1
#endif
__device__ __forceinline__ int f16_key_row(int g, int m) { return F16_KEY_CONTIG ? 16 * m + 2 * g : 16 * g + 2 * m; }

// Scores of rows f16_key_row(g, m) and the next of an f16 key block (X, Y: lane (g, t)'s
// channels of the two rows, as tc_f16_key_block loads them) for the CTA's NG heads.
template <int D, int NG>
__device__ __forceinline__ void f16_key_row_pair(const AttnParams& P, const uint4 (&X)[D / 32], const uint4 (&Y)[D / 32],
                                                 int m, int pb, int s0, int valid, const uint2* qf, float* sc,
                                                 int lane) {
    const int g = lane >> 2, t = lane & 3;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < D / 32; j++) {
        const uint2 b0 = qf[(2 * j) * 32 + lane], b1 = qf[(2 * j + 1) * 32 + lane];
        mma_16816(acc, X[j].x, Y[j].x, X[j].y, Y[j].y, b0.x, b0.y);
        mma_16816(acc, X[j].z, Y[j].z, X[j].w, Y[j].w, b1.x, b1.y);
    }
    if (t < NG) {
        const int r = f16_key_row(g, m);
        float* row = sc + t * P.sc_stride + (pb - s0) + r;
        if (r < valid) row[0] = (acc[0] + acc[1]) * P.scale_log2;
        if (r + 1 < valid) row[1] = (acc[2] + acc[3]) * P.scale_log2;
    }
}

// Lane (g, t)'s first f16 key element of a block: row f16_key_row(g, 0), channel 8 t
// (tc_f16_key_block).
template <int D>
__device__ __forceinline__ const u16* f16_key_lane_rows(const CacheBufs& c, int kvh, u64 blk, int lane) {
    return c.kwin + (u64)kvh * c.kwin_head + blk * c.kwin_unit + (u64)f16_key_row(lane >> 2, 0) * D + 8 * (lane & 3);
}

// Scores of one f16 key block (128 rows from pb, pool block blk; the first `valid` are
// stored) for the CTA's NG heads, by one warp: m-tile m holds rows f16_key_row(g, m) and the
// next of lane group g, with the channels in query_fragments' F16_ROWS order, so that a row's A
// registers for two k-steps are one 16-byte load.
template <int D, int NG>
__device__ __forceinline__ void tc_f16_key_block(const AttnParams& P, int kvh, u64 blk, int pb, int s0, int valid,
                                                 const uint2* qf, float* sc, int lane) {
    const u16* rows = f16_key_lane_rows<D>(P.c, kvh, blk, lane);
#pragma unroll(NG == 1 ? F16_KEY_UNROLL : F16_KEY_UNROLL_HEADS)
    for (int m = 0; m < 8; m++) {
        const u16* x = rows + (u64)(f16_key_row(0, m) * D);
        uint4 X[D / 32], Y[D / 32];
#pragma unroll
        for (int j = 0; j < D / 32; j++) {
            X[j] = *(const uint4*)(x + 32 * j);
            Y[j] = *(const uint4*)(x + D + 32 * j);
        }
        f16_key_row_pair<D, NG>(P, X, Y, m, pb, s0, valid, qf, sc, lane);
    }
}

// The lane's CH channels of one f16 row as CH / 2 channel pairs (zeros if !ok: rows from a
// partial block's `valid` on were never written).
template <int CH>
__device__ __forceinline__ void f16_row_pairs(const u16* p, bool ok, u32 (&w)[CH / 2]) {
#pragma unroll
    for (int i = 0; i < CH / 8; i++) {
        uint4 u = make_uint4(0u, 0u, 0u, 0u);
        if (ok) u = *(const uint4*)(p + 8 * i);
        w[4 * i] = u.x;
        w[4 * i + 1] = u.y;
        w[4 * i + 2] = u.z;
        w[4 * i + 3] = u.w;
    }
}

// Lane (g, t)'s first f16 value element of a block: row 0, channel g D / 8 (tc_f16_value_block).
template <int D>
__device__ __forceinline__ const u16* f16_value_lane_rows(const CacheBufs& c, int kvh, u64 blk, int lane) {
    return c.vwin + (u64)kvh * c.vwin_head + blk * c.vwin_unit + (lane >> 2) * (D / 8);
}

// Adds k-step `kstep` (tokens ta = 16 kstep + 2t, ta + 1, tb = ta + 8, tb + 1) of an f16 value
// block to acc: wa0, wa1, wb0, wb1 are lane (g, t)'s channel pairs of those rows, zero past
// `valid` (tc_f16_value_block).
template <int D, int NG>
__device__ __forceinline__ void f16_value_kstep(const AttnParams& P, const u32 (&wa0)[D / 16], const u32 (&wa1)[D / 16],
                                                const u32 (&wb0)[D / 16], const u32 (&wb1)[D / 16], int kstep,
                                                int valid, const u32* pw, float (&acc)[D / 16][4], int lane) {
    const int g = lane >> 2, t = lane & 3, hg = g >> 1;
    const int ta = 16 * kstep + 2 * t, tb = ta + 8;
    const u32 sel = (g & 1) ? 0x7632u : 0x5410u;
    const u32 keep_a = (ta < valid ? 0xffffu : 0u) | (ta + 1 < valid ? 0xffff0000u : 0u);
    const u32 keep_b = (tb < valid ? 0xffffu : 0u) | (tb + 1 < valid ? 0xffff0000u : 0u);
    u32 bx = 0, by = 0;
    if (hg < NG) {
        bx = prmt(pw[ta], pw[ta + 1], sel) & keep_a;
        by = prmt(pw[tb], pw[tb + 1], sel) & keep_b;
    }
#pragma unroll
    for (int m = 0; m < D / 16; m++)
        mma_16816(acc[m], prmt(wa0[m], wa1[m], 0x5410u), prmt(wa0[m], wa1[m], 0x7632u), prmt(wb0[m], wb1[m], 0x5410u),
                  prmt(wb0[m], wb1[m], 0x7632u), bx, by);
}

// Adds one f16 value block (128 rows from pb, the first `valid` stored) weighted by the
// softmax to acc, by one warp (lane g: channels g CH..g CH + CH - 1, m-tile
// M: rows = channels g CH + 2M and + 1; k-step tokens 2t, 2t + 1, 2t + 8, 2t + 9): a
// channel pair of two tokens is two A registers after two PRMT.
template <int D, int NG>
__device__ __forceinline__ void tc_f16_value_block(const AttnParams& P, int kvh, u64 blk, int pb, int s0, int valid,
                                                   const float* sc, float (&acc)[D / 16][4], int lane) {
    constexpr int CH = D / 8;
    const int g = lane >> 2, t = lane & 3, hg = g >> 1;
    const u16* rows = f16_value_lane_rows<D>(P.c, kvh, blk, lane);
    const u32* pw = (const u32*)(sc + min(hg, NG - 1) * P.sc_stride + (pb - s0));
#pragma unroll(NG == 1 ? F16_VALUE_UNROLL : F16_VALUE_UNROLL_HEADS)
    for (int kstep = 0; kstep < BLOCK_TOKENS / 16; kstep++) {
        const int ta = 16 * kstep + 2 * t, tb = ta + 8;
        u32 wa0[CH / 2], wa1[CH / 2], wb0[CH / 2], wb1[CH / 2];
        f16_row_pairs<CH>(rows + (u64)ta * D, ta < valid, wa0);
        f16_row_pairs<CH>(rows + (u64)(ta + 1) * D, ta + 1 < valid, wa1);
        f16_row_pairs<CH>(rows + (u64)tb * D, tb < valid, wb0);
        f16_row_pairs<CH>(rows + (u64)(tb + 1) * D, tb + 1 < valid, wb1);
        f16_value_kstep<D, NG>(P, wa0, wa1, wb0, wb1, kstep, valid, pw, acc, lane);
    }
}

// ---- The f16 cache's blocks through a shared-memory ring (FST > 0 stages, D = 128; cache.rs
// F16_STAGES_FEW): each warp streams its blocks as 4 KB chunks, first the keys (chunk 8 i + m:
// block i's rows f16_key_row(p, m) and + 1 for p = 0..7, as tc_f16_key_block reads them), then the
// values (8 nb + 8 i + k: block i's rows 16 k..16 k + 15, k-step k), copied by cp.async FST - 1
// chunks ahead of the one it computes: the loads in flight need no registers to land in, and the
// first value chunks load during the softmax. A chunk is 8 runs of 512 contiguous bytes, one
// per copy instruction (lanes copying pieces of their own rows read each 32-byte value sector
// twice, without L1 caching: measured 1.3-1.7x slower than loads into registers), XOR-swizzled
// so that the lanes' 16-byte reads back are free of bank conflicts.
#ifndef F16_STAGES
#define F16_STAGES 0
#endif
// The ring's copies through L1 (cp.async.ca) in CTAs of several heads, L2 only (.cg) in one-head
// CTAs. Measured on the H200 (session 18, µs, GQA four-head CTAs, no ring / .cg / .ca): B = 1
// T = 32K 47.9 / 52.2 / 44.6, T = 16K 31.4 / 32.9 / 30.5, B = 32 T = 1K 42.8 / 47.0 / 40.5; but
// B = 8 T = 4K (seven-block splits) 46.0 / 52.1 / 49.5 (cache.rs: the ring only where the blocks
// split evenly over the warps). One-head CTAs, .cg / .ca (F16_RING_CA_ONE): MHA B = 1 T = 16K
// 70.4 / 75.7, T = 4K 24.2 / 29.9, GQA B = 1 T = 4K 18.7 / 22.1.
#ifndef F16_RING_CA_HEADS
#define F16_RING_CA_HEADS 1
#endif
#ifndef F16_RING_CA_ONE
#define F16_RING_CA_ONE 0
#endif
#define F16_RING_CA(NG) ((NG) > 1 ? F16_RING_CA_HEADS : F16_RING_CA_ONE)

// Where a chunk keeps 16-byte unit u (0..31) of its run p: key row pairs flip bit 2 for odd p
// (the 8 lanes of a read phase are pairs p, p + 1 x 4 units); value rows (row 2 p + u / 16)
// flip bits 0 and 2 by the row's bits 1 and 2 (a phase: rows 0, 2, 4, 6 x 2 units).
template <bool VALUES>
__device__ __forceinline__ int f16_ring_unit(int p, int u) {
    if (VALUES) {
        const int row = 2 * p + (u >> 4);
        return u ^ (((row >> 1) & 1) | (((row >> 2) & 1) << 2));
    }
    return u ^ ((p & 1) << 2);
}

// Starts chunk c of the warp's stream of nb blocks (the warp's i-th block is the split's block
// warp + i W) into ring slot c % FST, as one cp.async group (empty past the stream's end, so
// that chunk c is always group c). CA: the copies go through L1 (cp.async.ca), as in the CTAs of
// several heads, where .cg measured slower than no ring at all (see F16_RING_CA).
template <int FST, bool CA>
__device__ __forceinline__ void f16_stream_issue(const AttnParams& P, int kvh, const int* sblk, int warp, int W, int nb,
                                                 int c, SmemAddr ring, int lane) {
    constexpr int D = 128;
    if (c < 16 * nb) {
        const bool values = c >= 8 * nb;
        const int i = (values ? c - 8 * nb : c) >> 3, m = c & 7;
        const u64 blk = (u64)sblk[warp + i * W];
        const SmemAddr dst = ring + (c % FST) * (32 * D);
        // Run p: key rows f16_key_row(p, m) and + 1; value rows 16 m + 2 p and + 1.
        const u16* x = values ? P.c.vwin + (u64)kvh * P.c.vwin_head + blk * P.c.vwin_unit + (u64)(16 * m) * D
                              : P.c.kwin + (u64)kvh * P.c.kwin_head + blk * P.c.kwin_unit + (u64)f16_key_row(0, m) * D;
        const u64 run = values ? 2 * D : (u64)(f16_key_row(1, 0) - f16_key_row(0, 0)) * D;
#pragma unroll
        for (int p = 0; p < 8; p++)
            cp_async16<0, 0, CA>(dst + 512 * p + 16 * (values ? f16_ring_unit<true>(p, lane) : f16_ring_unit<false>(p, lane)),
                             x + p * run + 8 * lane);
    }
    cp_async_commit();
}

// Waits for chunk c (FST - 2 or fewer groups were committed after it) and reads the lane's 8
// pieces of it: keys X0 Y0 X1 Y1 .. (tc_f16_key_block), values rows ta, ta + 1, ta + 8, ta + 9
// (k-step-relative, ta = 2t), 2 pieces each (tc_f16_value_block). The lanes read each other's
// copies: each waits for its own, then the warp meets.
template <int FST, bool VALUES>
__device__ __forceinline__ void f16_stream_read(const uint4* ring, int c, uint4 (&x)[8], int lane) {
    cp_async_wait<FST - 2>();
    __syncwarp();
    const uint4* slot = ring + (c % FST) * 256;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        if (VALUES) {
            // Row 2t + (k / 2 & 1) + 8 (k / 4), unit 2g + k % 2 of the row.
            const int row = 2 * t + ((k >> 1) & 1) + 8 * (k >> 2), p = row >> 1;
            x[k] = slot[32 * p + f16_ring_unit<true>(p, 16 * (row & 1) + 2 * g + (k & 1))];
        } else {
            // Pair g, row k % 2 of it, unit t + 4 (k / 2) of the row.
            x[k] = slot[32 * g + f16_ring_unit<false>(g, 16 * (k & 1) + t + 4 * (k >> 1))];
        }
    }
    __syncwarp();  // all lanes have read the slot before any copies into it again
}

// A key chunk's pieces as tc_f16_key_block's row pair (X: row f16_key_row(g, m), Y: the next).
template <int D>
__device__ __forceinline__ void f16_key_pieces(const uint4 (&x)[D / 16], uint4 (&X)[D / 32], uint4 (&Y)[D / 32]) {
#pragma unroll
    for (int j = 0; j < D / 32; j++) {
        X[j] = x[2 * j];
        Y[j] = x[2 * j + 1];
    }
}

// Row r of a value chunk (its D / 64 pieces from x[r D / 64]) as D / 16 channel pairs, zero
// if !ok (rows past `valid` were never written: they could hold NaN, and 0 * NaN is NaN).
template <int D>
__device__ __forceinline__ void f16_value_piece_row(const uint4 (&x)[D / 16], int r, bool ok, u32 (&w)[D / 16]) {
#pragma unroll
    for (int q = 0; q < D / 64; q++) {
        const uint4 u = ok ? x[r * (D / 64) + q] : make_uint4(0u, 0u, 0u, 0u);
        w[4 * q] = u.x;
        w[4 * q + 1] = u.y;
        w[4 * q + 2] = u.z;
        w[4 * q + 3] = u.w;
    }
}

// 1: attention reads f16 rows in whole 8-row chunks at consecutive addresses, without
// per-token branches (0: every token through the generic path). F16_FAST: the f16 cache's
// rows (measured on the H200: MHA B = 32, T = 32K 4826 -> 3913 us, GQA 1724 -> 1230 us);
// F16_FAST_QUANT: the KIVI windows' (MHA, 1024 sequences of 330 tokens: KIVI-2 1106 -> 857 us,
// KIVI-4 1214 -> 944 us, despite 112 B of spills in the 2-bit one-head kernel at its cap).
#ifndef F16_FAST
#define F16_FAST 1
#endif
#ifndef F16_FAST_QUANT
#define F16_FAST_QUANT 1
#endif

// Adds a warp's f16 tensor-core value sums (tc_f16_value_block) to its slot `wacc` ([NG][D]): c0 + c1
// of m-tile M is head t's channel g CH + 2M, c2 + c3 channel g CH + 2M + 1. (Each phase of a
// warp writes an element of its slot from one lane; the lanes of different phases meet at the
// __syncwarp.)
template <int D, int NG>
__device__ __forceinline__ void tc_value_store(const float (&tacc)[D / 16][4], float* wacc, int lane) {
    const int g = lane >> 2, t = lane & 3;
    __syncwarp();
    if (t < NG) {
#pragma unroll
        for (int m = 0; m < D / 16; m++) {
            wacc[t * D + g * (D / 8) + 2 * m] += tacc[m][0] + tacc[m][1];
            wacc[t * D + g * (D / 8) + 2 * m + 1] += tacc[m][2] + tacc[m][3];
        }
    }
}

// ---- Integer tensor-core values, as the keys: A = the u8 codes (rows: channels, k: tokens),
// B = the softmax weight times the token's scale of the column's 32-channel quarter, as a
// 16-bit unsigned fixed-point pair of u8 columns; the mins' term p . m per quarter is added to
// the quarter's channels.

// Fixed-point range of the value B operand: v <= VAL_FIX (< 65536 with the approximate divide).
#define VAL_FIX 65000.0f

// Four consecutive tokens' value scales (or mins) for the block's D / 32 channel quarters, from
// `row` (their 4 gpt halves, gpt = D / G, 8-byte aligned): half j & 1 of q[i][j >> 1] is token
// i's scale of quarter j (group 32 j / G). One or two vector loads.
template <int D>
__device__ __forceinline__ void quarter_halves4(const u16* row, int gpt, u32 (&q)[4][2]) {
    if (D == 128 && gpt == 4) {
        const uint4 a = *(const uint4*)row, b = *(const uint4*)(row + 8);
        const u32 w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            q[i][0] = w[2 * i];
            q[i][1] = w[2 * i + 1];
        }
    } else if (gpt == 2) {
        const uint4 a = *(const uint4*)row;
        const u32 w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            if (D == 128) {  // quarters 0, 1: group 0; 2, 3: group 1
                q[i][0] = prmt(w[i], 0u, 0x1010u);
                q[i][1] = prmt(w[i], 0u, 0x3232u);
            } else {  // D = 64: quarter j is group j
                q[i][0] = w[i];
                q[i][1] = 0u;
            }
        }
    } else {
        const uint2 a = *(const uint2*)row;
        const u32 w[2] = {a.x, a.y};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const u32 h = (w[i >> 1] >> (16 * (i & 1))) & 0xffffu;
            q[i][0] = h | (h << 16);
            q[i][1] = q[i][0];
        }
    }
}

// The B operand of tc_value_block_i8 for value block blk (tokens [pb, pb + 128), weights sc
// relative to pb, the first `valid` quantized): column 2j + part holds v = round(p s VAL_FIX /
// sigma_j) of channel quarter j (s: the token's scale of that quarter's group; sigma_j = max
// p s over the block), part 0 its high byte and part 1 its low. Lane l computes tokens 4l..4l +
// 3. Returns lane (g, t)'s factor sigma_t / VAL_FIX and mins' term p . m of quarter t.
// The four tokens' scales, mins and weights come in vector loads, masked after (per token,
// behind its `valid` test, they measured slower: one-warp CTAs KIVI-2 R = 32 B = 1024 T = 330
// 551 -> 538 µs with vector loads; four-warp CTAs reading staged codes, MHA B = 32 T = 32K
// KIVI-2 869 -> 808, KIVI-4 1309 -> 1274).
template <int D>
__device__ __forceinline__ void value_b_i8(const AttnParams& P, int kvh, u64 blk, const float* w, int valid, u32* bbuf,
                                           int lane, float& fac, float& bias) {
    const CacheBufs& c = P.c;
    constexpr int NQ = D / 32;
    const int gpt = D / c.group;
    const u64 sm = blk * c.vsm_block + (u64)kvh * c.vsm_head;
    float ps[NQ][4], amax[4] = {0.0f, 0.0f, 0.0f, 0.0f}, pm[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    // Tokens 4 lane .. + 3: their scales, mins (all inside the block's arrays, written or not)
    // and weights (w is 16-byte aligned: sc is, and pb - s0 is a multiple of 128).
    u32 s4[4][2], m4[4][2];
    quarter_halves4<D>(c.vs + sm + (u64)(4 * lane) * gpt, gpt, s4);
    quarter_halves4<D>(c.vm + sm + (u64)(4 * lane) * gpt, gpt, m4);
    const float4 w4 = *(const float4*)(w + 4 * lane);
    const float wv[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        // Past `valid`: other paths' weights and unwritten scales and mins (maybe NaN): 0.
        const bool ok = 4 * lane + i < valid;
        const float p = ok ? wv[i] : 0.0f;
#pragma unroll
        for (int j = 0; j < NQ; j++) {
            const float sj = ok ? h2f((u16)(s4[i][j >> 1] >> (16 * (j & 1)))) : 0.0f;
            const float mj = ok ? h2f((u16)(m4[i][j >> 1] >> (16 * (j & 1)))) : 0.0f;
            ps[j][i] = p * sj;
            amax[j] = fmaxf(amax[j], ps[j][i]);
            pm[j] += p * mj;
        }
    }
    const float xmax = reduce4<true>(amax, lane);
    const float xsum = reduce4<false>(pm, lane);
    const int t = lane & 3;
    fac = __shfl_sync(0xffffffffu, xmax, 8 * t) * (1.0f / VAL_FIX);
    bias = __shfl_sync(0xffffffffu, xsum, 8 * t);
    const int kstep = lane >> 3, e = (lane >> 2) & 1;
    __syncwarp();  // the previous block's readers of bbuf are done
#pragma unroll
    for (int j = 0; j < NQ; j++) {
        const float sigma = __shfl_sync(0xffffffffu, xmax, 8 * j);
        const float inv = sigma > 0.0f ? __fdividef(VAL_FIX, sigma) : 0.0f;
        u32 v[4];
#pragma unroll
        for (int i = 0; i < 4; i++) v[i] = (u32)__float2int_rn(ps[j][i] * inv);
        const u32 lo = prmt(prmt(v[0], v[1], 0x0040u), prmt(v[2], v[3], 0x0040u), 0x5410u);
        const u32 hi = prmt(prmt(v[0], v[1], 0x0051u), prmt(v[2], v[3], 0x0051u), 0x5410u);
        bbuf[(kstep * 32 + 4 * (2 * j) + t) * 2 + e] = hi;
        bbuf[(kstep * 32 + 4 * (2 * j + 1) + t) * 2 + e] = lo;
    }
    __syncwarp();
}

// tc_value_block for one-head CTAs on the integer tensor cores: adds value block blk's weighted
// sum to vacc. Lane (g, t) holds slot g of the block's interleaved codes (value_word): in m-tile
// m = 2k + hm (channels 32k + 16hm + [0, 16)), rows g (vacc[m][0]) and g + 8 (vacc[m][1]), and
// in the 32-token k-step, tokens 4t..4t + 3 (a0, a1) and 16 + 4t.. (a2, a3). Its results are
// quarter t's (tc_value_store_i8).
template <int D, int VB, bool STAGED = false>
__device__ __forceinline__ void tc_value_block_i8(const AttnParams& P, int kvh, u64 blk, int pb, int s0, int valid,
                                                  const float* sc, u32* bbuf, float (&vacc)[D / 16][2], int lane,
                                                  u32* cbuf = nullptr) {
    const CacheBufs& c = P.c;
    constexpr int NP = VB / 2;  // code planes
    const int g = lane >> 2, t = lane & 3;
    // The lane's slot g of token quads 8 k + t (+ 4): quad rows of QW words (D / 4, plus
    // STAGE2_PAD when staged), planes of PS words; D = 64: a 16-byte load holds slots g & ~1 and
    // g | 1 (slot_half: the lane's is the second).
    constexpr int QW = D / 4 + (STAGED ? STAGE2_PAD : 0), PS = 32 * QW;
    const int slot_word = 4 * ((g * (D / 4)) / 32);
    const bool slot_half = (g * (D / 4)) % 32 != 0;
    const u32* words = c.vq + blk * c.vq_block + (u64)kvh * c.vq_head;
    const u32* vq;
    if constexpr (STAGED) {
        warp_copy_async<BLOCK_TOKENS * D * VB / 8, D, STAGE2_PAD * 4>(smem_addr(cbuf), words, lane);
        vq = cbuf + group_word<D / 4, STAGE2_PAD>(slot_word / 4, t);
    } else {
        vq = words + group_word<D / 4>(slot_word / 4, t);
    }
    float fac, bias;
    value_b_i8<D>(P, kvh, blk, sc + (pb - s0), valid, bbuf, lane, fac, bias);
    if constexpr (STAGED) {
        cp_async_wait<0>();
        __syncwarp();
    }
    int acc[D / 16][4];
#pragma unroll
    for (int m = 0; m < D / 16; m++)
#pragma unroll
        for (int x = 0; x < 4; x++) acc[m][x] = 0;
// k-steps unrolled: 1 spills least at the 80-register cap (24 B; all 4: 212 B).
#ifndef VALUE_I8_UNROLL
#define VALUE_I8_UNROLL 1
#endif
#pragma unroll VALUE_I8_UNROLL
    for (int kstep = 0; kstep < BLOCK_TOKENS / 32; kstep++) {
        const uint2 b = ((const uint2*)bbuf)[kstep * 32 + lane];
        // x[e][plane][k]: word k (quarter k) of the lane's slot, token quad 8 kstep + 4 e + t.
        u32 xa[NP][4], xb[NP][4];
#pragma unroll
        for (int hp = 0; hp < NP; hp++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const uint4 u = *(const uint4*)(vq + hp * PS + (8 * kstep + 4 * e) * QW);
                const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    const u32 v = slot_half ? w[(k + 2) & 3] : w[k];
                    if (e)
                        xb[hp][k] = v;
                    else
                        xa[hp][k] = v;
                }
            }
#pragma unroll
        for (int m = 0; m < D / 16; m++) {
            const int k = m >> 1, hm = m & 1;
            imma_16832_uu(acc[m], a_code<VB>(xa, k, hm, 0), a_code<VB>(xa, k, hm, 1), a_code<VB>(xb, k, hm, 0),
                          a_code<VB>(xb, k, hm, 1), b.x, b.y);
        }
    }
#pragma unroll
    for (int m = 0; m < D / 16; m++) {
        const int hm = m & 1;
        vacc[m][0] += (float)(256 * acc[m][0] + acc[m][1]) * (fac * unshift<VB>(a_shift<VB>(hm, 0))) + bias;
        vacc[m][1] += (float)(256 * acc[m][2] + acc[m][3]) * (fac * unshift<VB>(a_shift<VB>(hm, 1))) + bias;
    }
    if constexpr (STAGED) __syncwarp();
}

// Adds a warp's tc_value_block_i8 sums to its slot `wacc` ([D]): m-tile m is channels 16 m +
// [0, 16) of quarter m / 2 (rows g, g + 8), whose sums lane (g, t) holds when t = m / 2.
template <int D>
__device__ __forceinline__ void tc_value_store_i8(const float (&vacc)[D / 16][2], float* wacc, int lane) {
    const int g = lane >> 2, t = lane & 3;
    __syncwarp();
#pragma unroll
    for (int m = 0; m < D / 16; m++) {
        if ((m >> 1) == t) {
            wacc[16 * m + g] += vacc[m][0];
            wacc[16 * m + g + 8] += vacc[m][1];
        }
    }
}

// ---- Several query heads per CTA (GQA) on the integer tensor cores. The interleaved layout
// (key_word, value_word) puts each m-tile in one quarter, so one B operand
// per quarter serves all 16 rows and holds NG <= 4 heads: column 2h + part is head h's 16-bit
// fixed-point v, part 0 its high byte, part 1 its low one. Every lane's result is a score (or
// output) of its head t (one-head CTAs use a quarter of theirs). v is one FFMA per element:
// keys v = round(q^ s^), q^ = q / max|q| (the max per head once per CTA, q^ formed in the
// k-steps) and s^ = s FIX / max s over the quarter's channels (per block, shared by the
// heads); values v = round(p s^) (p <= 1).
// The mins' terms: keys by a small f16 MMA (mins x query fragments), values by a warp sum.
// Per block and lane ~1000 (keys) and ~1160 (values) SASS instructions, where dequantizing the
// codes to f16 for mma.sync m16n8k16 took ~1360 and ~1750 (GQA B = 32 T = 32K KIVI-2 on the
// H200: 450 -> 385 us, docs/benchmarks.md "Session 19"). 4-bit codes take the same B operands
// and twice the code words (two planes).

// k-steps unrolled in tc_key_block_heads and tc_value_block_heads. All 4: Nsight Compute (GQA
// B = 32 T = 32K KIVI-2) put 15 % of the stall samples on instruction fetch, but 1 measured
// slower (µs, 4 -> 1: that shape 406 -> 411, B = 8 T = 32K 119 -> 125, B = 32 T = 4K 83 -> 87).
#ifndef HEADS_UNROLL
#define HEADS_UNROLL 4
#endif
// 4-bit blocks in four-warp CTAs that form B once (PRE): 2. Measured on the H200 after the
// chunk-major code layout (GQA KIVI-4, us, 4 / 2, best of two rounds each; session 31: B = 32
// T = 32K 390.5 / 367.0, T = 16K 207.3 / 194.7, T = 4K 69.1 / 65.0, B = 8 T = 32K 111.8 / 105.4;
// session 32: B = 32 T = 32K 386.5 / 361.8, T = 16K 205.2 / 192.6, T = 4K 68.5 / 63.1, B = 8
// T = 16K 61.2 / 55.0). The 2-bit blocks lost 6-11 % with 2 (B = 32 T = 32K 269.9 / 298.0), and
// HEADS_AHEAD4 = 2 on top of it cost 6-24 % at B = 8 and 32 (B = 32 T = 32K 361.8 -> 448.0).
#ifndef HEADS_UNROLL4_PRE
#define HEADS_UNROLL4_PRE 2
#endif
#define HEADS_UNROLL_OF(BITS, PRE) ((BITS) == 4 && (PRE) ? HEADS_UNROLL4_PRE : HEADS_UNROLL)
// k-steps ahead that tc_key_block_heads and tc_value_block_heads load their code words: 1 or
// 2; 0: 1 in four-warp D = 128 CTAs without pre-formed B operands (PRE), else 2. Measured on
// the H200 (session 20, us, 2 / 1): four-warp D = 128 GQA B = 32 T = 32K 355.8 / 348.3, T = 16K
// 191.5 / 187.2; one-warp GQA serving B = 1024 T = 330 264.8 / 270.4; SmolLM2 9/3/64 B = 256
// T = 8K 177.5 / 181.5. With PRE (session 21): B = 32 T = 32K 306.0 / 308.9, T = 16K
// 166.0 / 167.6, B = 8 T = 32K 90.6 / 90.9.
#ifndef HEADS_AHEAD
#define HEADS_AHEAD 0
#endif
// 4-bit codes (twice the words per k-step): HEADS_AHEAD4; 0: 1 with PRE, else the rule above.
// Measured on the H200 (session 29, GQA KIVI-4 four-warp D = 128 with PRE, us, 2 / 1): B = 32
// T = 32K 433.8 / 418.5, B = 8 T = 32K 122.2 / 117.8, B = 32 T = 4K 74.8 / 75.3.
#ifndef HEADS_AHEAD4
#define HEADS_AHEAD4 0
#endif
template <int D, int W, bool PRE, int BITS = 2>
__device__ __forceinline__ constexpr int heads_ahead() {
    return BITS == 4 && HEADS_AHEAD4 > 0 ? HEADS_AHEAD4
           : BITS == 4 && PRE            ? 1
           : HEADS_AHEAD > 0             ? HEADS_AHEAD
           : W == 1 || D == 64 || PRE    ? 2
                                         : 1;
}
// How tc_key_block_heads / tc_value_block_heads load their code words: 0 plain (ld.global),
// 1 L2 only (ld.global.cg), 2 not allocated in L1 (ld.global.nc.L1::no_allocate): each word is
// read once, and Nsight Compute put the four-head kernels' L1/TEX throughput at 76-83 %
// (shared memory and these loads). Measured on the H200 (session 29, GQA 32/8/128, us, 0 / 1 /
// 2): KIVI-4 B = 32 T = 32K 420.2 / 419.6 / 402.1, B = 8 T = 32K 118.9 / 118.7 / 114.7, B = 32
// T = 4K 76.1 / 78.9 / 74.9; KIVI-2 B = 32 T = 32K 285.2 / 282.7 / 281.3, T = 4K 55.3 / 55.9 /
// 52.3.
#ifndef HEADS_LOAD
#define HEADS_LOAD 2
#endif
__device__ __forceinline__ uint4 heads_load(const u32* p) {
#if HEADS_LOAD == 1 && !defined(KIVI_EMU)
    uint4 v;
    asm("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
#elif HEADS_LOAD == 2 && !defined(KIVI_EMU)
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
#else
    return *(const uint4*)p;
#endif
}
// A lane's two 16-byte code words of each k-step x of tc_key_block_heads / tc_value_block_heads
// (rows 8x and 8x + 4 of ROW words from p) in each of NP planes (PLANE words apart), loaded
// AHEAD k-steps ahead.
template <int AHEAD, int KS, int ROW, int NP = 1, int PLANE = 0>
struct AheadWords {
    const u32* p;
    uint4 w0[NP], w1[NP], n0[NP], n1[NP];  // the next k-step's words, and (AHEAD 2) the one after's
    __device__ __forceinline__ explicit AheadWords(const u32* p_) : p(p_) {
#pragma unroll
        for (int hp = 0; hp < NP; hp++) {
            w0[hp] = n0[hp] = heads_load(p + hp * PLANE);
            w1[hp] = n1[hp] = heads_load(p + hp * PLANE + 4 * ROW);
            if (AHEAD > 1) {
                n0[hp] = heads_load(p + hp * PLANE + 8 * ROW);
                n1[hp] = heads_load(p + hp * PLANE + (8 + 4) * ROW);
            }
        }
    }
    // k-step x's words into c0, c1, after issuing k-step x + AHEAD's loads (the last k-steps
    // load their own words again).
    __device__ __forceinline__ void next(int x, uint4 (&c0)[NP], uint4 (&c1)[NP]) {
        const int xn = x + AHEAD < KS ? x + AHEAD : x;
#pragma unroll
        for (int hp = 0; hp < NP; hp++) {
            const uint4 l0 = heads_load(p + hp * PLANE + 8 * xn * ROW);
            const uint4 l1 = heads_load(p + hp * PLANE + (8 * xn + 4) * ROW);
            c0[hp] = w0[hp];
            c1[hp] = w1[hp];
            if (AHEAD > 1) {
                w0[hp] = n0[hp];
                w1[hp] = n1[hp];
                n0[hp] = l0;
                n1[hp] = l1;
            } else {
                w0[hp] = l0;
                w1[hp] = l1;
            }
        }
    }
};
// round(x y) + F32_MAGIC (+ 128 for keys' high bytes): the integer in the low 16 bits of the
// float's bits (|x y| < 2^22).
#define F32_MAGIC 12582912.0f
// Bytes `sel` (0x0040: byte 0; 0x0051: byte 1) of four such floats, in one register.
__device__ __forceinline__ u32 fixed_bytes(float v0, float v1, float v2, float v3, u32 sel) {
    return prmt(prmt(__float_as_uint(v0), __float_as_uint(v1), sel), prmt(__float_as_uint(v2), __float_as_uint(v3), sel),
                0x5410u);
}
// The B operand registers of one quarter: x^ (the lane's head) times s^ of 8 elements (k rows
// 4t..4t+3 and 16 + 4t..), as the lane's part.
__device__ __forceinline__ void fixed_b(const float4& xa, const float4& xb, const float4& sa, const float4& sb,
                                        float magic, u32 sel, u32& b0, u32& b1) {
    b0 = fixed_bytes(fmaf(xa.x, sa.x, magic), fmaf(xa.y, sa.y, magic), fmaf(xa.z, sa.z, magic),
                     fmaf(xa.w, sa.w, magic), sel);
    b1 = fixed_bytes(fmaf(xb.x, sb.x, magic), fmaf(xb.y, sb.y, magic), fmaf(xb.z, sb.z, magic),
                     fmaf(xb.w, sb.w, magic), sel);
}
// The four IMMAs of quarter j's two m-tiles (2j, 2j + 1) in one k-step: A from word j of the
// lane's words (a_code).
template <bool B_SIGNED, int BITS>
__device__ __forceinline__ void quarter_immas(int (&acc0)[4], int (&acc1)[4], const u32 (&xa)[BITS / 2][4],
                                              const u32 (&xb)[BITS / 2][4], int j, u32 b0, u32 b1) {
    imma_16832<B_SIGNED>(acc0, a_code<BITS>(xa, j, 0, 0), a_code<BITS>(xa, j, 0, 1), a_code<BITS>(xb, j, 0, 0),
                         a_code<BITS>(xb, j, 0, 1), b0, b1);
    imma_16832<B_SIGNED>(acc1, a_code<BITS>(xa, j, 1, 0), a_code<BITS>(xa, j, 1, 1), a_code<BITS>(xb, j, 1, 0),
                         a_code<BITS>(xb, j, 1, 1), b0, b1);
}
// A lane's k-step words (AheadWords::next) as x[plane][quarter], for D = 64 values (slot_half)
// the words of the lane's slot.
template <int NP>
__device__ __forceinline__ void heads_words(const uint4 (&c)[NP], bool slot_half, u32 (&x)[NP][4]) {
#pragma unroll
    for (int hp = 0; hp < NP; hp++) {
        const u32 w[4] = {c[hp].x, c[hp].y, c[hp].z, c[hp].w};
#pragma unroll
        for (int k = 0; k < 4; k++) x[hp][k] = slot_half ? w[(k + 2) & 3] : w[k];
    }
}

// 1: four-warp CTAs of four heads at D = 128 form a block's B operands once, before its
// k-steps (PRE_B, see pre_b_at): each product q^ s^ (p s^) once per warp, both its bytes from one
// FFMA, in shared memory for the k-steps' IMMAs, where in the k-steps each lane formed its
// column's 8 values per quarter and its partner lane (the other byte) the same 8 products.
// Measured on the H200 (session 21, GQA KIVI-2, us): B = 32 T = 32K 345.1 -> 308.6, T = 16K
// 185.1 -> 168.4, T = 4K 71.2 -> 63.8, B = 8 T = 32K 100.2 -> 90.9; B = 1 and short contexts
// within 1 %.
#ifndef PRE_B
#define PRE_B 1
#endif
// The warp's pre-formed B operands (PRE_B): k-steps 0 and 1 in `lo`, 2 and 3 in `hi`, 512
// words each. The lane (g, t) of the k-steps reads its column g of k-step x as two 16-byte
// words, pre_b_at(.., x, t, g, jp) for jp = 0, 1: quarters 2jp and 2jp + 1, each (b0, b1) =
// (rows 4t..4t + 3, rows 16 + 4t..), the register pairs of its IMMAs. Lane l writes them for
// x = l >> 3, t = l & 3, jp = (l >> 2) & 1: it owns rows (channels or tokens) 32x + 4t + 16b + i
// (b, i < 2, 4) of quarters 2jp and 2jp + 1. The swizzle makes both conflict-free.
__device__ __forceinline__ u32* pre_b_at(u32* lo, u32* hi, int x, int t, int g, int jp) {
    return (x < 2 ? lo : hi) + (x & 1) * 256 + t * 64 + 8 * (g ^ (2 * t) ^ jp) + 4 * (jp ^ (t >> 1));
}
// 1: fixed_hi_lo joins two 16-bit integers by an IMAD (the FMA pipe, ~17 % busy) instead of a
// PRMT (the ALU pipe, the four-head kernels' busiest: 48 % of their instructions, 54 % of its
// cycles; Nsight Compute, GQA KIVI-2 B = 32 T = 32K). Measured on the H200 (session 32, GQA
// 32/8/128, B = 8, 32, T = 1K-32K, us, best of two rounds, 0 / 1): faster on all 16 shapes, by
// 0.1-2 % (KIVI-2 B = 32 T = 32K 268.7 / 267.8, B = 8 T = 1K 18.4 / 18.1; KIVI-4 B = 8 T = 1K
// 16.0 / 15.7).
#ifndef PACK_IMAD
#define PACK_IMAD 1
#endif
// The float bits of round(y) + F32_MAGIC are 0x4B400000 + round(y) for round(y) in [0, 2^16);
// with F32_MAGIC - 0x4B40 their low 16 bits are round(y) - 0x4B40, so that
// bits(b) * 0x10000 + bits(a) = round(y_b) << 16 | round(y_a) (mod 2^32).
#define PACK_MAGIC_SHIFT 19264.0f
// The ranges that keep it exact: values p s^ in [0, VAL_FIX], keys v + 128 + 2^15 with |v| <= KEY_FIX.
static_assert(VAL_FIX < 65536.0f && KEY_FIX + 128.0f < 32768.0f, "PACK_IMAD: fixed-point values past 16 bits");
// Bytes 1 (hi) and 0 (lo) of four floats round(x s) + magic, each in one register. (PACK_IMAD:
// magic must give values in [F32_MAGIC, F32_MAGIC + 2^16).)
__device__ __forceinline__ void fixed_hi_lo(const float4& x, const float (&s)[4], float magic, u32& hi, u32& lo) {
#if PACK_IMAD
    const u32 p01 = __float_as_uint(fmaf(x.y, s[1], magic - PACK_MAGIC_SHIFT)) * 0x10000u +
                    __float_as_uint(fmaf(x.x, s[0], magic));
    const u32 p23 = __float_as_uint(fmaf(x.w, s[3], magic - PACK_MAGIC_SHIFT)) * 0x10000u +
                    __float_as_uint(fmaf(x.z, s[2], magic));
#else
    const u32 p01 = prmt(__float_as_uint(fmaf(x.x, s[0], magic)), __float_as_uint(fmaf(x.y, s[1], magic)), 0x5410u);
    const u32 p23 = prmt(__float_as_uint(fmaf(x.z, s[2], magic)), __float_as_uint(fmaf(x.w, s[3], magic)), 0x5410u);
#endif
    hi = prmt(p01, p23, 0x7531u);
    lo = prmt(p01, p23, 0x6420u);
}
// Writes head h's two columns (2h: high bytes, 2h + 1: low) of the lane's rows and quarters
// (see pre_b_at) from x[b] (the lane's q^ or weights of head h, rows 4t + 16b + i) and
// sp[jj][b] (s^ of quarter 2jp + jj). KEYS: signed, v + 128 rounded so that the high byte is
// (v + 128) >> 8 and the low one, flipped, v - 256 hi in [-128, 127].
template <bool KEYS>
__device__ __forceinline__ void pre_b_head(u32* lo_, u32* hi_, int lane, int h, const float4 (&x)[2],
                                           const float (&sp)[2][2][4]) {
    // (PACK_IMAD: keys take v + 128 + 2^15 >= 0, whose high byte is then 128 more, mod 256, and
    // flipped back like the low one.)
    constexpr float magic = KEYS ? F32_MAGIC + 128.0f + (PACK_IMAD ? 32768.0f : 0.0f) : F32_MAGIC;
    u32 hi[2][2], lo[2][2];  // [jj][b]
#pragma unroll
    for (int jj = 0; jj < 2; jj++)
#pragma unroll
        for (int b = 0; b < 2; b++) {
            fixed_hi_lo(x[b], sp[jj][b], magic, hi[jj][b], lo[jj][b]);
            if (KEYS) lo[jj][b] ^= 0x80808080u;
            if (KEYS && PACK_IMAD) hi[jj][b] ^= 0x80808080u;
        }
    const int x_ = lane >> 3, t = lane & 3, jp = lane >> 2 & 1;
    *(uint4*)pre_b_at(lo_, hi_, x_, t, 2 * h, jp) = make_uint4(hi[0][0], hi[0][1], hi[1][0], hi[1][1]);
    *(uint4*)pre_b_at(lo_, hi_, x_, t, 2 * h + 1, jp) = make_uint4(lo[0][0], lo[0][1], lo[1][0], lo[1][1]);
}
// The eight IMMAs of k-step x (quarter j: m-tiles 2j, 2j + 1) with the pre-formed B operands of
// lane (g, t).
template <bool B_SIGNED, int BITS>
__device__ __forceinline__ void pre_b_kstep(int (&acc)[8][4], const u32 (&xa)[BITS / 2][4],
                                            const u32 (&xb)[BITS / 2][4], u32* lo, u32* hi, int x, int t, int g) {
    const uint4 b0 = *(const uint4*)pre_b_at(lo, hi, x, t, g, 0), b1 = *(const uint4*)pre_b_at(lo, hi, x, t, g, 1);
    quarter_immas<B_SIGNED, BITS>(acc[0], acc[1], xa, xb, 0, b0.x, b0.y);
    quarter_immas<B_SIGNED, BITS>(acc[2], acc[3], xa, xb, 1, b0.z, b0.w);
    quarter_immas<B_SIGNED, BITS>(acc[4], acc[5], xa, xb, 2, b1.x, b1.y);
    quarter_immas<B_SIGNED, BITS>(acc[6], acc[7], xa, xb, 3, b1.z, b1.w);
}
// Zero columns 2 NG..7 (heads >= NG) of the lane's rows.
template <int NG>
__device__ __forceinline__ void pre_b_zero(u32* lo_, u32* hi_, int lane) {
#pragma unroll
    for (int col = 2 * NG; col < 8; col++)
        *(uint4*)pre_b_at(lo_, hi_, lane >> 3, lane & 3, col, lane >> 2 & 1) = make_uint4(0u, 0u, 0u, 0u);
}
// Every lane's max over the 16 lanes of its jp ((lane >> 2) & 1) of a[0], a[1]; and all four
// quarters' maxima (a[jj]: quarter 2jp + jj) in q4.
__device__ __forceinline__ void pre_b_max(float (&a)[2], float (&q4)[4], int lane) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1)
#pragma unroll
        for (int jj = 0; jj < 2; jj++)
            if (o != 4) a[jj] = fmaxf(a[jj], __shfl_xor_sync(0xffffffffu, a[jj], o));
    const float o0 = __shfl_xor_sync(0xffffffffu, a[0], 4), o1 = __shfl_xor_sync(0xffffffffu, a[1], 4);
    const bool hi = lane >> 2 & 1;
    q4[0] = hi ? o0 : a[0];
    q4[1] = hi ? o1 : a[1];
    q4[2] = hi ? a[0] : o0;
    q4[3] = hi ? a[1] : o1;
}
// Timing experiments only (wrong results), 0/1 bits, 1: key blocks, 2: value blocks.
// UB_NO_MAX: each lane scales by its own maxima (no warp reduction); UB_NO_MINS: no mins' terms.
#ifndef UB_NO_MAX
#define UB_NO_MAX 0
#endif
#ifndef UB_NO_MINS
#define UB_NO_MINS 0
#endif
// 1: the split's softmax in four-warp CTAs of four heads (PRE_B) four scores per access, 2^x by
// MUFU.EX2 alone (fast_exp2). (In one-head kernels it made ptxas spill, session 21.) Measured on
// the H200 (session 23, GQA KIVI-2, us, 0 / 1): B = 32 T = 32K 288.8 / 286.7, B = 8 T = 32K
// 84.4 / 83.6; the pass's 7 M warp instructions of 122 M cost 6 % of the time (without it,
// Nsight Compute: 264.5 us against 281.7, half the instruction-fetch stalls).
#ifndef SOFTMAX4
#define SOFTMAX4 1
#endif
// 1: SOFTMAX4 in every four-warp CTA of four heads (4-bit and f16 caches too). Measured on the
// H200 (session 23, GQA 32/8/128, us, 0 / 1): KIVI-4 B = 32 T = 32K 439.7 / 435.3, B = 8
// T = 32K 133.4 / 132.0; f16 B = 8 T = 1K 19.4 / 19.1; all 24 shapes of B = 1-32, T = 1K-32K
// 0-1.6 % faster.
#ifndef SOFTMAX4_HEADS
#define SOFTMAX4_HEADS 1
#endif
// 1: SOFTMAX4's loops not unrolled (0: the compiler's choice), so that the pass's code (run once
// per split) takes less of the instruction cache that the block loops share: 328 instructions
// fewer; measured (session 23, us, 0 / 1) B = 32 T = 32K 286.2 / 283.9, T = 4K 56.0 / 54.6.
#ifndef PASS_COMPACT
#define PASS_COMPACT 1
#endif
#if PASS_COMPACT
#define PASS_LOOP _Pragma("unroll 1")
#else
#define PASS_LOOP
#endif
// UB_NO_SOFTMAX: no softmax pass (attn_split): the scores are the weights.
#ifndef UB_NO_SOFTMAX
#define UB_NO_SOFTMAX 0
#endif
// s^ = s fix / max s of the lane's quarters 2jp + jj (sv[2 jj + b][i]: rows 4t + 16b + i) into
// sp[jj][b][i]; a[jj]: the lane's maxima, reduced here; q4: all four quarters' maxima.
template <bool KEYS>
__device__ __forceinline__ void pre_b_scales(const float (&sv)[4][4], float (&a)[2], float fix, float (&q4)[4],
                                             float (&sp)[2][2][4], int lane) {
    if ((UB_NO_MAX & (KEYS ? 1 : 2)) == 0) {
        pre_b_max(a, q4, lane);
    } else {
        q4[0] = q4[2] = a[0];
        q4[1] = q4[3] = a[1];
    }
#pragma unroll
    for (int jj = 0; jj < 2; jj++) {
        const float inv = a[jj] > 0.0f ? __fdividef(fix, a[jj]) : 0.0f;
#pragma unroll
        for (int b = 0; b < 2; b++)
#pragma unroll
            for (int i = 0; i < 4; i++) sp[jj][b][i] = sv[2 * jj + b][i] * inv;
    }
}

// Key block blk's scales of the lane's channels 4 lane..4 lane + 3, every quarter. (Loading them
// one block ahead, in registers across blocks, measured slower on the H200: session 19, GQA
// B = 32 T = 32K 386 -> 390 us; the value blocks' likewise, with their sums then in shared
// memory for registers: 388 -> 423.)
template <int D>
__device__ __forceinline__ void key_block_scales(const CacheBufs& c, int kvh, u64 blk, int qshift, int lane,
                                                 uint2 (&s4)[4]) {
    const u16* ks = c.ks + blk * c.ksm_block + (u64)kvh * c.ksm_head + 4 * lane;
#pragma unroll
    for (int j = 0; j < 4; j++) s4[j] = 4 * lane < D ? *(const uint2*)(ks + (j >> qshift) * D) : make_uint2(0u, 0u);
}

// 1: four-warp CTAs of four heads (PRE_B) compute the mins' terms q . m of all their key blocks
// at the start of the key phase (key_mins_terms), not in each block (tc_key_block_heads): one
// m-tile of 16 quarter rows, where each block's own MMA used 4 rows of 16 and waited on its mins'
// loads. Measured on the H200 (session 23, GQA KIVI-2, us, 0 / 1): B = 32 T = 32K 292.2 / 287.4,
// B = 8 T = 32K 85.9 / 84.1; B = 1 within 0.5 %. (Without the mins' terms at all, timing only:
// 271 us.)
#ifndef KEY_MINS_AHEAD
#define KEY_MINS_AHEAD 1
#endif
// The mins' terms of the warp's key blocks (at most 4: the blocks warp, warp + W, .. of sblk,
// nb of them) as one m-tile: row r is quarter r & 3 of the warp's block r >> 2 (zero past nb).
// key_mins_load: A, the rows' mins in the query fragments' channel order (F16_ROWS: k-steps 2j
// and 2j + 1 of lane (g, t) are channels 32j + 8t..32j + 8t + 7, one 16-byte load), a[r][x]:
// rows g + 8r of k-step x.
template <int D, int W>
__device__ __forceinline__ void key_mins_load(const CacheBufs& c, int kvh, const int* sblk, int warp, int nb,
                                              int qshift, int lane, u32 (&a)[2][D / 16][2]) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = g + 8 * r, bi = row >> 2;
        const bool on = bi < nb;
        const u64 blk = (u64)sblk[on ? warp + W * bi : 0];
        const u16* km = c.km + blk * c.ksm_block + (u64)kvh * c.ksm_head + ((row & 3) >> qshift) * D + 8 * t;
#pragma unroll
        for (int j = 0; j < D / 32; j++) {
            const uint4 v = on ? *(const uint4*)(km + 32 * j) : make_uint4(0u, 0u, 0u, 0u);
            a[r][2 * j][0] = v.x;
            a[r][2 * j][1] = v.y;
            a[r][2 * j + 1][0] = v.z;
            a[r][2 * j + 1][1] = v.w;
        }
    }
}
// key_mins_terms: B = the query fragments; lane (g, t) gets head t's terms of rows g (m[0]) and
// g + 8 (m[1]), times scale_log2.
template <int D>
__device__ __forceinline__ void key_mins_terms(const AttnParams& P, const u32 (&a)[2][D / 16][2], const uint2* qf,
                                               int lane, float (&m)[2]) {
    // Two accumulators: two chains of D / 32 MMAs.
    float mc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int x = 0; x < D / 16; x++) {
        const uint2 b = qf[x * 32 + lane];
        mma_16816(mc[x & 1], a[0][x][0], a[1][x][0], a[0][x][1], a[1][x][1], b.x, b.y);
    }
    // c0 / c1: row g's high / low parts of head t; c2 / c3: row g + 8's.
    m[0] = (mc[0][0] + mc[1][0] + mc[0][1] + mc[1][1]) * P.scale_log2;
    m[1] = (mc[0][2] + mc[1][2] + mc[0][3] + mc[1][3]) * P.scale_log2;
}

// Scores of one whole quantized key block (KB bits) for the CTA's NG heads, by one warp. sq: [NG][D] q,
// sqmax: [NG] max|q|, sqinv: [NG] 1 / max|q|, qhat (QHAT): [NG + 1][D] q^ = q sqinv and a row
// of zeros (else q^ is formed here: the copy made one-warp CTAs of GQA serving shapes one wave
// too many, see QF_IN_SACC), qf: the query's f16 B fragments (query_fragments, F16_ROWS), wbuf: the
// warp's [4][D] floats (PRE: its B operands of k-steps 2-3, pre_lo those of 0-1, see pre_b_at).
// mterm, bi (PRE with KEY_MINS_AHEAD): the mins' terms of the warp's blocks (key_mins_terms) and
// this block's index among them.
// Lane (g, t) holds, in m-tile m = 2j + hm (tokens 32j + 16hm + [0, 16)),
// rows g and g + 8 and, in the 32-channel k-step x, channels 32x + 4t + i (a0, a1) and + 16 (a2,
// a3); its results are head t's.
template <int D, int KB, int NG, bool QHAT, int AHEAD, bool PRE = false>
__device__ __forceinline__ void tc_key_block_heads(const AttnParams& P, int kvh, u64 blk, int pb, int s0, int valid,
                                                   int qshift, const float* sq, const float* sqmax,
                                                   const float* sqinv, const float* qhat, const uint2* qf,
                                                   float* wbuf, float* sc, int lane, u32* pre_lo = nullptr,
                                                   const float (&mterm)[2] = {0.0f, 0.0f}, int bi = 0) {
    const CacheBufs& c = P.c;
    constexpr int KS = D / 32;
    constexpr bool MINS_AHEAD = PRE && KEY_MINS_AHEAD;
    const int g = lane >> 2, t = lane & 3, h = g >> 1, part = g & 1;
    // The lane's code words: slot g of channel quads 8x + 4e + t (4-bit: in both planes).
    constexpr int NP = KB / 2;
    AheadWords<AHEAD, KS, 32, NP, 8 * D> cw(c.kq + blk * c.kq_block + (u64)kvh * c.kq_head + group_word<32>(g, t));
    // s^ of every quarter: lane l takes channels 4l..4l + 3 (PRE: see pre_b_at).
    const int ch = 4 * lane;
    const bool has = ch < D;
    const u64 sm = blk * c.ksm_block + (u64)kvh * c.ksm_head;
    uint2 s4[4];
    if constexpr (PRE) {
        static_assert(D == 128 && QHAT, "PRE_B: D = 128, q^ given");
        const u16* ks = c.ks + sm + 32 * (lane >> 3) + 4 * (lane & 3);
#pragma unroll
        for (int jj = 0; jj < 2; jj++)
#pragma unroll
            for (int b = 0; b < 2; b++)
                s4[2 * jj + b] = *(const uint2*)(ks + ((2 * (lane >> 2 & 1) + jj) >> qshift) * D + 16 * b);
    } else {
        key_block_scales<D>(c, kvh, blk, qshift, lane, s4);
    }
    // The mins' loads, for the MMA below: in the query fragments' channel order (F16_ROWS),
    // k-steps 2j and 2j + 1 of lane (g, t) are channels 32j + 8t..32j + 8t + 7, one 16-byte load
    // (four 4-byte ones per 32 channels were 2 sectors over the ideal each, Nsight Compute).
    u32 ma[D / 16][2];
    if constexpr (!MINS_AHEAD) {
        const u16* km = c.km + sm + (g >> qshift) * D + 8 * t;
#pragma unroll
        for (int j = 0; j < D / 32; j++) {
            const uint4 v = g < 4 ? *(const uint4*)(km + 32 * j) : make_uint4(0u, 0u, 0u, 0u);
            ma[2 * j][0] = v.x;
            ma[2 * j][1] = v.y;
            ma[2 * j + 1][0] = v.z;
            ma[2 * j + 1][1] = v.w;
        }
    }
    float sv[4][4], amax[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const uint2 s2 = s4[j];
        sv[j][0] = h2f((u16)s2.x);
        sv[j][1] = h2f((u16)(s2.x >> 16));
        sv[j][2] = h2f((u16)s2.y);
        sv[j][3] = h2f((u16)(s2.y >> 16));
        amax[j] = fmaxf(fmaxf(sv[j][0], sv[j][1]), fmaxf(sv[j][2], sv[j][3]));
    }
    // Mins' terms q . m: A = quarter g's mins (rows g < 4), B = the query fragments; lane (g, t)
    // ends with quarter g's, head t's in c0 (high part) + c1 (low part). (Here, in flight with
    // the scales' loads; after the scales' reduction it measured 1 % slower.)
    float mc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if constexpr (!MINS_AHEAD) {
#pragma unroll
        for (int x = 0; x < D / 16; x++) {
            const uint2 b = qf[x * 32 + lane];
            if ((UB_NO_MINS & 1) == 0) mma_16816(mc, ma[x][0], 0u, ma[x][1], 0u, b.x, b.y);
        }
    }
    float smax[4];
    if constexpr (PRE) {
        // (sv[2 jj + b]: quarter 2jp + jj, rows 4t + 16b + i. An unwritten quarter past `valid`
        // may give NaN here: only its own rows, unused.)
        float a2[2] = {fmaxf(amax[0], amax[1]), fmaxf(amax[2], amax[3])}, sp[2][2][4];
        pre_b_scales<true>(sv, a2, KEY_FIX, smax, sp, lane);
        __syncwarp();  // the previous block's readers of wbuf are done
        const float* qrow = qhat + 32 * (lane >> 3) + 4 * (lane & 3);
#pragma unroll
        for (int hh = 0; hh < NG; hh++) {
            const float4 x[2] = {*(const float4*)(qrow + hh * D), *(const float4*)(qrow + hh * D + 16)};
            pre_b_head<true>(pre_lo, (u32*)wbuf, lane, hh, x, sp);
        }
        // (Heads >= NG: zero columns; v + 128 of v = 0 has high byte 0 and low byte 128, flipped 0.)
        pre_b_zero<NG>(pre_lo, (u32*)wbuf, lane);
    } else {
        const float xmax = reduce4<true>(amax, lane);
#pragma unroll
        for (int j = 0; j < 4; j++) smax[j] = __shfl_sync(0xffffffffu, xmax, 8 * j);
        __syncwarp();  // the previous block's readers of wbuf are done
        if (has) {
#pragma unroll
            for (int j = 0; j < 4; j++) {
                // (An unwritten quarter past `valid` may give NaN here: only its own rows, unused.)
                const float inv = smax[j] > 0.0f ? __fdividef(KEY_FIX, smax[j]) : 0.0f;
                *(float4*)(wbuf + j * D + ch) =
                    make_float4(sv[j][0] * inv, sv[j][1] * inv, sv[j][2] * inv, sv[j][3] * inv);
            }
        }
    }
    const float qm = sqmax[t < NG ? t : 0] * (P.scale_log2 / KEY_FIX);
    float fac[4], bias[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        fac[j] = smax[j] * qm;
        // (MINS_AHEAD: row 4 (bi & 1) + j of mterm[bi >> 1], see key_mins_terms.)
        if constexpr (MINS_AHEAD)
            bias[j] = __shfl_sync(0xffffffffu, bi < 2 ? mterm[0] : mterm[1], 4 * (4 * (bi & 1) + j) + t);
        else
            bias[j] = __shfl_sync(0xffffffffu, mc[0] + mc[1], 4 * j + t) * P.scale_log2;
    }
    __syncwarp();  // wbuf written
    // Lanes of heads >= NG (NG < 4) give zero columns.
    const float* qn = QHAT ? qhat + (h < NG ? h : NG) * D + 4 * t : sq + (h < NG ? h : 0) * D + 4 * t;
    const float qon = QHAT ? 1.0f : h < NG ? sqinv[h] : 0.0f;
    const u32 sel = part ? 0x0040u : 0x0051u;
    const float magic = part ? F32_MAGIC : F32_MAGIC + 128.0f;
    int acc[8][4];
#pragma unroll
    for (int m = 0; m < 8; m++)
#pragma unroll
        for (int x = 0; x < 4; x++) acc[m][x] = 0;
#pragma unroll(HEADS_UNROLL_OF(KB, PRE))
    for (int x = 0; x < KS; x++) {
        uint4 c0[NP], c1[NP];
        cw.next(x, c0, c1);
        u32 xa[NP][4], xb[NP][4];
        heads_words<NP>(c0, false, xa);
        heads_words<NP>(c1, false, xb);
        if constexpr (PRE) {
            pre_b_kstep<true, KB>(acc, xa, xb, pre_lo, (u32*)wbuf, x, t, g);
            continue;
        }
        float4 qa = *(const float4*)(qn + 32 * x), qb = *(const float4*)(qn + 32 * x + 16);
        if constexpr (!QHAT) {
            qa = make_float4(qa.x * qon, qa.y * qon, qa.z * qon, qa.w * qon);
            qb = make_float4(qb.x * qon, qb.y * qon, qb.z * qon, qb.w * qon);
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const float* sj = wbuf + j * D + 32 * x + 4 * t;
            u32 b0, b1;
            fixed_b(qa, qb, *(const float4*)sj, *(const float4*)(sj + 16), magic, sel, b0, b1);
            quarter_immas<true, KB>(acc[2 * j], acc[2 * j + 1], xa, xb, j, b0, b1);
        }
    }
    // c0 / c1: head t's high / low parts of row g (token 16m + g); c2 / c3: row g + 8.
    if (t < NG) {
        float* row = sc + t * P.sc_stride + (pb - s0) + g;
#pragma unroll
        for (int m = 0; m < 8; m++) {
            const int j = m >> 1, hm = m & 1;
            if (16 * m + g < valid)
                row[16 * m] =
                    (float)(256 * acc[m][0] + acc[m][1]) * (fac[j] * unshift<KB>(a_shift<KB>(hm, 0))) + bias[j];
            if (16 * m + g + 8 < valid)
                row[16 * m + 8] =
                    (float)(256 * acc[m][2] + acc[m][3]) * (fac[j] * unshift<KB>(a_shift<KB>(hm, 1))) + bias[j];
        }
    }
}

// Adds one whole quantized value block's (VB bits) weighted sums for the CTA's NG heads to vacc, by one warp
// (sc: the split's weights [NG][sc_stride], plain floats; wbuf: the warp's [4][128] floats;
// PRE: wbuf and pre_lo hold the block's B operands, see pre_b_at).
// Lane (g, t) holds, in m-tile m = 2j + hm (channels 16m + [0, 16) of quarter j), rows g and
// g + 8 and, in the 32-token k-step x, tokens 32x + 4t + i (a0, a1) and + 16 (a2, a3); its
// results are head t's: vacc[m][0] channel 16m + g, vacc[m][1] channel 16m + g + 8.
template <int D, int VB, int NG, int AHEAD, bool PRE = false>
__device__ __forceinline__ void tc_value_block_heads(const AttnParams& P, int kvh, u64 blk, int pb, int s0, int valid,
                                                     const float* sc, float* wbuf, float (&vacc)[D / 16][2],
                                                     float (&pm)[4 * (D / 32)], int lane, u32* pre_lo = nullptr) {
    const CacheBufs& c = P.c;
    constexpr int NQ = D / 32;
    const int g = lane >> 2, t = lane & 3, h = g >> 1, part = g & 1;
    // The lane's code words: slot g of token quads 8x + 4e + t (D = 64: the half g & 1; 4-bit:
    // in both planes).
    constexpr int NP = VB / 2;
    const bool slot_half = (g * (D / 4)) % 32 != 0;
    AheadWords<AHEAD, 4, D / 4, NP, 8 * D> cw(c.vq + blk * c.vq_block + (u64)kvh * c.vq_head +
                                              group_word<D / 4>((g * (D / 4)) / 32, t));
    // s^ and the mins' terms: lane l takes tokens 4l..4l + 3 (past `valid`: scale and min 0,
    // whatever other paths or unwritten memory hold there; the weights are finite there, other
    // paths' or the softmax's zeros past the split's end, so that they add nothing).
    const int gpt = D / c.group;
    const float* w = sc + (pb - s0);
    float fac[NQ];
    if constexpr (PRE) {
        static_assert(D == 128, "PRE_B: D = 128");
        // The lane's tokens 32x + 4t + 16b + i and quarters 2jp + jj (see pre_b_at); pm in
        // quarters 2jp + jj at 4jj + h (tc_value_store_heads puts them in place).
        const int tk = 32 * (lane >> 3) + 4 * (lane & 3), jp = lane >> 2 & 1;
        const u64 sm = blk * c.vsm_block + (u64)kvh * c.vsm_head;
        u32 s4[2][4][2], m4[2][4][2];
        float4 pw[NG][2];
        float pv[NG][2][4];
#pragma unroll
        for (int b = 0; b < 2; b++) {
            quarter_halves4<D>(c.vs + sm + (u64)(tk + 16 * b) * gpt, gpt, s4[b]);
            quarter_halves4<D>(c.vm + sm + (u64)(tk + 16 * b) * gpt, gpt, m4[b]);
#pragma unroll
            for (int hh = 0; hh < NG; hh++) {
                pw[hh][b] = *(const float4*)(w + hh * P.sc_stride + tk + 16 * b);
                pv[hh][b][0] = pw[hh][b].x;
                pv[hh][b][1] = pw[hh][b].y;
                pv[hh][b][2] = pw[hh][b].z;
                pv[hh][b][3] = pw[hh][b].w;
            }
        }
        float sv[4][4], amax[2] = {0.0f, 0.0f};  // [2 jj + b][i]
#pragma unroll
        for (int b = 0; b < 2; b++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const bool ok = tk + 16 * b + i < valid;
#pragma unroll
                for (int jj = 0; jj < 2; jj++) {
                    const u32 sw = jp ? s4[b][i][1] : s4[b][i][0], mw = jp ? m4[b][i][1] : m4[b][i][0];
                    const float sj = ok ? h2f((u16)(sw >> (16 * jj))) : 0.0f;
                    const float mj = ok ? h2f((u16)(mw >> (16 * jj))) : 0.0f;
                    sv[2 * jj + b][i] = sj;
                    amax[jj] = fmaxf(amax[jj], sj);
#pragma unroll
                    for (int hh = 0; hh < NG; hh++)
                        if ((UB_NO_MINS & 2) == 0) pm[4 * jj + hh] += pv[hh][b][i] * mj;
                }
            }
        float smax[4], sp[2][2][4];
        pre_b_scales<false>(sv, amax, VAL_FIX, smax, sp, lane);
#pragma unroll
        for (int j = 0; j < NQ; j++) fac[j] = smax[j] * (1.0f / VAL_FIX);
        __syncwarp();  // the previous block's readers of wbuf are done
#pragma unroll
        for (int hh = 0; hh < NG; hh++) pre_b_head<false>(pre_lo, (u32*)wbuf, lane, hh, pw[hh], sp);
        pre_b_zero<NG>(pre_lo, (u32*)wbuf, lane);
    } else {
        const u64 sm = blk * c.vsm_block + (u64)kvh * c.vsm_head + (u64)(4 * lane) * gpt;
        u32 s4[4][2], m4[4][2];
        quarter_halves4<D>(c.vs + sm, gpt, s4);
        quarter_halves4<D>(c.vm + sm, gpt, m4);
        float pw[NG][4];
#pragma unroll
        for (int hh = 0; hh < NG; hh++) {
            const float4 v = *(const float4*)(w + hh * P.sc_stride + 4 * lane);
            pw[hh][0] = v.x;
            pw[hh][1] = v.y;
            pw[hh][2] = v.z;
            pw[hh][3] = v.w;
        }
        // The mins' terms p . m add up over the split's blocks (pm: per lane, quarter j and head h
        // at 4j + h; summed over the warp by tc_value_store_heads).
        float sv[NQ][4], amax[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const bool ok = 4 * lane + i < valid;
#pragma unroll
            for (int j = 0; j < NQ; j++) {
                const float sj = ok ? h2f((u16)(s4[i][j >> 1] >> (16 * (j & 1)))) : 0.0f;
                const float mj = ok ? h2f((u16)(m4[i][j >> 1] >> (16 * (j & 1)))) : 0.0f;
                sv[j][i] = sj;
                amax[j] = fmaxf(amax[j], sj);
#pragma unroll
                for (int hh = 0; hh < NG; hh++) pm[4 * j + hh] += pw[hh][i] * mj;
            }
        }
        const float xmax = reduce4<true>(amax, lane);
        __syncwarp();  // the previous block's readers of wbuf are done
#pragma unroll
        for (int j = 0; j < NQ; j++) {
            const float smax = __shfl_sync(0xffffffffu, xmax, 8 * j);
            const float inv = smax > 0.0f ? __fdividef(VAL_FIX, smax) : 0.0f;
            fac[j] = smax * (1.0f / VAL_FIX);
            *(float4*)(wbuf + j * 128 + 4 * lane) = make_float4(sv[j][0] * inv, sv[j][1] * inv, sv[j][2] * inv, sv[j][3] * inv);
        }
    }
    __syncwarp();  // wbuf written
    const float* pl = w + (h < NG ? h : 0) * P.sc_stride + 4 * t;
    const bool head_on = h < NG;  // lanes of heads >= NG (NG < 4) give zero columns
    const u32 sel = part ? 0x0040u : 0x0051u;
    int acc[D / 16][4];
#pragma unroll
    for (int m = 0; m < D / 16; m++)
#pragma unroll
        for (int x = 0; x < 4; x++) acc[m][x] = 0;
#pragma unroll(HEADS_UNROLL_OF(VB, PRE))
    for (int x = 0; x < 4; x++) {
        uint4 c0[NP], c1[NP];
        cw.next(x, c0, c1);
        u32 xa[NP][4], xb[NP][4];
        heads_words<NP>(c0, slot_half, xa);
        heads_words<NP>(c1, slot_half, xb);
        if constexpr (PRE) {
            pre_b_kstep<false, VB>(acc, xa, xb, pre_lo, (u32*)wbuf, x, t, g);
            continue;
        }
        // (Past `valid` the weights are finite and s^ zero: B zero there, with no selects, where
        // they took 48 instructions per block.)
        float4 pa = *(const float4*)(pl + 32 * x), pb4 = *(const float4*)(pl + 32 * x + 16);
        if (NG < 4 && !head_on) pa = pb4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
        for (int j = 0; j < NQ; j++) {
            const float* sj = wbuf + j * 128 + 32 * x + 4 * t;
            u32 b0, b1;
            fixed_b(pa, pb4, *(const float4*)sj, *(const float4*)(sj + 16), F32_MAGIC, sel, b0, b1);
            quarter_immas<false, VB>(acc[2 * j], acc[2 * j + 1], xa, xb, j, b0, b1);
        }
    }
#pragma unroll
    for (int m = 0; m < D / 16; m++) {
        const int j = m >> 1, hm = m & 1;
        vacc[m][0] += (float)(256 * acc[m][0] + acc[m][1]) * (fac[j] * unshift<VB>(a_shift<VB>(hm, 0)));
        vacc[m][1] += (float)(256 * acc[m][2] + acc[m][3]) * (fac[j] * unshift<VB>(a_shift<VB>(hm, 1)));
    }
}

// Adds a warp's tc_value_block_heads sums and mins' terms to its slot `wacc` ([NG][D]).
template <int D, int NG, bool PRE = false>
__device__ __forceinline__ void tc_value_store_heads(const float (&vacc)[D / 16][2], float (&pm)[4 * (D / 32)],
                                                     float* wacc, int lane) {
    const int g = lane >> 2, t = lane & 3;
    if constexpr (PRE) {
        // pm[4jj + h]: quarter 2jp + jj (tc_value_block_heads): in place.
        const bool hi = lane >> 2 & 1;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            pm[k + 8] = hi ? pm[k] : 0.0f;
            pm[k] = hi ? 0.0f : pm[k];
        }
    }
    __syncwarp();
    const float xsum = transpose_reduce<4 * (D / 32)>(pm, lane);  // lane 4j + h: quarter j, head h
    float bias[D / 32];
#pragma unroll
    for (int j = 0; j < D / 32; j++) bias[j] = __shfl_sync(0xffffffffu, xsum, 4 * j + t);
    if (t < NG) {
#pragma unroll
        for (int m = 0; m < D / 16; m++) {
            // (PRE: the slot held the B operands; this first write covers it.)
            float* o = wacc + t * D + 16 * m + g;
            o[0] = (PRE ? 0.0f : o[0]) + vacc[m][0] + bias[m >> 1];
            o[8] = (PRE ? 0.0f : o[8]) + vacc[m][1] + bias[m >> 1];
        }
    }
}

// 1: four-warp GQA CTAs form q^ once (attn_split), not per key block.
#ifndef QHAT_FOUR_WARPS
#define QHAT_FOUR_WARPS 1
#endif

// 1: in 2-bit key kernels, key chunks of window rows and new tokens only take a compact loop
// (attn_split). Measured on the H200: KIVI-2 MHA B = 1024 T = 330 R = 32 757 -> 698 us, R = 128
// 780 -> 732, B = 32 T = 32K 1441 -> 1384; but KIVI-4 B = 32 T = 32K 1563 -> 1720, B = 256
// T = 330 231 -> 249 (the 4-bit kernels' hot loops came out slower), so not there.
#ifndef COMPACT_ROWS
#define COMPACT_ROWS 1
#endif

// The lane's part of the query heads' dot products with 8 key rows loaded raw (f16 pairs, or f32
// where is_f32).
template <int CPL, int NG>
__device__ __forceinline__ void key_dots(const u32 (&raw)[8][CPL], const bool (&is_f32)[8], const float (&qr)[NG][CPL],
                                         float (&part8)[NG][8]) {
#pragma unroll
    for (int k = 0; k < 8; k++) {
        float kv[CPL];
        raw_to_float<CPL>(raw[k], is_f32[k], kv);
#pragma unroll
        for (int g = 0; g < NG; g++) {
            float a = 0.0f;
#pragma unroll
            for (int x = 0; x < CPL; x++) a += qr[g][x] * kv[x];
            part8[g][k] = a;
        }
    }
}

// W warps per CTA: 4, or 1 for batches of many short sequences (see cache.rs `one_warp`).
// Floats of attn_split's max/sum area: 2 NG + 8, rounded up to 4 so that the scores after it
// start 16-byte aligned (the q, value-slot areas before it are multiples of 4 floats).
#define SML_FLOATS(NG) ((2 * (NG) + 8 + 3) & ~3)

#ifndef UB_ONE_BLOCK
#define UB_ONE_BLOCK 0
#endif
template <int D, int KB, int VB, int NG, int W, int FST>
__device__ __forceinline__ void attn_split_partials(const AttnParams& P) {
    constexpr int CPL = D / 32;
    constexpr bool QUANT = KB < 16;
    constexpr bool FAST_ROWS = QUANT ? F16_FAST_QUANT : F16_FAST;
    constexpr bool COMPACT = COMPACT_ROWS && KB == 2;
    const CacheBufs& c = P.c;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int split = blockIdx.x;
    const int n_rep = P.n_head / c.n_kv;
    const int nchunk = n_rep / NG;
    const int kvh = blockIdx.y / nchunk;
    const int h0 = kvh * n_rep + (blockIdx.y % nchunk) * NG;
    const int tok = blockIdx.z;
    const Tok tk = P.toks[tok];
    const int n = tk.n_old, L = (P.prefill && tk.n_new > 1) ? n : n + tk.i + 1;
    const int s0 = split * P.split_len;
    const int s1 = min(s0 + P.split_len, L);

#ifdef KIVI_EMU
    float* smem = emu_dynamic_smem;
#else
    extern __shared__ float smem[];
#endif
    float* sq = smem;                  // [NG][D]
    // [W][NG][D]: each warp sums its values into its own slot, and the slots are added in warp
    // order at the end: no atomics, so a run gives the same bits every time (shared-memory
    // atomics added the warps' partials in arrival order).
    float* sacc = sq + NG * D;
    float* sml = sacc + W * NG * D;    // [NG][2]
    float* sc = sml + SML_FLOATS(NG);  // [NG][sc_stride], 16-byte aligned
    // [W][FST][32 D bytes]: each warp's ring of f16 chunks (f16_stream_issue).
    uint4* ring = (uint4*)(sc + NG * P.sc_stride) + warp * FST * 2 * D;
    __shared__ int sblk[MAX_SPLIT / BLOCK_TOKENS];  // block ids of the split (s0 is block-aligned)

    // The query's loads first, in flight with the sequence's and the block table's: stored after
    // the block ids (a loop storing each as it came waited on every load in turn: Nsight Compute
    // put 3 % of the GQA kernel's stall samples on that store).
    constexpr int NT = W * 32, QPT = (NG * D + NT - 1) / NT;
    float qv[QPT];
#pragma unroll
    for (int i = 0; i < QPT; i++) {
        const int x = (int)threadIdx.x + i * NT;
        qv[i] = x < NG * D ? P.q[((u64)tok * P.n_head + h0) * D + x] : 0.0f;
    }
    const u64 part = ((u64)tok * P.n_head + h0) * P.nsplit + split;
    if (s0 >= s1) {
        if (threadIdx.x < NG) {
            float* ml = P.part_ml + (part + (u64)threadIdx.x * P.nsplit) * 2;
            ml[0] = NEG_INF;
            ml[1] = 0.0f;
        }
        return;
    }
    int nqk = 0, nqv = 0;
    if (QUANT) {
        nqk = key_quant_end(c, n);
        nqv = val_quant_end(c, n);
    }
    {
        // Paged positions: [0, nqk) and [0, nqv) quantized; the f16 cache: [0, n).
        const int paged = QUANT ? max(nqk, nqv) : n;
        const int nb = min((max(paged - s0, 0) + BLOCK_TOKENS - 1) / BLOCK_TOKENS, P.split_len / BLOCK_TOKENS);
        const int* row = c.table + (u64)tk.slot * c.table_stride + s0 / BLOCK_TOKENS;
        // (UB_ONE_BLOCK, a timing experiment only: every block of the split reads the first one,
        // from L1 / L2.)
        for (int x = threadIdx.x; x < nb; x += blockDim.x) sblk[x] = row[UB_ONE_BLOCK ? 0 : x];
    }
#pragma unroll
    for (int i = 0; i < QPT; i++)
        if ((int)threadIdx.x + i * NT < NG * D) sq[threadIdx.x + i * NT] = qv[i];
    // Several heads, 2-bit (tc_key_block_heads): the query fragments live in the value-sum
    // slots until the scores are done (zeroed after), so that one-warp CTAs of GQA serving
    // shapes keep 16 per SM (measured on the H200, B = 256 T = 330 KIVI-2: 2048 CTAs, one wave
    // at 16 per SM, two at 13).
    // PRE_B: the B operands of a warp's blocks take its value-sum slot (k-steps 0, 1) and its
    // slot of swbuf16 (2, 3); the value sums have it again after the warp's last value block.
    // The query fragments then take shared memory of their own (sqf_own: 2 KiB, four CTAs of
    // ~55 KiB per SM still).
    constexpr bool PRE = PRE_B && QUANT && NG == 4 && W > 1 && D == 128 && QHAT_FOUR_WARPS;
    constexpr bool QF_IN_SACC = QUANT && NG > 1 && W * NG * D * 4 >= (D / 16) * 32 * 8 && !PRE;
    if constexpr (!QF_IN_SACC && !PRE)
        for (int x = threadIdx.x; x < W * NG * D; x += blockDim.x) sacc[x] = 0.0f;
    float* wacc = sacc + warp * NG * D;  // this warp's slot
    __syncthreads();

    // Whole quantized blocks of the split go through the tensor cores: keys [s0, kt_end),
    // values [s0, vt_end) (s0 is block-aligned), in multiples of P.tc_multiple blocks: a warp
    // takes whole blocks, so fewer blocks than warps would leave warps idle (measured: slower
    // than the CUDA-core path, which spreads 32-token chunks over all warps, at ~330 tokens).
    // A last, partly filled block joins them when all the whole ones did and it holds at least
    // P.tc_partial_min quantized positions: the tensor cores then compute its 128 rows and only
    // the first kt_valid - pb (vt_valid - pb) are used.
    int kt_end = s0, vt_end = s0;
    const int tc_unit = P.tc_multiple * BLOCK_TOKENS;
    __shared__ uint2 sqf_own[QF_IN_SACC ? 1 : (128 / 16) * 32];
    uint2* sqf = QF_IN_SACC ? (uint2*)sacc : sqf_own;  // the query's B fragments (query_fragments)
    // Positions in pool blocks: KIVI's quantized ones; the f16 cache's stored rows.
    constexpr bool F16_TENSOR = !QUANT && F16_TC;
    const int kpaged = QUANT ? nqk : F16_TENSOR ? n : 0, vpaged = QUANT ? nqv : F16_TENSOR ? n : 0;
    if ((QUANT || F16_TENSOR) && P.tensor_cores) {
        const int kq = max(min(s1, kpaged) - s0, 0), vq = max(min(s1, vpaged) - s0, 0);
        kt_end = s0 + kq / tc_unit * tc_unit;
        vt_end = s0 + vq / tc_unit * tc_unit;
        if constexpr (F16_TENSOR) {
            // See F16_TC_REST.
            if (kt_end > s0 && kq - (kt_end - s0) >= F16_TC_REST * BLOCK_TOKENS)
                kt_end = s0 + kq / BLOCK_TOKENS * BLOCK_TOKENS;
            if (vt_end > s0 && vq - (vt_end - s0) >= F16_TC_REST * BLOCK_TOKENS)
                vt_end = s0 + vq / BLOCK_TOKENS * BLOCK_TOKENS;
        }
        const int krest = s0 + kq - kt_end, vrest = s0 + vq - vt_end;
        if (P.tc_partial_min > 0 && krest >= P.tc_partial_min && krest < BLOCK_TOKENS) kt_end += BLOCK_TOKENS;
        if (P.tc_partial_min > 0 && vrest >= P.tc_partial_min && vrest < BLOCK_TOKENS) vt_end += BLOCK_TOKENS;
    }
    const int kt_valid = min(kt_end, max(min(s1, kpaged), s0));
    const int vt_valid = min(vt_end, max(min(s1, vpaged), s0));
    // The f16 ring: the warp's share of the tensor-core blocks (the same for keys and values:
    // kpaged = vpaged), its first FST - 1 chunks started now.
    constexpr bool F16_RING = F16_TENSOR && FST > 0 && D == 128;
    const int ring_blocks = F16_RING ? max((kt_end - s0) / BLOCK_TOKENS - warp + W - 1, 0) / W : 0;
    if constexpr (F16_RING) {
        for (int c = 0; c < FST - 1; c++)
            f16_stream_issue<FST, F16_RING_CA(NG)>(P, kvh, sblk, warp, W, ring_blocks, c, smem_addr(ring), lane);
    }
    // The query's B fragments, only when the split has key blocks for the tensor cores (short
    // splits skip this and its barrier; kt_end is the same for the whole CTA).
    // Quantized blocks: one head per CTA, tc_key_block_i8 and tc_value_block_i8; several,
    // tc_key_block_heads and tc_value_block_heads.
    constexpr bool IMMA_K = QUANT && NG == 1;
    constexpr bool IMMA_V = QUANT && NG == 1;
    constexpr bool HEADS_K = QUANT && NG > 1;
    constexpr bool HEADS_V = QUANT && NG > 1;
    // Their q^ and max|q| (HEADS_K), and each warp's s^ of a block ([4][128] floats at most).
    __shared__ float sqmax[HEADS_K ? NG : 1], sqinv[HEADS_K ? NG : 1];
    // ... and q^ itself, in four-warp CTAs (tc_key_block_heads forms it in one-warp ones, whose
    // shared memory is short: see QF_IN_SACC).
    constexpr bool QHAT = QHAT_FOUR_WARPS && HEADS_K && W > 1;
    __shared__ float4 sqhat16[QHAT ? (NG + 1) * D / 4 : 1];  // (read as float4: 16-byte aligned)
    float* sqhat = (float*)sqhat16;
    __shared__ float4 swbuf16[HEADS_K || HEADS_V ? W * 128 : 1];
    float* wbuf = (float*)swbuf16 + warp * 512;
    u32* pre_lo = (u32*)wacc;  // (PRE)
    // STAGE_CODES: 2-bit codes (STAGE_CODES4: 4-bit too, in four-warp CTAs).
    constexpr bool STAGED_K = STAGE_CODES && IMMA_K && (KB == 2 || (STAGE_CODES4 && W > 1));
    constexpr bool STAGED_V = STAGE_CODES && IMMA_V && (VB == 2 || (STAGE_CODES4 && W > 1));
    // A block's codes plus their padding: per plane, key quad rows of 32 words, value ones of
    // D / 4, each padded.
    constexpr int CBUF_BITS = (STAGED_K && KB == 4) || (STAGED_V && VB == 4) ? 4 : 2;
    constexpr int CBUF_WORDS = CBUF_BITS / 2 * (D / 4 * (32 + STAGE2_PAD) > 32 * (D / 4 + STAGE2_PAD)
                                                    ? D / 4 * (32 + STAGE2_PAD)
                                                    : 32 * (D / 4 + STAGE2_PAD));
    __shared__ uint4 scodes16[STAGED_K || STAGED_V ? W * CBUF_WORDS / 4 : 1];  // (16-byte aligned)
    u32* scodes = (u32*)scodes16;
    // The warp's buffer (STAGED_K / STAGED_V). (Its shared-memory address computed once per CTA
    // instead of per block held one more register across the loops: 4 % slower at KIVI-2.)
    u32* cbuf = scodes + warp * CBUF_WORDS;
    // Per warp, a key or value block's B operand (key_b_i8, value_b_i8): <= 4 k-steps. Read as
    // uint2, so aligned explicitly: a u32 array is only 4-byte aligned, and where ptxas puts it
    // depends on the module (docs/benchmarks.md "CUDA decode attention (H200)" -> "Session 30").
    __shared__ __align__(16) u32 skb[IMMA_K || IMMA_V ? W * 4 * 64 : 1];
    if (!IMMA_K && kt_end > s0) {
        query_fragments<D, NG, F16_TENSOR || HEADS_K>(sq, sqf, threadIdx.x, blockDim.x);
        if constexpr (HEADS_K) {
            for (int hh = warp; hh < NG; hh += W) {
                float mx = 0.0f;
                for (int x = lane; x < D; x += 32) mx = fmaxf(mx, fabsf(sq[hh * D + x]));
                mx = warp_max(mx);
                const float inv = mx > 0.0f ? 1.0f / mx : 0.0f;
                if (lane == 0) {
                    sqmax[hh] = mx;
                    sqinv[hh] = inv;
                }
                if constexpr (QHAT)
                    for (int x = lane; x < D; x += 32) sqhat[hh * D + x] = sq[hh * D + x] * inv;
            }
            if constexpr (QHAT)
                for (int x = threadIdx.x; x < D; x += blockDim.x) sqhat[NG * D + x] = 0.0f;
        }
        __syncthreads();
    }

    const int vmod = max(c.resid, 1);
    // KIVI windows (per slot); the f16 cache's rows are paged (block-relative, head offset only).
    const u64 kwin = (QUANT ? (u64)tk.slot * c.kwin_unit : 0) + (u64)kvh * c.kwin_head;
    const u64 vwin = (QUANT ? (u64)tk.slot * c.vwin_unit : 0) + (u64)kvh * c.vwin_head;
    const float* knew = P.knew + ((u64)tk.tok_off * c.n_kv + kvh) * D;
    const float* vnew = P.vnew + ((u64)tk.tok_off * c.n_kv + kvh) * D;
    const u64 new_stride = (u64)c.n_kv * D;

    // ---- scores
    float qr[NG][CPL];
#pragma unroll
    for (int g = 0; g < NG; g++)
#pragma unroll
        for (int k = 0; k < CPL; k++) qr[g][k] = sq[g * D + lane * CPL + k];

    constexpr int KBq = QUANT ? KB : 2;  // (the f16 cache: never read as codes)
    constexpr int VBq = QUANT ? VB : 2;
    if (IMMA_K && kt_end > s0) {
        for (int pb = s0 + warp * BLOCK_TOKENS; pb < kt_end; pb += W * BLOCK_TOKENS)
            tc_key_block_i8<D, KBq, STAGED_K>(P, kvh, (u64)sblk[(pb - s0) / BLOCK_TOKENS], pb, s0, kt_valid - pb,
                                              __ffs(c.group) - 6, sq, skb + warp * 4 * 64, sc, lane, cbuf);
    } else if (HEADS_K && kt_end > s0) {
        // (PRE: the mins' terms of the warp's key blocks at once, see key_mins_load. Their loads
        // issued during the CTA's prologue instead measured 1 % slower at B = 1, the same at
        // B = 32 T = 32K.)
        float mterm[2] = {0.0f, 0.0f};
        if constexpr (PRE && KEY_MINS_AHEAD) {
            static_assert(MAX_SPLIT / BLOCK_TOKENS <= 4 * W, "key_mins_load: at most 4 blocks per warp");
            const int nb = max(kt_end - s0 - warp * BLOCK_TOKENS + W * BLOCK_TOKENS - 1, 0) / (W * BLOCK_TOKENS);
            u32 a[2][D / 16][2];
            key_mins_load<D, W>(c, kvh, sblk, warp, nb, __ffs(c.group) - 6, lane, a);
            key_mins_terms<D>(P, a, sqf, lane, mterm);
        }
        int bi = 0;
        for (int pb = s0 + warp * BLOCK_TOKENS; pb < kt_end; pb += W * BLOCK_TOKENS, bi++)
            tc_key_block_heads<D, KBq, NG, QHAT, heads_ahead<D, W, PRE, KBq>(), PRE && QHAT>(
                P, kvh, (u64)sblk[(pb - s0) / BLOCK_TOKENS], pb, s0, kt_valid - pb, __ffs(c.group) - 6, sq, sqmax,
                sqinv, sqhat, sqf, wbuf, sc, lane, pre_lo, mterm, bi);
    } else if (F16_TENSOR && kt_end > s0) {
        if constexpr (F16_RING) {
            for (int i = 0; i < ring_blocks; i++) {
                const int pb = s0 + (warp + i * W) * BLOCK_TOKENS;
#pragma unroll 1
                for (int m = 0; m < 8; m++) {
                    const int c = 8 * i + m;
                    uint4 x[8], X[D / 32], Y[D / 32];
                    f16_stream_read<FST, false>(ring, c, x, lane);
                    f16_stream_issue<FST, F16_RING_CA(NG)>(P, kvh, sblk, warp, W, ring_blocks, c + FST - 1, smem_addr(ring), lane);
                    f16_key_pieces<D>(x, X, Y);
                    f16_key_row_pair<D, NG>(P, X, Y, m, pb, s0, kt_valid - pb, sqf, sc, lane);
                }
            }
        } else {
            for (int pb = s0 + warp * BLOCK_TOKENS; pb < kt_end; pb += W * BLOCK_TOKENS)
                tc_f16_key_block<D, NG>(P, kvh, (u64)sblk[(pb - s0) / BLOCK_TOKENS], pb, s0, kt_valid - pb, sqf, sc,
                                        lane);
        }
    }
    for (int t0 = kt_valid + warp * 32; t0 < s1; t0 += W * 32) {
        if (QUANT && t0 + 32 <= nqk) {
            constexpr int FPI = 32 / KBq, WPD = 32 / FPI, NP = KBq / 2;
            const u64 blk = (u64)sblk[(unsigned)(t0 - s0) / BLOCK_TOKENS];
            const int b = t0 & (BLOCK_TOKENS - 1);
            const u64 sm = blk * c.ksm_block + (u64)kvh * c.ksm_head + (u64)(b / c.group) * D;
            // Interleaved codes (key_word): word b / 32 of the lane's quad's 8 slots in each plane
            // hp, the channel's byte of each gathered as w[i][2 hp] (slots 0..3) and w[i][2 hp + 1]
            // (4..7): token s + 8 j of the quarter at bits 8 (s & 3) + 2 j of w[i][s >> 2] (2-bit),
            // token s + 16 hp + 8 r at bits 8 (s & 3) + 4 r of w[i][2 hp + (s >> 2)] (4-bit).
            // The lane's channels: CPL consecutive ones, of one quad.
            u32 w[CPL][WPD];
            float s[CPL], m[CPL];
            u32 sl[NP][8];
            const u32* words = c.kq + blk * c.kq_block + (u64)kvh * c.kq_head + key_word<KBq>(D, CPL * lane, b);
#pragma unroll
            for (int hp = 0; hp < NP; hp++)
#pragma unroll
                for (int x = 0; x < 8; x++) sl[hp][x] = words[hp * 8 * D + 16 * x];  // (code_word)
#pragma unroll
            for (int i = 0; i < CPL; i++) {
                const int d = CPL * lane + i;
                const u32 e = (u32)(d & 3), gather = e | ((e + 4) << 4);
#pragma unroll
                for (int hp = 0; hp < NP; hp++) {
                    w[i][2 * hp] = prmt(prmt(sl[hp][0], sl[hp][1], gather), prmt(sl[hp][2], sl[hp][3], gather), 0x5410u);
                    w[i][2 * hp + 1] =
                        prmt(prmt(sl[hp][4], sl[hp][5], gather), prmt(sl[hp][6], sl[hp][7], gather), 0x5410u);
                }
                s[i] = h2f(c.ks[sm + d]);
                m[i] = h2f(c.km[sm + d]);
            }
            // Many heads per CTA: two passes of 16 tokens keep the accumulators in registers.
            constexpr int PASSES = NG >= 3 ? 2 : 1, TOK = 32 / PASSES, WPP = WPD / PASSES;
            float qs[CPL][NG], bias[NG];
#pragma unroll
            for (int g = 0; g < NG; g++) bias[g] = 0.0f;
#pragma unroll
            for (int i = 0; i < CPL; i++) {
                const int d = CPL * lane + i;
#pragma unroll
                for (int g = 0; g < NG; g++) {
                    const float qd = sq[g * D + d];
                    qs[i][g] = qd * (s[i] * (float)(1 << KBq));
                    bias[g] += qd * m[i] - qs[i][g];
                }
            }
#pragma unroll
            for (int g = 0; g < NG; g++) bias[g] = warp_sum(bias[g]);
#pragma unroll
            for (int pass = 0; pass < PASSES; pass++) {
                float acc[NG][TOK];
#pragma unroll
                for (int g = 0; g < NG; g++)
#pragma unroll
                    for (int t = 0; t < TOK; t++) acc[g][t] = 0.0f;
#pragma unroll
                for (int i = 0; i < CPL; i++)
#pragma unroll
                    for (int wi = 0; wi < WPP; wi++)
#pragma unroll
                        for (int j = 0; j < FPI; j++) {
                            // (Token tt of the quarter, see above.)
                            const int tt = pass * TOK + wi * FPI + j, sl = tt & 7;
                            float f;
                            if constexpr (KBq == 2)
                                f = code_as_float<2>(w[i][sl >> 2], 4 * (sl & 3) + (tt >> 3));
                            else
                                f = code_as_float<4>(w[i][2 * ((tt >> 4) & 1) + (sl >> 2)], 2 * (sl & 3) + ((tt >> 3) & 1));
#pragma unroll
                            for (int g = 0; g < NG; g++) acc[g][wi * FPI + j] += qs[i][g] * f;
                        }
#pragma unroll
                for (int g = 0; g < NG; g++) {
                    const float v = transpose_reduce<TOK>(acc[g], lane);
                    const int p = t0 + pass * TOK + (lane % TOK);
                    if (lane < TOK)
                        sc[g * P.sc_stride + (p - s0)] = p < s1 ? (v + bias[g]) * P.scale_log2 : NEG_INF;
                }
            }
        } else {
            const int tend = min(t0 + 32, s1);
            for (int b0 = t0; b0 < tend; b0 += 8) {
                // All loads first, raw (independent, in flight together), then convert and dot.
                u32 raw[8][CPL];
                bool is_f32[8];
                const int d0 = lane * CPL;
                // The f16 cache: the 8 tokens (b0 is 8-aligned) are rows of one block.
                u64 f16row = 0;
                if (!QUANT && b0 < n)
                    f16row = (u64)sblk[(unsigned)(b0 - s0) / BLOCK_TOKENS] * c.kwin_unit + (u64)(b0 & (BLOCK_TOKENS - 1)) * D;
                float part8[NG][8];
                if (FAST_ROWS && b0 >= nqk && b0 + 8 <= min(n, tend)) {
                    // Eight stored f16 rows at consecutive addresses (the f16 cache: one block;
                    // KIVI: the key window, slot p - nqk): loads at fixed offsets from one
                    // address, no per-token branches or conversions chosen at run time.
                    const u16* rows = c.kwin + kwin + (QUANT ? (u64)(b0 - nqk) * D : f16row) + d0;
#pragma unroll
                    for (int k = 0; k < 8; k++) raw_f16<CPL>(rows + k * D, raw[k]);
#pragma unroll
                    for (int k = 0; k < 8; k++) {
                        float kv[CPL];
                        raw_to_float<CPL>(raw[k], false, kv);
#pragma unroll
                        for (int g = 0; g < NG; g++) {
                            float a = 0.0f;
#pragma unroll
                            for (int x = 0; x < CPL; x++) a += qr[g][x] * kv[x];
                            part8[g][k] = a;
                        }
                    }
                } else if (COMPACT && b0 >= nqk) {
                    // Stored f16 rows and new (f32) tokens only, e.g. a sequence's last window
                    // rows and its new token: every decode CTA comes here once. Kept apart from
                    // the generic loop below, whose per-token quantized branch makes it ~1600
                    // instructions (instruction fetch was the first stall of one-warp CTAs).
#pragma unroll
                    for (int k = 0; k < 8; k++) {
                        const int p = b0 + k;
                        is_f32[k] = p >= n;
                        if (p >= tend) {
#pragma unroll
                            for (int x = 0; x < CPL; x++) raw[k][x] = 0u;
                        } else if (p < n) {
                            const u64 row = QUANT ? (u64)(p - nqk) * D : f16row + (u64)k * D;
                            raw_f16<CPL>(c.kwin + kwin + row + d0, raw[k]);
                        } else {
                            raw_f32<CPL>(knew + (u64)(p - n) * new_stride + d0, raw[k]);
                        }
                    }
                    key_dots<CPL, NG>(raw, is_f32, qr, part8);
                } else {
#pragma unroll
                    for (int k = 0; k < 8; k++) {
                        const int p = b0 + k;
                        is_f32[k] = true;
                        if (p >= tend) {
#pragma unroll
                            for (int x = 0; x < CPL; x++) raw[k][x] = 0u;
                        } else if (QUANT && p < nqk) {
                            const u64 blk = (u64)sblk[(unsigned)(p - s0) / BLOCK_TOKENS];
                            const int b = p & (BLOCK_TOKENS - 1);
                            const u64 sm = blk * c.ksm_block + (u64)kvh * c.ksm_head + (u64)(b / c.group) * D;
#pragma unroll
                            for (int x = 0; x < CPL; x++) {
                                const int d = d0 + x;
                                const u32 wd = c.kq[blk * c.kq_block + (u64)kvh * c.kq_head + key_word<KBq>(D, d, b)];
                                const u32 code = (wd >> key_shift<KBq>(d, b)) & ((1u << KBq) - 1);
                                raw[k][x] = __float_as_uint((float)code * h2f(c.ks[sm + d]) + h2f(c.km[sm + d]));
                            }
                        } else if (p < n) {
                            // Key window: positions [nqk, n) sit at slots p - nqk (nqk = n - n % R);
                            // the f16 cache: paged.
                            const u64 row = QUANT ? (u64)(p - nqk) * D : f16row + (u64)k * D;
                            raw_f16<CPL>(c.kwin + kwin + row + d0, raw[k]);
                            is_f32[k] = false;
                        } else {
                            raw_f32<CPL>(knew + (u64)(p - n) * new_stride + d0, raw[k]);
                        }
                    }
                    key_dots<CPL, NG>(raw, is_f32, qr, part8);
                }
#pragma unroll
                for (int g = 0; g < NG; g++) {
                    const float v = transpose_reduce<8>(part8[g], lane);
                    const int p = b0 + (lane & 7);
                    if (lane < 8 && p < tend) sc[g * P.sc_stride + (p - s0)] = v * P.scale_log2;
                }
            }
        }
    }
    __syncthreads();

    // ---- softmax of the split (warp g owns query head g)
    // (PRE: the value-sum slots are zeroed by the tensor-core value path's first write, or here.)
    if (QF_IN_SACC || (PRE && vt_end <= s0))
        for (int x = threadIdx.x; x < W * NG * D; x += blockDim.x) sacc[x] = 0.0f;
    const int ns = s1 - s0;
    for (int g = warp; g < NG; g += W) {
        float* row = sc + g * P.sc_stride;
        if (UB_NO_SOFTMAX) {  // (timing only: the raw scores as weights)
            if (lane == 0) {
                sml[2 * g] = 0.0f;
                sml[2 * g + 1] = 1.0f;
            }
            continue;
        }
        float mx = NEG_INF, sum = 0.0f;
        if constexpr (SOFTMAX4 && (PRE || (SOFTMAX4_HEADS && NG == 4 && W > 1))) {
            // Four scores per access (rows are 16-byte aligned), two chains each of the maximum
            // and the sum, 2^x by MUFU.EX2 alone. (Weights of the f16 tensor-core value path as
            // split_bits, as below.)
            constexpr bool SPLIT = !IMMA_V && !HEADS_V;
            const int packed = vt_valid - s0;
            float4* row4 = (float4*)row;
            const int n4 = ns >> 2;
            auto max4 = [](float m, const float4& v) { return fmaxf(m, fmaxf(fmaxf(v.x, v.y), fmaxf(v.z, v.w))); };
            auto weight = [&](float e, int t) { return SPLIT && t < packed ? __uint_as_float(split_bits(e)) : e; };
            auto exp4 = [&](float4* p) {
                const float4 v = *p;
                const float4 e =
                    make_float4(fast_exp2(v.x - mx), fast_exp2(v.y - mx), fast_exp2(v.z - mx), fast_exp2(v.w - mx));
                const int t = 4 * (int)(p - row4);
                *p = make_float4(weight(e.x, t), weight(e.y, t + 1), weight(e.z, t + 2), weight(e.w, t + 3));
                return (e.x + e.y) + (e.z + e.w);
            };
            float m0 = NEG_INF, m1 = NEG_INF, sa = 0.0f, sb = 0.0f;
            int i = lane;
PASS_LOOP
            for (; i + 32 < n4; i += 64) {
                m0 = max4(m0, row4[i]);
                m1 = max4(m1, row4[i + 32]);
            }
            if (i < n4) m0 = max4(m0, row4[i]);
PASS_LOOP
            for (int t = 4 * n4 + lane; t < ns; t += 32) m1 = fmaxf(m1, row[t]);
            mx = warp_max(fmaxf(m0, m1));
PASS_LOOP
            for (i = lane; i + 32 < n4; i += 64) {
                sa += exp4(row4 + i);
                sb += exp4(row4 + i + 32);
            }
            if (i < n4) sa += exp4(row4 + i);
PASS_LOOP
            for (int t = 4 * n4 + lane; t < ns; t += 32) {
                const float e = fast_exp2(row[t] - mx);
                row[t] = weight(e, t);
                sb += e;
            }
            sum = sa + sb;
        } else {
            for (int t = lane; t < ns; t += 32) mx = fmaxf(mx, row[t]);
            mx = warp_max(mx);
            const int packed = vt_valid - s0;  // weights read by tc_f16_value_block, as split_bits
            for (int t = lane; t < ns; t += 32) {
                const float e = exp2f(row[t] - mx);
                row[t] = t < packed && !IMMA_V && !HEADS_V ? __uint_as_float(split_bits(e)) : e;
                sum += e;
            }
        }
        // tc_value_block_heads reads a last block's weights past the split's end: zeros, so
        // that it needs no selects (s^ is zero there).
        if constexpr (HEADS_V) {
            const int padded = (ns + BLOCK_TOKENS - 1) / BLOCK_TOKENS * BLOCK_TOKENS;
            for (int t = ns + lane; t < padded; t += 32) row[t] = 0.0f;
        }
        sum = warp_sum(sum);
        if (lane == 0) {
            sml[2 * g] = mx;
            sml[2 * g + 1] = sum;
        }
    }
    __syncthreads();

    // ---- values: quantized tokens [s0, min(s1, nqv))
    if (QUANT) {
        constexpr int FPI = 32 / VBq, WPT = D / FPI, TPI = 32 / WPT;
        const int wi = lane % WPT, sub = lane / WPT;
        const int gpt = D / c.group;
        const u64 vqb = (u64)kvh * c.vq_head;
        const u64 vsb = (u64)kvh * c.vsm_head;
        float acc[NG][FPI];
        float bias2[NG][D / 32];  // the mins' terms, per quarter
#pragma unroll
        for (int g = 0; g < NG; g++) {
#pragma unroll
            for (int q = 0; q < D / 32; q++) bias2[g][q] = 0.0f;
#pragma unroll
            for (int j = 0; j < FPI; j++) acc[g][j] = 0.0f;
        }
        const int qend = min(s1, nqv);
        if (IMMA_V && vt_end > s0) {
            float vacc[D / 16][2];
#pragma unroll
            for (int m = 0; m < D / 16; m++) vacc[m][0] = vacc[m][1] = 0.0f;
            for (int pb = s0 + warp * BLOCK_TOKENS; pb < vt_end; pb += W * BLOCK_TOKENS)
                tc_value_block_i8<D, VBq, STAGED_V>(P, kvh, (u64)sblk[(pb - s0) / BLOCK_TOKENS], pb, s0, vt_valid - pb,
                                                    sc, skb + warp * 4 * 64, vacc, lane, cbuf);
            tc_value_store_i8<D>(vacc, wacc, lane);
        } else if (HEADS_V && vt_end > s0) {
            float vacc[D / 16][2], pm[4 * (D / 32)];
#pragma unroll
            for (int m = 0; m < D / 16; m++) vacc[m][0] = vacc[m][1] = 0.0f;
#pragma unroll
            for (int x = 0; x < 4 * (D / 32); x++) pm[x] = 0.0f;
            for (int pb = s0 + warp * BLOCK_TOKENS; pb < vt_end; pb += W * BLOCK_TOKENS)
                tc_value_block_heads<D, VBq, NG, heads_ahead<D, W, PRE, VBq>(), PRE>(P, kvh, (u64)sblk[(pb - s0) / BLOCK_TOKENS], pb,
                                                                 s0, vt_valid - pb, sc, wbuf, vacc, pm, lane, pre_lo);
            tc_value_store_heads<D, NG, PRE>(vacc, pm, wacc, lane);
        }
        constexpr int UNROLL = 4;
        // Interleaved codes (value_word): the lane's row word wi of a token (plane hp, word wp
        // of it) holds channels value_channel<D, VBq>(hp, wp, j) of every quarter, so the weights
        // times the scales, and the mins' terms, are per quarter (bias2, added per channel at
        // the end). An iteration's TPI * UNROLL (<= 32) tokens are aligned and inside one block.
        constexpr int NQ = D / 32;
        const int qshift = __ffs(c.group) - 6;
        const int hp = wi / (D / 16), wp = wi % (D / 16);
        for (int pb = vt_valid + warp * TPI * UNROLL; pb < qend; pb += W * TPI * UNROLL) {
            const u64 blk = (u64)sblk[(unsigned)(pb - s0) / BLOCK_TOKENS];
            const int bp = (pb & (BLOCK_TOKENS - 1)) + sub;
            const u64 vqo = vqb + blk * c.vq_block + (u64)hp * 8 * D, vso = vsb + blk * c.vsm_block;
            u32 w[UNROLL];
            uint2 sr[UNROLL], mr[UNROLL];  // the token's gpt (<= 4) f16 scales and mins
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const int p = pb + u * TPI + sub;
                const int b = bp + u * TPI;
                w[u] = 0u;
                sr[u] = mr[u] = make_uint2(0u, 0u);
                if (p < qend) {
                    // The token's row word: its byte of each of the quad's four words.
                    // (code_word<D / 4>(b >> 2, 4 wp), spelled out: calling it changed every quantized
                    // module's SASS, and this code's neighbours have shown timing-sensitive.)
                    const uint4 q4 =
                        *(const uint4*)(c.vq + vqo + (u64)(b >> 4) * D + group_word<D / 4>(wp, (b >> 2) & 3));
                    const u32 e = (u32)(b & 3), gather = e | ((e + 4) << 4);
                    w[u] = prmt(prmt(q4.x, q4.y, gather), prmt(q4.z, q4.w, gather), 0x5410u);
                    const u16* sp = c.vs + vso + (u64)b * gpt;
                    const u16* mp = c.vm + vso + (u64)b * gpt;
                    if (gpt == 4) {
                        sr[u] = *(const uint2*)sp;
                        mr[u] = *(const uint2*)mp;
                    } else if (gpt == 2) {
                        sr[u].x = *(const u32*)sp;
                        mr[u].x = *(const u32*)mp;
                    } else {
                        sr[u].x = sp[0];
                        mr[u].x = mp[0];
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const int p = pb + u * TPI + sub;
                float ps[NG][NQ];
#pragma unroll
                for (int q = 0; q < NQ; q++) {
                    const int gq = q >> qshift;  // the quarter's group: half gq & 1 of word gq >> 1
                    const u32 sw = gq < 2 ? sr[u].x : sr[u].y, mw = gq < 2 ? mr[u].x : mr[u].y;
                    const float sv = h2f((u16)(sw >> (16 * (gq & 1)))), mv = h2f((u16)(mw >> (16 * (gq & 1))));
#pragma unroll
                    for (int g = 0; g < NG; g++) {
                        const float pv = p < qend ? sc[g * P.sc_stride + (p - s0)] : 0.0f;
                        ps[g][q] = pv * (sv * (float)(1 << VBq));
                        bias2[g][q] += pv * mv - ps[g][q];
                    }
                }
#pragma unroll
                for (int j = 0; j < FPI; j++) {
                    const int q = value_channel<D, VBq>(0, 0, j) / 32;
                    const float f = code_as_float<VBq>(w[u], j);
#pragma unroll
                    for (int g = 0; g < NG; g++) acc[g][j] += ps[g][q] * f;
                }
            }
        }
        // Sum over the lanes holding the same channels, then into shared memory: only in warps
        // that took tokens above (the condition is the loops' first test, the same for the
        // whole warp). Unconditional, these ~550 instructions per warp were ~6 % of the GQA
        // KIVI-2 kernel's issued instructions at B = 32 T = 32K, where no warp takes any.
        __syncwarp();
        if (vt_valid + warp * TPI * UNROLL < qend) {
#pragma unroll
            for (int g = 0; g < NG; g++) {
#pragma unroll
                for (int q = 0; q < NQ; q++)
#pragma unroll
                    for (int o = WPT; o < 32; o <<= 1) bias2[g][q] += __shfl_xor_sync(0xffffffffu, bias2[g][q], o);
#pragma unroll
                for (int j = 0; j < FPI; j++) {
                    float v = acc[g][j];
#pragma unroll
                    for (int o = WPT; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                    if (sub == 0)
                        wacc[g * D + value_channel<D, VBq>(hp, wp, j)] +=
                            v + bias2[g][value_channel<D, VBq>(0, 0, j) / 32];
                }
            }
        }
    } else if (F16_TENSOR && vt_end > s0) {
        float tacc[D / 16][4];
#pragma unroll
        for (int m = 0; m < D / 16; m++)
#pragma unroll
            for (int x = 0; x < 4; x++) tacc[m][x] = 0.0f;
        if constexpr (F16_RING) {
            const int hg = lane >> 3, t = lane & 3;
            for (int i = 0; i < ring_blocks; i++) {
                const int pb = s0 + (warp + i * W) * BLOCK_TOKENS, valid = vt_valid - pb;
                const u32* pw = (const u32*)(sc + min(hg, NG - 1) * P.sc_stride + (pb - s0));
#pragma unroll 1
                for (int k = 0; k < BLOCK_TOKENS / 16; k++) {
                    const int c = 8 * ring_blocks + 8 * i + k, ta = 16 * k + 2 * t;
                    uint4 x[8];
                    u32 wa0[D / 16], wa1[D / 16], wb0[D / 16], wb1[D / 16];
                    f16_stream_read<FST, true>(ring, c, x, lane);
                    f16_stream_issue<FST, F16_RING_CA(NG)>(P, kvh, sblk, warp, W, ring_blocks, c + FST - 1, smem_addr(ring), lane);
                    f16_value_piece_row<D>(x, 0, ta < valid, wa0);
                    f16_value_piece_row<D>(x, 1, ta + 1 < valid, wa1);
                    f16_value_piece_row<D>(x, 2, ta + 8 < valid, wb0);
                    f16_value_piece_row<D>(x, 3, ta + 9 < valid, wb1);
                    f16_value_kstep<D, NG>(P, wa0, wa1, wb0, wb1, k, valid, pw, tacc, lane);
                }
            }
        } else {
            for (int pb = s0 + warp * BLOCK_TOKENS; pb < vt_end; pb += W * BLOCK_TOKENS)
                tc_f16_value_block<D, NG>(P, kvh, (u64)sblk[(pb - s0) / BLOCK_TOKENS], pb, s0, vt_valid - pb, sc,
                                          tacc, lane);
        }
        tc_value_store<D, NG>(tacc, wacc, lane);
    }

    // ---- values: full-precision tokens [max(s0, nqv), s1) (window, new tokens; all of f16)
    {
        float acc[NG][CPL];
#pragma unroll
        for (int g = 0; g < NG; g++)
#pragma unroll
            for (int x = 0; x < CPL; x++) acc[g][x] = 0.0f;
        const int d0 = lane * CPL;
        // (The f16 cache: from the end of its tensor-core blocks, block-aligned or n.)
        const int fstart = max(s0, QUANT ? nqv : F16_TENSOR ? vt_valid : 0);
        const int vbase = QUANT ? nqv % vmod : 0;
        constexpr int UNROLL = 8;
        for (int pb = fstart + warp * UNROLL; pb < s1; pb += W * UNROLL) {
            u32 raw[UNROLL][CPL];
            bool is_f32[UNROLL];
            // The f16 cache: fstart is s0, a block end or n, so below n pb is 8-aligned and the 8
            // tokens are in one block.
            u64 f16row = 0;
            if (!QUANT && pb < n)
                f16row = (u64)sblk[(unsigned)(pb - s0) / BLOCK_TOKENS] * c.vwin_unit + (u64)(pb & (BLOCK_TOKENS - 1)) * D;
            int slot0 = 0;  // KIVI: window slot of pb
            if (QUANT) {
                slot0 = vbase + (pb - nqv);
                if (slot0 >= vmod) slot0 -= vmod;
            }
            if (FAST_ROWS && pb + UNROLL <= min(n, s1) && (!QUANT || slot0 + UNROLL <= vmod)) {
                // UNROLL stored f16 rows at consecutive addresses (as for the keys above; KIVI:
                // window slots that do not wrap).
                const u16* rows = c.vwin + vwin + (QUANT ? (u64)slot0 * D : f16row) + d0;
                const float* w = sc + (pb - s0);
#pragma unroll
                for (int u = 0; u < UNROLL; u++) raw_f16<CPL>(rows + u * D, raw[u]);
#pragma unroll
                for (int u = 0; u < UNROLL; u++) {
                    float vv[CPL];
                    raw_to_float<CPL>(raw[u], false, vv);
#pragma unroll
                    for (int g = 0; g < NG; g++) {
                        const float pv = w[g * P.sc_stride + u];
#pragma unroll
                        for (int x = 0; x < CPL; x++) acc[g][x] += pv * vv[x];
                    }
                }
                continue;
            }
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const int p = pb + u;
                is_f32[u] = true;
                if (p >= s1) {
#pragma unroll
                    for (int x = 0; x < CPL; x++) raw[u][x] = 0u;
                } else if (p < n) {
                    // Value window: slot p % R, i.e. vbase + (p - nqv) wrapped once; the f16
                    // cache: paged.
                    u64 row;
                    if (QUANT) {
                        int slot = vbase + (p - nqv);
                        if (slot >= vmod) slot -= vmod;
                        row = (u64)slot * D;
                    } else {
                        row = f16row + (u64)u * D;
                    }
                    raw_f16<CPL>(c.vwin + vwin + row + d0, raw[u]);
                    is_f32[u] = false;
                } else {
                    raw_f32<CPL>(vnew + (u64)(p - n) * new_stride + d0, raw[u]);
                }
            }
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const int p = pb + u;
                float vv[CPL];
                raw_to_float<CPL>(raw[u], is_f32[u], vv);
#pragma unroll
                for (int g = 0; g < NG; g++) {
                    const float pv = p < s1 ? sc[g * P.sc_stride + (p - s0)] : 0.0f;
#pragma unroll
                    for (int x = 0; x < CPL; x++) acc[g][x] += pv * vv[x];
                }
            }
        }
        __syncwarp();
        if (fstart < s1) {
#pragma unroll
            for (int g = 0; g < NG; g++)
#pragma unroll
                for (int x = 0; x < CPL; x++) wacc[g * D + d0 + x] += acc[g][x];
        }
    }
    __syncthreads();

    if (P.out && !P.tickets) {
        // The only split: the output itself (what kivi_attn_reduce would compute, exactly).
        for (int x = threadIdx.x; x < NG * D; x += blockDim.x) {
            const int g = x / D, d = x % D;
            float o = 0.0f;
#pragma unroll
            for (int w = 0; w < W; w++) o += sacc[w * NG * D + x];
            P.out[((u64)tok * P.n_head + h0 + g) * D + d] = o / sml[2 * g + 1];
        }
        return;
    }
    for (int x = threadIdx.x; x < NG * D; x += blockDim.x) {
        const int g = x / D, d = x % D;
        float o = 0.0f;
#pragma unroll
        for (int w = 0; w < W; w++) o += sacc[w * NG * D + x];
        P.part_o[(part + (u64)g * P.nsplit) * D + d] = o;
    }
    if (threadIdx.x < NG) {
        float* ml = P.part_ml + (part + (u64)threadIdx.x * P.nsplit) * 2;
        ml[0] = sml[2 * threadIdx.x];
        ml[1] = sml[2 * threadIdx.x + 1];
    }
}

// One split's partials, then (with P.tickets) the combination by the group's last CTA: one call
// site, as the kernel returns from the split in two places. FUSED_COMBINE=0 compiles it out (the
// host must then launch the reduce: KIVI_CUDA_FUSED_REDUCE=0), for comparison.
#ifndef FUSED_COMBINE
#define FUSED_COMBINE 1
#endif
template <int D, int KB, int VB, int NG, int W, int FST = 0>
__device__ __forceinline__ void attn_split(const AttnParams& P) {
    attn_split_partials<D, KB, VB, NG, W, FST>(P);
    if (FUSED_COMBINE && P.tickets) last_cta_combines<D, NG, W>(P, ctaid_z_again(), ctaid_y_again());
}

// Minimum resident CTAs per SM (__launch_bounds__), i.e. a register cap. KIVI kernels: at
// least 5 CTAs per SM (<= 102 registers) keeps enough loads in flight; the rarely taken
// full-precision paths then use fewer registers at a small cost. Measured on the H200
// (docs/benchmarks.md "Session 8"): the 2-bit (keys and values) one-head kernels take a lower cap (four warps: 6
// CTAs, 80 registers, 2-3 % faster; one warp: 24 CTAs, up to 1.37x faster at 330 tokens); the
// 4-bit ones spill 136 B at 80 registers and stay at 5 / 20; one-warp GQA CTAs: 16 (128
// registers, 124 B of spills; 20: 96 / 912 B, 5-10 % slower; 12: 168 / 20 B, 15-20 % slower).
#ifndef QUANT_MIN_CTAS
#define QUANT_MIN_CTAS 5
#endif
#ifndef QUANT_MIN_CTAS_K2
#define QUANT_MIN_CTAS_K2 6
#endif
#ifndef QUANT_MIN_CTAS_GQA
#define QUANT_MIN_CTAS_GQA 4
#endif
#ifndef ONE_WARP_MIN_CTAS
#define ONE_WARP_MIN_CTAS 20
#endif
#ifndef ONE_WARP_MIN_CTAS_K2
#define ONE_WARP_MIN_CTAS_K2 24
#endif
#ifndef ONE_WARP_MIN_CTAS_GQA
#define ONE_WARP_MIN_CTAS_GQA 16
#endif
// The f16 cache's kernels: 4 (128 registers; see F16_KEY_UNROLL for 3 and 2).
#ifndef F16_MIN_CTAS
#define F16_MIN_CTAS 4
#endif
// One-head four-warp kernels with 4-bit codes staged (STAGE_CODES4): shared memory allows 4.
#ifndef QUANT_MIN_CTAS_STAGED
#define QUANT_MIN_CTAS_STAGED 4
#endif
#define MIN_CTAS(KB, VB, NG)                                                                       \
    ((KB) == 16 ? F16_MIN_CTAS                                                                     \
     : (NG) != 1 ? QUANT_MIN_CTAS_GQA                                                              \
     : (KB) + (VB) == 4 ? QUANT_MIN_CTAS_K2                                                        \
     : STAGE_CODES && STAGE_CODES4 ? QUANT_MIN_CTAS_STAGED : QUANT_MIN_CTAS)
// One decode-attention variant per module, compiled on first use (cache.rs `attn_variant`):
// -DATTN_D (head dim) -DATTN_KB -DATTN_VB (key/value bits, 16: the f16 cache) -DATTN_NG
// (query heads per CTA) -DATTN_W (warps per CTA: 4, or 1 for batches of many short
// sequences, where each warp walks its split's whole blocks on the tensor cores and ~20
// independent warps share an SM). Instantiating every variant in one module made the first
// use compile ~70 kernels (18 MB of PTX; ~80 s on the H200 machine).
#ifdef ATTN_D
#define ONE_WARP_CTAS(KB, VB, NG) \
    ((NG) != 1 ? ONE_WARP_MIN_CTAS_GQA : (KB) + (VB) == 4 ? ONE_WARP_MIN_CTAS_K2 : ONE_WARP_MIN_CTAS)
extern "C" __global__ void __launch_bounds__(ATTN_W * 32, ATTN_W == 1 ? ONE_WARP_CTAS(ATTN_KB, ATTN_VB, ATTN_NG) : MIN_CTAS(ATTN_KB, ATTN_VB, ATTN_NG))
    kivi_attn(AttnParams p) {
    attn_split<ATTN_D, ATTN_KB, ATTN_VB, ATTN_NG, ATTN_W, ATTN_KB == 16 ? F16_STAGES : 0>(p);
}
#endif

// ---------------------------------------------------------------------------------------------
// Prefill attention: the causal attention among an item's new tokens (positions
// [n_old, n_new + n_old)), flash-attention style on the tensor cores. One CTA = PF_ROWS query
// tokens of one item x one query head, 16 per warp; key tiles of PF_KEYS new tokens are staged
// in shared memory, keys row-major and values transposed, so that every B fragment is one
// 32-bit load without bank conflicts. S = Q K^T and O += P V by mma.sync m16n8k16 with f32
// sums; every operand goes in as two f16 parts (hi = f16(x), lo = f16(x - hi); the lo x lo
// product left out), so that the result stays near f32 attention over the step's f32 keys and
// values, as the CPU cache and the decode kernel attend them. It writes the partial
// (unnormalised output, max, sum) of split P.nsplit - 1; kivi_attn_reduce combines it with the
// decode kernel's splits over the stored positions [0, n_old).
// (Was CUDA-core rows of 16 tokens: 340 us per layer at the throughput run's prefill passes,
// 2048 prompt tokens in 161-token prompts, Llama-2-7B shapes on the H200.)
#define PF_ROWS 64
#define PF_KEYS 32
#define PF_THREADS 128
// Row pitches in halves: keys [PF_KEYS][D + 8], values transposed [D][PF_KEYS + 8].
#define PF_KPITCH(D) ((D) + 8)
#define PF_VPITCH (PF_KEYS + 8)
// f16 pair (x0 low, x1 high) of parts `part` of two floats.
__device__ __forceinline__ u32 split_pair(float x0, float x1, int part) {
    return pack_h2(split_part(x0, part), split_part(x1, part));
}
template <int D>
__device__ __forceinline__ void attn_prefill(const AttnParams& P, const int* tiles) {
    constexpr int KS = D / 16, NT = PF_KEYS / 8, ND = D / 8;
    constexpr int KW = PF_KPITCH(D) / 2, VW = PF_VPITCH / 2;  // pitches in words
    const CacheBufs& c = P.c;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int t0 = tiles[blockIdx.x];  // packed index of the tile's first query token
    const int h = blockIdx.y, kvh = h / (P.n_head / c.n_kv);
    const Tok tk = P.toks[t0];
    const int q0 = tk.i, nq = min(PF_ROWS, tk.n_new - q0), kend = q0 + nq;
    // [part]: key j, channels 2w, 2w + 1 at word j KW + w; channel d, keys 2w, 2w + 1 at d VW + w.
    __shared__ u32 sk[2][PF_KEYS * KW];
    __shared__ u32 sv[2][D * VW];
    // The warp's rows r0 = 16 warp + g and r0 + 8 (query tokens q0 + r; rows past nq are zero
    // queries, computed and not written). Query fragments of k-step x: a0 (row r0, channels
    // 16x + 2t, +1), a1 (row r0 + 8), a2 (row r0, channels + 8), a3 (row r0 + 8, channels + 8).
    const int r0 = 16 * warp + g;
    u32 qa[2][KS][4];
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int r = r0 + 8 * half;
        const bool on = r < nq;
        const float* qrow = P.q + ((u64)(t0 + (on ? r : 0)) * P.n_head + h) * D;
#pragma unroll
        for (int x = 0; x < KS; x++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                float2 v = *(const float2*)(qrow + 16 * x + 8 * e + 2 * t);
                v = on ? make_float2(v.x * P.scale_log2, v.y * P.scale_log2) : make_float2(0.0f, 0.0f);
#pragma unroll
                for (int part = 0; part < 2; part++) qa[part][x][half + 2 * e] = split_pair(v.x, v.y, part);
            }
    }
    const u64 stride = (u64)c.n_kv * D;
    const float* kb = P.knew + (u64)tk.tok_off * stride + (u64)kvh * D;
    const float* vb = P.vnew + (u64)tk.tok_off * stride + (u64)kvh * D;
    float o[ND][4], m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int n = 0; n < ND; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    // Keys [0, kend): each row r attends keys j <= q0 + r.
    for (int k0 = 0; k0 < kend; k0 += PF_KEYS) {
        __syncthreads();  // the previous tile's readers are done
        // Keys: a warp per row, a lane per 4 channels (16-byte loads). Values: a lane per key
        // pair (lanes 16-31 the next channel quad), transposed stores, one bank per lane.
        for (int j = warp; j < PF_KEYS; j += PF_THREADS / 32)
            for (int d4 = lane; d4 < D / 4; d4 += 32) {
                const bool ok = k0 + j < kend;
                const float4 v = ok ? *(const float4*)(kb + (u64)(k0 + j) * stride + 4 * d4) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
                for (int part = 0; part < 2; part++) {
                    sk[part][j * KW + 2 * d4] = split_pair(v.x, v.y, part);
                    sk[part][j * KW + 2 * d4 + 1] = split_pair(v.z, v.w, part);
                }
            }
        {
            const int jp = lane & 15, j = 2 * jp;
            const bool ok0 = k0 + j < kend, ok1 = k0 + j + 1 < kend;
            for (int d4 = 2 * warp + (lane >> 4); d4 < D / 4; d4 += PF_THREADS / 16) {
                const float4 a = ok0 ? *(const float4*)(vb + (u64)(k0 + j) * stride + 4 * d4) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                const float4 b = ok1 ? *(const float4*)(vb + (u64)(k0 + j + 1) * stride + 4 * d4) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
                for (int part = 0; part < 2; part++) {
                    sv[part][(4 * d4) * VW + jp] = split_pair(a.x, b.x, part);
                    sv[part][(4 * d4 + 1) * VW + jp] = split_pair(a.y, b.y, part);
                    sv[part][(4 * d4 + 2) * VW + jp] = split_pair(a.z, b.z, part);
                    sv[part][(4 * d4 + 3) * VW + jp] = split_pair(a.w, b.w, part);
                }
            }
        }
        __syncthreads();
        if (k0 > q0 + 16 * warp + 15) continue;  // every row of the warp is before this tile
        // S = Q K^T: n-tile n is keys k0 + 8n + [0, 8): lane (g, t) holds rows r0 (s[n][0..1])
        // and r0 + 8 (s[n][2..3]), keys 8n + 2t, +1.
        float s[NT][4];
#pragma unroll
        for (int n = 0; n < NT; n++) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
            const int at = (8 * n + g) * KW + t;
#pragma unroll
            for (int x = 0; x < KS; x++) {
                const u32 bh0 = sk[0][at + 8 * x], bh1 = sk[0][at + 8 * x + 4];
                const u32 bl0 = sk[1][at + 8 * x], bl1 = sk[1][at + 8 * x + 4];
                mma_16816(s[n], qa[0][x][0], qa[0][x][1], qa[0][x][2], qa[0][x][3], bh0, bh1);
                mma_16816(s[n], qa[1][x][0], qa[1][x][1], qa[1][x][2], qa[1][x][3], bh0, bh1);
                mma_16816(s[n], qa[0][x][0], qa[0][x][1], qa[0][x][2], qa[0][x][3], bl0, bl1);
            }
        }
        // Online softmax per row (a row's values lie in the lane quad of its g).
        float corr[2];
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int last = q0 + r0 + 8 * half - k0;  // the row's last key in this tile
            float mx = NEG_INF;
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float& v = s[n][2 * half + e];
                    v = 8 * n + 2 * t + e <= last ? v : NEG_INF;
                    mx = fmaxf(mx, v);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            // (Tile 0 holds key 0, which every row attends: m is finite from then on.)
            const float mn = fmaxf(m[half], mx);
            corr[half] = exp2f(m[half] - mn);
            m[half] = mn;
            float sum = 0.0f;
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float& v = s[n][2 * half + e];
                    v = exp2f(v - mn);
                    sum += v;
                }
            l[half] = l[half] * corr[half] + sum;
        }
#pragma unroll
        for (int n = 0; n < ND; n++) {
            o[n][0] *= corr[0];
            o[n][1] *= corr[0];
            o[n][2] *= corr[1];
            o[n][3] *= corr[1];
        }
        // O += P V: k-step kk is keys 16kk + [0, 16) (n-tiles 2kk, 2kk + 1 of S as the A
        // fragments); n-tile n of O is channels 8n + [0, 8).
#pragma unroll
        for (int kk = 0; kk < PF_KEYS / 16; kk++) {
            u32 pa[2][4];
#pragma unroll
            for (int part = 0; part < 2; part++) {
                pa[part][0] = split_pair(s[2 * kk][0], s[2 * kk][1], part);
                pa[part][1] = split_pair(s[2 * kk][2], s[2 * kk][3], part);
                pa[part][2] = split_pair(s[2 * kk + 1][0], s[2 * kk + 1][1], part);
                pa[part][3] = split_pair(s[2 * kk + 1][2], s[2 * kk + 1][3], part);
            }
#pragma unroll
            for (int n = 0; n < ND; n++) {
                const int at = (8 * n + g) * VW + 8 * kk + t;
                const u32 bh0 = sv[0][at], bh1 = sv[0][at + 4], bl0 = sv[1][at], bl1 = sv[1][at + 4];
                mma_16816(o[n], pa[0][0], pa[0][1], pa[0][2], pa[0][3], bh0, bh1);
                mma_16816(o[n], pa[1][0], pa[1][1], pa[1][2], pa[1][3], bh0, bh1);
                mma_16816(o[n], pa[0][0], pa[0][1], pa[0][2], pa[0][3], bl0, bl1);
            }
        }
    }
    // Row sums over the lane quad; lane (g, t) writes channels 8n + 2t, +1 of its two rows.
#pragma unroll
    for (int half = 0; half < 2; half++) {
        float sum = l[half];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const int r = r0 + 8 * half;
        if (r >= nq) continue;
        const u64 part = ((u64)(t0 + r) * P.n_head + h) * P.nsplit + (P.nsplit - 1);
#pragma unroll
        for (int n = 0; n < ND; n++)
            *(float2*)(P.part_o + part * D + 8 * n + 2 * t) = make_float2(o[n][2 * half], o[n][2 * half + 1]);
        if (t == 0) {
            P.part_ml[part * 2] = m[half];
            P.part_ml[part * 2 + 1] = sum;
        }
    }
}
// Attention of each query token over its sequence's sink positions (KIVI sink tokens): one
// warp per (packed token, query head), writing its unnormalised output, max and sum as split
// `slot` for kivi_attn_reduce. `toks` are the absolute records (position n_old + i): the token
// attends sink positions [0, min(n_old + i + 1, S)), stored ones from the sink rows and the
// step's new ones (position >= n_old) in f32 from knew, as the decode kernel reads new tokens.
// grid = (T, H), block = 32.
template <int D>
__device__ __forceinline__ void attn_sinks(const AttnParams& P, const Tok* toks, int slot) {
    constexpr int CPL = D / 32;
    const CacheBufs& c = P.c;
    const int lane = threadIdx.x, tok = blockIdx.x, h = blockIdx.y;
    const int kvh = h / (P.n_head / c.n_kv);
    const Tok tk = toks[tok];
    const int n_att = min(tk.n_old + tk.i + 1, c.sinks);
    float q[CPL], acc[CPL];
#pragma unroll
    for (int x = 0; x < CPL; x++) {
        q[x] = P.q[((u64)tok * P.n_head + h) * D + lane + 32 * x] * P.scale_log2;
        acc[x] = 0.0f;
    }
    const u64 sink = (u64)tk.slot * c.sink_unit + (u64)kvh * c.sink_head;
    const u64 stride = (u64)c.n_kv * D;
    float m = NEG_INF, l = 0.0f;
    for (int p = 0; p < n_att; p++) {
        float k[CPL], v[CPL];
        if (p < tk.n_old) {
#pragma unroll
            for (int x = 0; x < CPL; x++) {
                k[x] = h2f(c.ksink[sink + (u64)p * D + lane + 32 * x]);
                v[x] = h2f(c.vsink[sink + (u64)p * D + lane + 32 * x]);
            }
        } else {
            const u64 row = (u64)(tk.tok_off + p - tk.n_old) * stride + (u64)kvh * D;
#pragma unroll
            for (int x = 0; x < CPL; x++) {
                k[x] = P.knew[row + lane + 32 * x];
                v[x] = P.vnew[row + lane + 32 * x];
            }
        }
        float dot = 0.0f;
#pragma unroll
        for (int x = 0; x < CPL; x++) dot += q[x] * k[x];
        const float s = warp_sum(dot);
        const float mn = fmaxf(m, s);
        const float corr = exp2f(m - mn), e = exp2f(s - mn);
        l = l * corr + e;
        m = mn;
#pragma unroll
        for (int x = 0; x < CPL; x++) acc[x] = acc[x] * corr + e * v[x];
    }
    const u64 part = ((u64)tok * P.n_head + h) * P.nsplit + slot;
#pragma unroll
    for (int x = 0; x < CPL; x++) P.part_o[part * D + lane + 32 * x] = acc[x];
    if (lane == 0) {
        P.part_ml[part * 2] = m;
        P.part_ml[part * 2 + 1] = l;
    }
}
#define ATTN_SINKS(D)                                                                          \
    extern "C" __global__ void __launch_bounds__(32) kivi_attn_sinks_d##D(AttnParams p, const Tok* toks, \
                                                                       int slot) {             \
        attn_sinks<D>(p, toks, slot);                                                          \
    }

#define ATTN_PREFILL(D)                                                                \
    extern "C" __global__ void __launch_bounds__(PF_THREADS)                           \
        kivi_attn_prefill_d##D(AttnParams p, const int* tiles) {                       \
        attn_prefill<D>(p, tiles);                                                     \
    }
#ifndef ATTN_D
ATTN_PREFILL(64)
ATTN_PREFILL(128)
ATTN_SINKS(64)
ATTN_SINKS(128)

// Combines the splits of one (token, query head). With prefill_slot >= 0, that split holds the
// prefill kernel's part, written only for tokens of items with several new tokens.
// grid = (H, T), block = 32 (one warp; four channels per lane).
extern "C" __global__ void kivi_attn_reduce(const float* part_o, const float* part_ml, float* out,
                                            int n_head, int nsplit, int head_dim, const Tok* toks,
                                            int prefill_slot) {
    __shared__ float s_red[2];
    // Splits to read: all, less the prefill slot for a token that the prefill kernel skipped.
    // (Stream-relative records: a sink position's query has i < 0 and no prefill tile.)
    const Tok tk = toks[blockIdx.y];
    const int nread = (prefill_slot >= 0 && (tk.n_new <= 1 || tk.i < 0)) ? prefill_slot : nsplit;
    // (One warp; head_dim 64 or 128, as the cache.)
    if (head_dim == 64)
        combine_splits<1, 64, 1>(part_o, part_ml, out, blockIdx.y, n_head, blockIdx.x, nsplit, nread, s_red);
    else
        combine_splits<1, 128, 1>(part_o, part_ml, out, blockIdx.y, n_head, blockIdx.x, nsplit, nread, s_red);
}
#endif  // ATTN_D
