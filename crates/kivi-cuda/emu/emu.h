// A host emulator for the warp-level device functions of ../src/cache.cu: compiles the kernel
// source as C++ with the CUDA built-ins and the inline-PTX helpers replaced (KIVI_EMU), and runs
// one warp as 32 threads that meet at every warp-wide operation (__syncwarp, shuffles,
// mma.sync). f16 arithmetic rounds like the hardware (round to nearest even, one rounding per
// operation); mma.sync accumulates in double (the tensor cores' f32 sums differ in the last
// bits). For checking kernel logic without a GPU; timing means nothing here.
#pragma once
#include <strings.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

struct EmuDim {
    int x = 0, y = 0, z = 0;
};
inline thread_local EmuDim threadIdx, blockIdx, blockDim;
struct uint2 {
    u32 x, y;
};
struct uint4 {
    u32 x, y, z, w;
};

#define __device__
#define __forceinline__ inline
#define __global__
#define __shared__
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
inline int __ffs(int x) { return ffs(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

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
inline u16 d2h(double d) {
    _Float16 x = (_Float16)d;
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
inline u32 hfma2(u32 a, u32 b, u32 c) {
    u32 r = 0;
    for (int i = 0; i < 2; i++) {
        const int s = 16 * i;
        const double v = std::fma((double)h2f(a >> s), (double)h2f(b >> s), (double)h2f(c >> s));
        r |= (u32)d2h(v) << s;
    }
    return r;
}
inline u32 hmul2(u32 a, u32 b) {
    u32 r = 0;
    for (int i = 0; i < 2; i++) {
        const int s = 16 * i;
        r |= (u32)d2h((double)h2f(a >> s) * (double)h2f(b >> s)) << s;
    }
    return r;
}
inline u32 pack_h2(float lo, float hi) { return (u32)f2h(lo) | ((u32)f2h(hi) << 16); }
inline u32 and_or(u32 a, u32 b, u32 c) { return (a & b) | c; }

// One warp: its barrier and the slots through which lanes exchange operands.
struct EmuWarp {
    std::barrier<>* bar = nullptr;
    u32 a[32][4];
    u32 b[32][2];
    float sh[32];
};
inline EmuWarp emu_warp;
inline int emu_lane() { return threadIdx.x & 31; }
inline void emu_sync() { emu_warp.bar->arrive_and_wait(); }
#define __syncwarp(...) emu_sync()
// Only one-warp blocks are emulated.
#define __syncthreads() emu_sync()

inline float __shfl_xor_sync(u32, float v, int o) {
    const int l = emu_lane();
    emu_warp.sh[l] = v;
    emu_sync();
    const float r = emu_warp.sh[l ^ o];
    emu_sync();
    return r;
}
inline float __shfl_sync(u32, float v, int src) {
    const int l = emu_lane();
    emu_warp.sh[l] = v;
    emu_sync();
    const float r = emu_warp.sh[src & 31];
    emu_sync();
    return r;
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 with the fragment layouts of the PTX ISA
// (lane = 4 groupID + threadID_in_group): a0 (row g, k 2t..2t+1), a1 (row g + 8), a2 (k + 8),
// a3 (row g + 8, k + 8); b0 (k 2t..2t+1, column g), b1 (k + 8); c0, c1 (row g, columns 2t,
// 2t + 1), c2, c3 (row g + 8).
inline void mma_16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    const int l = emu_lane();
    emu_warp.a[l][0] = a0;
    emu_warp.a[l][1] = a1;
    emu_warp.a[l][2] = a2;
    emu_warp.a[l][3] = a3;
    emu_warp.b[l][0] = b0;
    emu_warp.b[l][1] = b1;
    emu_sync();
    auto A = [](int row, int k) {
        const u32 w = emu_warp.a[(row % 8) * 4 + (k % 8) / 2][(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
        return (double)h2f((u16)(w >> (16 * (k % 2))));
    };
    auto B = [](int k, int col) {
        const u32 w = emu_warp.b[col * 4 + (k % 8) / 2][k >= 8 ? 1 : 0];
        return (double)h2f((u16)(w >> (16 * (k % 2))));
    };
    const int g = l >> 2, t = l & 3;
    float out[4];
    for (int i = 0; i < 4; i++) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        double acc = c[i];
        for (int k = 0; k < 16; k++) acc += A(row, k) * B(k, col);
        out[i] = (float)acc;
    }
    emu_sync();
    for (int i = 0; i < 4; i++) c[i] = out[i];
}

// Runs f(lane) on the 32 lanes of one warp (threadIdx.x = lane, blockIdx = block).
inline void emu_run_warp(EmuDim block, const std::function<void(int)>& f) {
    std::barrier<> bar(32);
    emu_warp.bar = &bar;
    std::vector<std::thread> lanes;
    for (int l = 0; l < 32; l++)
        lanes.emplace_back([&, l] {
            threadIdx = EmuDim{l, 0, 0};
            blockDim = EmuDim{32, 1, 1};
            blockIdx = block;
            f(l);
        });
    for (auto& t : lanes) t.join();
    emu_warp.bar = nullptr;
}

#define KIVI_EMU 1
