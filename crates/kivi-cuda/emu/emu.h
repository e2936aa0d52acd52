// A host emulator for the kernels of ../src/cache.cu: compiles the kernel source as C++ with the
// CUDA built-ins and the inline-PTX helpers replaced (KIVI_EMU), and runs a CTA as one fiber
// per CUDA thread: the threads of a warp meet at every warp-wide operation (__syncwarp,
// shuffles, mma.sync), the whole CTA at __syncthreads; `__shared__` arrays are static (one CTA
// runs at a time), the dynamic ones a per-CTA buffer. x86-64 only (the fiber switch). f16 arithmetic rounds like the hardware
// (round to nearest even, one rounding per operation); mma.sync accumulates in double (the
// tensor cores' f32 sums differ in the last bits). For checking kernel logic without a GPU;
// timing means nothing here.
#pragma once
#include <strings.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

struct EmuDim {
    int x = 0, y = 0, z = 0;
};
// The current CUDA thread's indices: every CUDA thread is a fiber of one host thread, and the
// scheduler sets these before switching to it.
inline EmuDim threadIdx, blockIdx, blockDim;
struct uint2 {
    u32 x, y;
};
struct uint4 {
    u32 x, y, z, w;
};
struct float2 {
    float x, y;
};
struct float4 {
    float x, y, z, w;
};
inline uint4 make_uint4(u32 x, u32 y, u32 z, u32 w) { return uint4{x, y, z, w}; }
inline uint2 make_uint2(u32 x, u32 y) { return uint2{x, y}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

#define __device__
#define __forceinline__ inline
#define __global__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(u32 i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline u32 __float_as_uint(float f) {
    u32 i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fdividef(float a, float b) { return a / b; }
// cvt.rni.s32.f32: to nearest even; NaN gives 0, out-of-range values saturate.
inline int __float2int_rn(float x) {
    if (x != x) return 0;
    if (x >= 2147483520.0f) return 2147483647;
    if (x <= -2147483648.0f) return (-2147483647 - 1);
    return (int)std::nearbyint(x);
}
inline int __ffs(int x) { return ffs(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

inline float fast_exp2(float x) {  // ex2.approx.ftz
    const float y = std::exp2(x);
    return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}
inline float h2f(u16 h) {
    _Float16 x;
    std::memcpy(&x, &h, 2);
    return (float)x;
}
inline u16 f2h(float f) {
    _Float16 x = (_Float16)f;
    u16 h;
    std::memcpy(&h, &x, 2);
    return h;
}
inline u32 prmt(u32 a, u32 b, u32 sel) {
    const u64 x = ((u64)b << 32) | a;
    u32 r = 0;
    for (int i = 0; i < 4; i++) {
        const u32 nib = (sel >> (4 * i)) & 0xf;
        u32 byte = (u32)(x >> (8 * (nib & 7))) & 0xff;
        if (nib & 8) byte = (byte & 0x80) ? 0xff : 0;
        r |= byte << (8 * i);
    }
    return r;
}
inline u32 pack_h2(float lo, float hi) { return (u32)f2h(lo) | ((u32)f2h(hi) << 16); }

// Fibers: each CUDA thread of a CTA runs on its own stack in the one host thread, switching to
// the scheduler when it waits at a barrier (a few nanoseconds, where OS threads took a futex
// round trip per wait). x86-64 System V: the callee-saved registers go on the stack.
extern "C" void emu_ctx_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl emu_ctx_switch
.type emu_ctx_switch, @function
emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
)");

struct EmuFibers {
    // Threads per CTA at most (kivi_quantize_keys: 4 D = 512).
    static constexpr int N = 512;
    static constexpr size_t STACK = 512 * 1024;
    std::vector<std::unique_ptr<char[]>> stacks;
    void* sp[N];
    bool done[N];
    void* sched_sp = nullptr;
    int current = 0;
    const std::function<void(int)>* job = nullptr;
    EmuFibers() {
        for (int i = 0; i < N; i++) stacks.emplace_back(new char[STACK]);
    }
};
inline EmuFibers emu_fibers;

inline void emu_yield() {
    EmuFibers& f = emu_fibers;
    emu_ctx_switch(&f.sp[f.current], f.sched_sp);
}

// First code of a fiber: runs the CTA's function for its thread, then never comes back.
inline void emu_fiber_entry() {
    EmuFibers& f = emu_fibers;
    const int i = f.current;
    (*f.job)(i);
    f.done[i] = true;
    emu_yield();
    __builtin_unreachable();
}

// A barrier of `n` fibers.
struct EmuBarrier {
    int n, count = 0;
    u64 phase = 0;
    explicit EmuBarrier(int n_) : n(n_) {}
    void arrive_and_wait() {
        const u64 my = phase;
        if (++count == n) {
            count = 0;
            phase++;
            return;
        }
        while (*(volatile u64*)&phase == my) emu_yield();
    }
};

// One warp: its barrier and the slots through which lanes exchange operands, two of each:
// exchange n (shuffle or mma.sync) uses slot n % 2, so that one barrier per exchange suffices (a
// lane writes slot n % 2 again at exchange n + 2, after the barrier of n + 1, which every lane
// reaches only once it has read exchange n's values). Lanes count their exchanges in
// emu_exchanges; every lane of a warp makes the same ones (collectives are convergent).
struct EmuWarp {
    EmuBarrier* bar = nullptr;
    u32 a[2][32][4];
    u32 b[2][32][2];
    float sh[2][32];
};
constexpr int EMU_MAX_WARPS = 32;
static_assert(EmuFibers::N <= 32 * EMU_MAX_WARPS, "a CTA's fibers need their warps");
inline EmuWarp emu_warps[EMU_MAX_WARPS];
inline unsigned emu_exchanges[EMU_MAX_WARPS * 32];
inline EmuBarrier* emu_cta_bar = nullptr;
inline float* emu_dynamic_smem = nullptr;
inline int emu_lane() { return threadIdx.x & 31; }
inline EmuWarp& emu_warp() { return emu_warps[threadIdx.x >> 5]; }
// The calling lane's slot for its next exchange.
inline int emu_slot() { return emu_exchanges[threadIdx.x]++ & 1; }
inline void emu_sync() { emu_warp().bar->arrive_and_wait(); }
#define __syncwarp(...) emu_sync()
#define __syncthreads() emu_cta_bar->arrive_and_wait()
// CTAs run one after another: memory is coherent, and atomics need no care.
template <class T>
inline T __ldcg(const T* p) { return *p; }
inline int atomicAdd(int* p, int v) {
    const int old = *p;
    *p = old + v;
    return old;
}
inline void __threadfence() {}

inline float __shfl_xor_sync(u32, float v, int o) {
    EmuWarp& w = emu_warp();
    const int l = emu_lane();
    const int k = emu_slot();
    w.sh[k][l] = v;
    emu_sync();
    return w.sh[k][l ^ o];
}
inline float __shfl_up_sync(u32, float v, int o) {
    EmuWarp& w = emu_warp();
    const int l = emu_lane();
    const int k = emu_slot();
    w.sh[k][l] = v;
    emu_sync();
    return w.sh[k][l >= o ? l - o : l];
}
inline int atomicMax(int* p, int v) {
    const int old = *p;
    if (v > old) *p = v;
    return old;
}
inline float __shfl_sync(u32, float v, int src) {
    EmuWarp& w = emu_warp();
    const int l = emu_lane();
    const int k = emu_slot();
    w.sh[k][l] = v;
    emu_sync();
    return w.sh[k][src & 31];
}

// Every lane's mma.sync operands, shared through the warp: the exchange's slot of them.
struct EmuMmaOperands {
    const u32 (*a)[4];
    const u32 (*b)[2];
};
inline EmuMmaOperands emu_mma_operands(u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    EmuWarp& wp = emu_warp();
    const int l = emu_lane(), k = emu_slot();
    wp.a[k][l][0] = a0;
    wp.a[k][l][1] = a1;
    wp.a[k][l][2] = a2;
    wp.a[k][l][3] = a3;
    wp.b[k][l][0] = b0;
    wp.b[k][l][1] = b1;
    emu_sync();
    return {wp.a[k], wp.b[k]};
}

// Lane l's accumulators c0..c3 (row g, columns 2t, 2t + 1; row g + 8, the same columns) plus
// sum_k A(row, k) B(k, col) over K, accumulated exactly in Acc and converted back to C.
template <typename Acc, typename C, typename FA, typename FB>
inline void emu_mma_accumulate(C (&c)[4], int l, int K, FA A, FB B) {
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; i++) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        Acc acc = c[i];
        for (int k = 0; k < K; k++) acc += A(row, k) * B(k, col);
        c[i] = (C)acc;
    }
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 with the fragment layouts of the PTX ISA
// (lane = 4 groupID + threadID_in_group): a0 (row g, k 2t..2t+1), a1 (row g + 8), a2 (k + 8),
// a3 (row g + 8, k + 8); b0 (k 2t..2t+1, column g), b1 (k + 8); c0, c1 (row g, columns 2t,
// 2t + 1), c2, c3 (row g + 8).
inline void mma_16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    const EmuMmaOperands wp = emu_mma_operands(a0, a1, a2, a3, b0, b1);
    const int l = emu_lane(), g = l >> 2, t = l & 3;
    // The lane's rows g, g + 8 of A and columns 2t, 2t + 1 of B, converted once (the prefill
    // kernel runs millions of these in the long-prompt pipelines).
    double A[2][16], B[2][16];
    for (int k = 0; k < 16; k++) {
        const int half = 16 * (k % 2);
        for (int r = 0; r < 2; r++) A[r][k] = h2f((u16)(wp.a[g * 4 + (k % 8) / 2][r + (k >= 8 ? 2 : 0)] >> half));
        for (int j = 0; j < 2; j++) B[j][k] = h2f((u16)(wp.b[(2 * t + j) * 4 + (k % 8) / 2][k >= 8 ? 1 : 0] >> half));
    }
    for (int i = 0; i < 4; i++) {
        double acc = c[i];
        for (int k = 0; k < 16; k++) acc += A[i >> 1][k] * B[i & 1][k];
        c[i] = (float)acc;
    }
}

// mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32: a0 (row g, k 4t..4t+3, bytes), a1 (row
// g + 8), a2 (k + 16), a3 (row g + 8, k + 16), unsigned; b0 (k 4t..4t+3, column g), b1 (k +
// 16), signed (unsigned: imma_16832_uu); c as mma_16816 (32-bit integers, wrapping).
template <bool B_SIGNED = true>
inline void imma_16832(int (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    const EmuMmaOperands wp = emu_mma_operands(a0, a1, a2, a3, b0, b1);
    const int l = emu_lane();
    auto A = [&wp](int row, int k) {
        const u32 w = wp.a[(row % 8) * 4 + (k % 16) / 4][(row >= 8 ? 1 : 0) + (k >= 16 ? 2 : 0)];
        return (int64_t)((w >> (8 * (k % 4))) & 0xff);
    };
    auto B = [&wp](int k, int col) {
        const u32 w = wp.b[col * 4 + (k % 16) / 4][k >= 16 ? 1 : 0];
        const uint8_t byte = (uint8_t)(w >> (8 * (k % 4)));
        return B_SIGNED ? (int64_t)(int8_t)byte : (int64_t)byte;
    };
    // (int64 -> int wraps modulo 2^32 in C++20, as the hardware's s32 accumulators do.)
    emu_mma_accumulate<int64_t>(c, l, 32, A, B);
}

// The same with unsigned B (mma.sync ... .s32.u8.u8.s32).
inline void imma_16832_uu(int (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    imma_16832<false>(c, a0, a1, a2, a3, b0, b1);
}

// cp.async: a copy lands at some time between its issue and the wait that covers its group;
// here it lands at that wait, so a read of the destination before its wait sees the old bytes.
struct EmuCpAsync {
    struct Copy {
        int group;
        void* dst;
        const void* src;
    };
    std::vector<Copy> pending;
    int committed = 0;
};
inline EmuCpAsync emu_cp_async[32 * EMU_MAX_WARPS];
typedef char* SmemAddr;
inline SmemAddr smem_addr(const void* p) { return (char*)p; }
template <int DOFF, int SOFF, bool CA = false>
inline void cp_async16(SmemAddr dst, const void* src) {
    EmuCpAsync& a = emu_cp_async[threadIdx.x];
    a.pending.push_back({a.committed, dst + DOFF, (const char*)src + SOFF});
}
inline void cp_async_commit() { emu_cp_async[threadIdx.x].committed++; }
template <int N>
inline void cp_async_wait() {
    EmuCpAsync& a = emu_cp_async[threadIdx.x];
    std::vector<EmuCpAsync::Copy> later;
    for (const auto& c : a.pending) {
        if (c.group < a.committed - N)
            std::memcpy(c.dst, c.src, 16);
        else
            later.push_back(c);
    }
    a.pending = later;
}

// Runs f(thread) as one CTA of `threads` threads (blockIdx = block) with `smem_floats` floats
// of dynamic shared memory (NaN-filled, as unwritten memory must not be read): each thread a
// fiber, resumed in turn until all have finished.
inline void emu_run_block(EmuDim block, int threads, const std::function<void(int)>& fn, size_t smem_floats = 0) {
    EmuFibers& f = emu_fibers;
    if (threads > EmuFibers::N) {
        std::fprintf(stderr, "emu: %d threads per CTA, more than %d\n", threads, EmuFibers::N);
        std::abort();
    }
    EmuBarrier cta(threads);
    std::vector<std::unique_ptr<EmuBarrier>> warps;
    for (int w = 0; w * 32 < threads; w++) {
        warps.push_back(std::make_unique<EmuBarrier>(std::min(32, threads - 32 * w)));
        emu_warps[w].bar = warps.back().get();
    }
    emu_cta_bar = &cta;
    for (int i = 0; i < threads; i++) emu_cp_async[i] = EmuCpAsync{};
    std::vector<float> smem(smem_floats, NAN);
    emu_dynamic_smem = smem.data();
    blockIdx = block;
    blockDim = EmuDim{threads, 1, 1};
    f.job = &fn;
    for (int i = 0; i < threads; i++) {
        // A stack that "returns" into emu_fiber_entry: six saved registers, then the address;
        // 16-byte aligned at the call boundary.
        char* top = f.stacks[i].get() + EmuFibers::STACK;
        void** sp = (void**)((uintptr_t)top & ~(uintptr_t)15);
        *--sp = nullptr;                     // alignment slot (as if a return address)
        *--sp = (void*)&emu_fiber_entry;     // ret target
        for (int r = 0; r < 6; r++) *--sp = nullptr;
        f.sp[i] = sp;
        f.done[i] = false;
    }
    for (bool any = true; any;) {
        any = false;
        for (int i = 0; i < threads; i++) {
            if (f.done[i]) continue;
            any = true;
            f.current = i;
            threadIdx = EmuDim{i, 0, 0};
            emu_ctx_switch(&f.sched_sp, f.sp[i]);
        }
    }
    emu_cta_bar = nullptr;
}
// One warp.
inline void emu_run_warp(EmuDim block, const std::function<void(int)>& f) { emu_run_block(block, 32, f); }
// Every CTA of a grid, one after the other.
inline void emu_launch(EmuDim grid, int threads, const std::function<void(int)>& f, size_t smem_floats = 0) {
    for (int z = 0; z < grid.z; z++)
        for (int y = 0; y < grid.y; y++)
            for (int x = 0; x < grid.x; x++) emu_run_block(EmuDim{x, y, z}, threads, f, smem_floats);
}

#define KIVI_EMU 1
