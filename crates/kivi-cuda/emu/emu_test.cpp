// Runs kernel code of ../src/cache.cu on the host emulator (emu.h) against double-precision
// references over fresh random inputs: the tensor-core key and value block paths (codes, scales
// and mins in the GPU cache layout; every supported head dim, bit width and group size; whole
// and partial blocks), the sink attention, and whole steps of attention and append (the
// pipelines below). `tests/emulator.rs` builds and runs it.
#include "emu.h"
#include "../src/cache.cu"
#include "../src/sample.cu"

#include <chrono>
#include <map>
#include <tuple>
#include <cstdio>
#include <random>

static std::mt19937_64 rng;
static double uni(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); }
static int failures = 0;

// Error norm relative to the norm of `scale` (per element: the sum of the magnitudes of the
// terms, so that a sum that cancels is not held to a tighter bound than its rounding allows).
static void check(const char* what, const std::vector<double>& want, const std::vector<float>& got,
                  const std::vector<double>& scale, double bound) {
    double num = 0, den = 0;
    for (size_t i = 0; i < want.size(); i++) {
        if (!std::isfinite(got[i])) {
            num = INFINITY;
            break;
        }
        num += (got[i] - want[i]) * (got[i] - want[i]);
        den += scale[i] * scale[i];
    }
    const double e = std::sqrt(num / std::max(den, 1e-30));
    const bool ok = e <= bound;
    if (!ok) failures++;
    std::printf("%-4s %s: rel err %.2e (bound %.0e)\n", ok ? "ok" : "FAIL", what, e, bound);
}

static void require(bool ok, const char* what) {
    if (!ok) failures++;
    if (!ok) std::printf("FAIL %s\n", what);
}
// Pipeline steps whose splits the attention kernel combined itself (tickets).
static int n_fused = 0;

// `n` random f16 scales (positive) and mins.
static std::pair<std::vector<u16>, std::vector<u16>> random_scales_mins(size_t n) {
    std::vector<u16> s(n), m(n);
    for (size_t i = 0; i < n; i++) {
        s[i] = f2h((float)uni(0.01, 0.6));
        m[i] = f2h((float)uni(-3.0, 3.0));
    }
    return {s, m};
}

// Params of one KV head's block 0 with group size G, a split of one block.
static AttnParams block_params(int D, int G) {
    AttnParams P{};
    P.c.n_kv = 1;
    P.c.head_dim = D;
    P.c.group = G;
    P.split_len = BLOCK_TOKENS;
    P.sc_stride = BLOCK_TOKENS;
    return P;
}

// Code of token b, channel c in a block's key codes / of token t, channel c in its value codes,
// from the layouts' definitions (cache.cu, "Codes are interleaved"): the quarter k, slot s and
// index i of the interleaved position (token or channel x = 32 k + s + 8 i), the word of the
// (quad, slot, quarter) in its plane (4-bit: plane i / 2, 8 D words each) and the byte of the
// quad member (channel or token % 4).
template <int BITS>
static u32 interleaved_code(const std::vector<u32>& words, int D, int quad_row, int slot_stride, int quad, int member,
                            int x) {
    const int k = x / 32, s = x % 8, i = (x % 32) / 8;
    const int plane = BITS == 4 ? i / 2 : 0, bit = BITS == 4 ? 4 * (i % 2) : 2 * i;
    // (The word in its row; rows' 16-byte groups chunk-major in units of four rows: code_word.)
    const int rw = s * slot_stride + k;
    const u32 w = words[plane * 8 * D + (quad / 4) * 4 * quad_row + (rw / 4) * 16 + (quad % 4) * 4 + rw % 4];
    return (w >> (8 * member + bit)) & ((1u << BITS) - 1);
}
template <int D, int KB>
static u32 key_code_ref(const std::vector<u32>& kq, int b, int c) {
    return interleaved_code<KB>(kq, D, 32, 4, c / 4, c % 4, b);  // quad rows: 8 slots x 4 quarters
}
template <int D, int VB>
static u32 value_code_ref(const std::vector<u32>& vq, int t, int c) {
    return interleaved_code<VB>(vq, D, D / 4, D / 32, t / 4, t % 4, c);  // 8 slots x D / 32 quarters
}

// block_params with key block 0's codes, scales and mins at `bits`.
static AttnParams key_params(int D, int G, int bits, std::vector<u32>& kq, std::vector<u16>& ks, std::vector<u16>& km) {
    AttnParams P = block_params(D, G);
    P.c.kq = kq.data();
    P.c.ks = ks.data();
    P.c.km = km.data();
    P.c.kq_block = kq.size();
    P.c.ksm_block = ks.size();
    P.c.k_bits = bits;
    P.scale_log2 = 1.0f;
    return P;
}
// ... and with value block 0's.
static AttnParams value_params(int D, int G, int bits, std::vector<u32>& vq, std::vector<u16>& vs, std::vector<u16>& vm) {
    AttnParams P = block_params(D, G);
    P.c.vq = vq.data();
    P.c.vs = vs.data();
    P.c.vm = vm.data();
    P.c.vq_block = vq.size();
    P.c.vsm_block = vs.size();
    P.c.v_bits = bits;
    return P;
}

// Quantized key block 0 of KV head 0: scores of one query head for the block's first `valid`
// tokens, through tc_key_block_i8.
template <int D, int KB>
static void key_block(int G, int valid, bool staged = false) {
    std::vector<u32> kq(BLOCK_TOKENS * D * KB / 32);
    for (auto& w : kq) w = (u32)rng();
    const int ng = BLOCK_TOKENS / G;
    auto [ks, km] = random_scales_mins(ng * D);
    for (int gi = (valid + G - 1) / G; gi < ng; gi++)  // unwritten groups past `valid` must not leak in
        for (int c = 0; c < D; c++) ks[gi * D + c] = km[gi * D + c] = 0x7e00;
    std::vector<float> q(D);
    for (auto& x : q) x = (float)uni(-1.5, 1.5);
    AttnParams P = key_params(D, G, KB, kq, ks, km);
    std::vector<float> sc(BLOCK_TOKENS, NAN);
    std::vector<u32> bbuf((D / 32) * 64);
    std::vector<uint4> cbuf(BLOCK_TOKENS * D / 16);  // a staged block's codes and padding (16-byte aligned)
    emu_run_warp({}, [&](int lane) {
        if (staged)  // (the codes copied into the warp's buffer first, STAGE_CODES)
            tc_key_block_i8<D, KB, true>(P, 0, 0, 0, 0, valid, __builtin_ctz(G) - 5, q.data(), bbuf.data(), sc.data(), lane,
                                         (u32*)cbuf.data());
        else
            tc_key_block_i8<D, KB, false>(P, 0, 0, 0, 0, valid, __builtin_ctz(G) - 5, q.data(), bbuf.data(), sc.data(), lane);
    });
    std::vector<double> want(valid), mag(valid);
    std::vector<float> got(valid);
    for (int b = 0; b < valid; b++) {
        double s = 0, a = 0;
        for (int c = 0; c < D; c++) {
            const double k = key_code_ref<D, KB>(kq, b, c) * (double)h2f(ks[(b / G) * D + c]) +
                             (double)h2f(km[(b / G) * D + c]);
            s += (double)q[c] * k;
            a += std::fabs((double)q[c] * k);
        }
        want[b] = s;
        mag[b] = a;
        got[b] = sc[b];
    }
    char what[96];
    std::snprintf(what, sizeof what, "key block%s D %d bits %d G %d valid %d", staged ? " (staged)" : "", D, KB, G,
                  valid);
    // The integer path quantizes only q s, to 16 bits.
    check(what, want, got, mag, 2e-5);
}

// Quantized value block 0 of KV head 0 weighted by random softmax weights (first `valid`
// tokens), through tc_value_block_i8 and tc_value_store_i8.
template <int D, int VB>
static void value_block(int G, int valid, bool staged = false) {
    std::vector<u32> vq(BLOCK_TOKENS * D * VB / 32);
    for (auto& w : vq) w = (u32)rng();
    const int gpt = D / G;
    auto [vs, vm] = random_scales_mins(BLOCK_TOKENS * gpt);
    std::vector<float> p(BLOCK_TOKENS), sc(BLOCK_TOKENS);
    for (int t = 0; t < BLOCK_TOKENS; t++) {
        p[t] = (float)uni(0.0, 1.0);
        // As the softmax stores the weights (past `valid`: other paths' weights, which it must
        // not use).
        sc[t] = t < valid ? p[t] : NAN;
    }
    for (int t = valid; t < BLOCK_TOKENS; t++)  // unwritten scales and mins past `valid` must not leak in either
        for (int j = 0; j < gpt; j++) vs[t * gpt + j] = vm[t * gpt + j] = 0x7e00;
    AttnParams P = value_params(D, G, VB, vq, vs, vm);
    std::vector<float> wacc(D, 0.0f);
    std::vector<u32> bbuf(4 * 64);
    std::vector<uint4> cbuf(BLOCK_TOKENS * D / 16);  // a staged block's codes and padding (16-byte aligned)
    emu_run_warp({}, [&](int lane) {
        float vacc[D / 16][2] = {};
        if (staged)  // (the codes copied into the warp's buffer first, STAGE_CODES)
            tc_value_block_i8<D, VB, true>(P, 0, 0, 0, 0, valid, sc.data(), bbuf.data(), vacc, lane, (u32*)cbuf.data());
        else
            tc_value_block_i8<D, VB, false>(P, 0, 0, 0, 0, valid, sc.data(), bbuf.data(), vacc, lane);
        tc_value_store_i8<D>(vacc, wacc.data(), lane);
    });
    std::vector<double> want(D, 0.0), mag(D, 0.0);
    for (int t = 0; t < valid; t++)
        for (int c = 0; c < D; c++) {
            const double v = value_code_ref<D, VB>(vq, t, c) * (double)h2f(vs[t * gpt + c / G]) +
                             (double)h2f(vm[t * gpt + c / G]);
            want[c] += (double)p[t] * v;
            mag[c] += std::fabs((double)p[t] * v);
        }
    char what[96];
    std::snprintf(what, sizeof what, "value block%s D %d bits %d G %d valid %d", staged ? " (staged)" : "", D, VB, G,
                  valid);
    check(what, want, wacc, mag, 2e-5);
}

// KB-bit key block 0 of KV head 0: scores of NG query heads for the block's first `valid`
// tokens, through tc_key_block_heads (several heads per CTA; QHAT: q^ given, as four-warp
// CTAs do; code words loaded AHEAD k-steps ahead).
template <int D, int KB, int NG, bool QHAT = false, int AHEAD = 2, bool PRE = false>
static void key_block_heads(int G, int valid) {
    std::vector<u32> kq(BLOCK_TOKENS * D * KB / 32);
    for (auto& w : kq) w = (u32)rng();
    const int ng = BLOCK_TOKENS / G;
    auto [ks, km] = random_scales_mins(ng * D);
    for (int gi = (valid + G - 1) / G; gi < ng; gi++)  // unwritten groups must not leak in
        for (int c = 0; c < D; c++) ks[gi * D + c] = km[gi * D + c] = 0x7e00;
    std::vector<float> q(NG * D), qmax(NG), qinv(NG);
    for (int h = 0; h < NG; h++) {
        const double amp = uni(0.1, 3.0);  // heads of different sizes
        float mx = 0.0f;
        for (int c = 0; c < D; c++) {
            q[h * D + c] = (float)uni(-amp, amp);
            mx = std::max(mx, std::fabs(q[h * D + c]));
        }
        qmax[h] = mx;
        qinv[h] = 1.0f / mx;  // as attn_split
    }
    std::vector<float> qhat((NG + 1) * D, 0.0f);  // (the last row: zeros)
    for (int x = 0; x < NG * D; x++) qhat[x] = q[x] * qinv[x / D];
    AttnParams P = key_params(D, G, KB, kq, ks, km);
    std::vector<uint2> qf((D / 16) * 32);
    query_fragments<D, NG, true>(q.data(), qf.data(), 0, 1);  // (the channel order of the mins' loads)
    // (PRE: B in two 512-word regions.)
    std::vector<float> sc(NG * BLOCK_TOKENS, NAN), wbuf(4 * D, NAN), pre_lo(512, NAN);
    // PRE (KEY_MINS_AHEAD): the mins' terms of a warp's four blocks first, and the block as the
    // warp's block bi, a random one of the four. (All four are block 0 here, so this checks the
    // terms, not which row a block takes: the 4200-token pipeline below does.)
    std::vector<float> mterm(64, NAN);
    const int bi = (int)(rng() % 4);
    if (PRE && KEY_MINS_AHEAD) {
        const int sblk[16] = {};
        emu_run_warp({}, [&](int lane) {
            float m[2];
            u32 a[2][D / 16][2];
            key_mins_load<D, 4>(P.c, 0, sblk, 0, 4, __builtin_ctz(G) - 5, lane, a);
            key_mins_terms<D>(P, a, qf.data(), lane, m);
            mterm[2 * lane] = m[0];
            mterm[2 * lane + 1] = m[1];
        });
    }
    emu_run_warp({}, [&](int lane) {
        const float m[2] = {mterm[2 * lane], mterm[2 * lane + 1]};
        tc_key_block_heads<D, KB, NG, QHAT, AHEAD, PRE>(P, 0, 0, 0, 0, valid, __builtin_ctz(G) - 5, q.data(), qmax.data(),
                                                    qinv.data(), qhat.data(), qf.data(), wbuf.data(), sc.data(), lane,
                                                    (u32*)pre_lo.data(), m, bi);
    });
    std::vector<double> want, mag;
    std::vector<float> got;
    for (int h = 0; h < NG; h++)
        for (int b = 0; b < valid; b++) {
            double s = 0, a = 0;
            for (int c = 0; c < D; c++) {
                const double k = key_code_ref<D, KB>(kq, b, c) * (double)h2f(ks[(b / G) * D + c]) +
                                 (double)h2f(km[(b / G) * D + c]);
                s += (double)q[h * D + c] * k;
                a += std::fabs((double)q[h * D + c] * k);
            }
            want.push_back(s);
            mag.push_back(a);
            got.push_back(sc[h * BLOCK_TOKENS + b]);
        }
    char what[96];
    std::snprintf(what, sizeof what, "key block (heads%s%s, ahead %d) D %d bits %d heads %d G %d valid %d",
                  QHAT ? ", q^ given" : "", PRE ? ", B formed once" : "", AHEAD, D, KB, NG, G, valid);
    check(what, want, got, mag, 1e-5);
}

// VB-bit value block 0 of KV head 0 weighted by NG heads' random softmax weights (first
// `valid` tokens), through tc_value_block_heads and tc_value_store_heads.
template <int D, int VB, int NG, int AHEAD = 2, bool PRE = false>
static void value_block_heads(int G, int valid) {
    std::vector<u32> vq(BLOCK_TOKENS * D * VB / 32);
    for (auto& w : vq) w = (u32)rng();
    const int gpt = D / G;
    auto [vs, vm] = random_scales_mins(BLOCK_TOKENS * gpt);
    for (int t = valid; t < BLOCK_TOKENS; t++)  // unwritten scales and mins must not leak in
        for (int j = 0; j < gpt; j++) vs[t * gpt + j] = vm[t * gpt + j] = 0x7e00;
    std::vector<float> p(NG * BLOCK_TOKENS), sc(NG * BLOCK_TOKENS);
    for (int i = 0; i < NG * BLOCK_TOKENS; i++) {
        p[i] = (float)uni(0.0, 1.0);
        // Past `valid`: finite weights that are not this path's (window rows', or the zeros
        // past a split's end), which must not leak in.
        sc[i] = i % BLOCK_TOKENS < valid ? p[i] : (float)uni(0.0, 1.0);
    }
    AttnParams P = value_params(D, G, VB, vq, vs, vm);
    // (PRE: B in wacc, the warp's value-sum slot, and wbuf; the store overwrites wacc.)
    std::vector<float> wacc(NG * D, PRE ? NAN : 0.0f), wbuf(4 * 128, NAN);
    emu_run_warp({}, [&](int lane) {
        float vacc[D / 16][2] = {}, pm[4 * (D / 32)] = {};
        tc_value_block_heads<D, VB, NG, AHEAD, PRE>(P, 0, 0, 0, 0, valid, sc.data(), wbuf.data(), vacc, pm, lane,
                                                (u32*)wacc.data());
        tc_value_store_heads<D, NG, PRE>(vacc, pm, wacc.data(), lane);
    });
    std::vector<double> want(NG * D, 0.0), mag(NG * D, 0.0);
    for (int h = 0; h < NG; h++)
        for (int t = 0; t < valid; t++)
            for (int c = 0; c < D; c++) {
                const double v = value_code_ref<D, VB>(vq, t, c) * (double)h2f(vs[t * gpt + c / G]) +
                                 (double)h2f(vm[t * gpt + c / G]);
                want[h * D + c] += (double)p[h * BLOCK_TOKENS + t] * v;
                // The scales' part at the weights' full scale, 1: its B (round(p s^), 16-bit fixed
                // point of the quarter's largest scale) is off by up to half a unit whatever p
                // is, so a block of a few small weights is not held to p times that (with p
                // here, valid = 1 failed ~5 % of seeds at 1.0-3.0e-5).
                mag[h * D + c] += std::fabs(value_code_ref<D, VB>(vq, t, c) * (double)h2f(vs[t * gpt + c / G])) +
                                  std::fabs((double)p[h * BLOCK_TOKENS + t] * h2f(vm[t * gpt + c / G]));
            }
    char what[96];
    std::snprintf(what, sizeof what, "value block (heads%s, ahead %d) D %d bits %d heads %d G %d valid %d",
                  PRE ? ", B formed once" : "", AHEAD, D, VB, NG, G, valid);
    check(what, want, wacc, mag, 1e-5);
}

// kivi_attn_sinks for a few tokens: n_old stored sink rows plus the step's new tokens.
template <int D>
static void sinks(int S, int n_old, int n_new) {
    const int hkv = 2, nh = 4, nsplit = 3, slot_index = 1, slot = 1;
    std::vector<u16> ksink(2 * hkv * S * D), vsink(ksink.size());
    for (size_t i = 0; i < ksink.size(); i++) {
        ksink[i] = f2h((float)uni(-2, 2));
        vsink[i] = f2h((float)uni(-2, 2));
    }
    std::vector<float> q(n_new * nh * D), kn(n_new * hkv * D), vn(kn.size());
    for (auto& x : q) x = (float)uni(-1, 1);
    for (auto& x : kn) x = (float)uni(-2, 2);
    for (auto& x : vn) x = (float)uni(-2, 2);
    std::vector<int> toks;
    for (int i = 0; i < n_new; i++) toks.insert(toks.end(), {slot, n_old, i, 0, n_new});
    std::vector<float> part_o(n_new * nh * nsplit * D, NAN), part_ml(n_new * nh * nsplit * 2, NAN);
    AttnParams P{};
    P.c.ksink = ksink.data();
    P.c.vsink = vsink.data();
    P.c.sink_head = (u64)S * D;
    P.c.sink_unit = (u64)hkv * S * D;
    P.c.sinks = S;
    P.c.n_kv = hkv;
    P.c.head_dim = D;
    P.q = q.data();
    P.knew = kn.data();
    P.vnew = vn.data();
    P.part_o = part_o.data();
    P.part_ml = part_ml.data();
    P.n_head = nh;
    P.nsplit = nsplit;
    P.scale_log2 = 0.3f;
    std::vector<double> want_o, want_l;
    std::vector<float> got_o, got_l;
    for (int tok = 0; tok < n_new; tok++)
        for (int h = 0; h < nh; h++) {
            emu_run_warp({tok, h, 0}, [&](int) { attn_sinks<D>(P, (const Tok*)toks.data(), slot_index); });
            const int kvh = h / (nh / hkv), n_att = std::min(n_old + tok + 1, S);
            std::vector<double> s(n_att);
            double m = -INFINITY;
            auto key = [&](int p, int d) {
                return p < n_old ? (double)h2f(ksink[((u64)slot * hkv + kvh) * S * D + (u64)p * D + d])
                                 : (double)kn[((u64)(p - n_old) * hkv + kvh) * D + d];
            };
            auto val = [&](int p, int d) {
                return p < n_old ? (double)h2f(vsink[((u64)slot * hkv + kvh) * S * D + (u64)p * D + d])
                                 : (double)vn[((u64)(p - n_old) * hkv + kvh) * D + d];
            };
            for (int p = 0; p < n_att; p++) {
                double dot = 0;
                for (int d = 0; d < D; d++) dot += (double)q[((u64)tok * nh + h) * D + d] * 0.3 * key(p, d);
                s[p] = dot;
                m = std::max(m, dot);
            }
            double l = 0;
            for (int p = 0; p < n_att; p++) l += std::exp2(s[p] - m);
            const u64 part = ((u64)tok * nh + h) * nsplit + slot_index;
            for (int d = 0; d < D; d++) {
                double o = 0;
                for (int p = 0; p < n_att; p++) o += std::exp2(s[p] - m) * val(p, d);
                // The partial is unnormalised at its own max: compare o / l.
                want_o.push_back(o / l);
                got_o.push_back(part_o[part * D + d] / part_ml[part * 2 + 1]);
            }
            want_l.push_back(m + std::log2(l));
            got_l.push_back(part_ml[part * 2] + std::log2(part_ml[part * 2 + 1]));
        }
    char what[96];
    std::snprintf(what, sizeof what, "sinks D %d S %d n_old %d n_new %d: output", D, S, n_old, n_new);
    check(what, want_o, got_o, want_o, 1e-5);
    std::snprintf(what, sizeof what, "sinks D %d S %d n_old %d n_new %d: log-sum-exp", D, S, n_old, n_new);
    check(what, want_l, got_l, want_l, 1e-5);
}


// The prefill kernel alone: one item's n_new new tokens (after n_old stored ones, which it does
// not read), causal attention among them, in tiles of PF_ROWS queries, against a double
// reference over the f32 inputs: every operand's two f16 parts keep the kernel near f32 (one
// part for the queries, the weights, the keys or the values measured 350-1000x the error).
template <int D>
static void prefill(int n_old, int n_new) {
    const int hkv = 2, nh = 6, nsplit = 2;
    std::vector<float> q(n_new * nh * D), kn(n_new * hkv * D), vn(kn.size());
    for (auto& x : q) x = (float)uni(-1.5, 1.5);
    for (auto& x : kn) x = (float)uni(-2, 2);
    for (auto& x : vn) x = (float)uni(-2, 2);
    std::vector<int> toks, tiles;
    for (int i = 0; i < n_new; i++) toks.insert(toks.end(), {0, n_old, i, 0, n_new});
    for (int i = 0; i < n_new; i += PF_ROWS) tiles.push_back(i);
    std::vector<float> part_o(n_new * nh * nsplit * D, NAN), part_ml(n_new * nh * nsplit * 2, NAN);
    AttnParams P{};
    P.c.n_kv = hkv;
    P.c.head_dim = D;
    P.q = q.data();
    P.knew = kn.data();
    P.vnew = vn.data();
    P.toks = (const Tok*)toks.data();
    P.part_o = part_o.data();
    P.part_ml = part_ml.data();
    P.n_head = nh;
    P.nsplit = nsplit;
    P.scale_log2 = 0.25f;
    emu_launch({(int)tiles.size(), nh, 1}, PF_THREADS, [&](int) { attn_prefill<D>(P, tiles.data()); });
    std::vector<double> want_o, want_l;
    std::vector<float> got_o, got_l;
    for (int i = 0; i < n_new; i++)
        for (int h = 0; h < nh; h++) {
            const int kvh = h / (nh / hkv);
            std::vector<double> sc(i + 1);
            double m = -INFINITY;
            for (int j = 0; j <= i; j++) {
                double dot = 0;
                for (int d = 0; d < D; d++) dot += (double)q[((u64)i * nh + h) * D + d] * 0.25 * kn[((u64)j * hkv + kvh) * D + d];
                m = std::max(m, sc[j] = dot);
            }
            double l = 0;
            for (auto& x : sc) l += (x = std::exp2(x - m));
            const u64 part = ((u64)i * nh + h) * nsplit + nsplit - 1;
            for (int d = 0; d < D; d++) {
                double o = 0;
                for (int j = 0; j <= i; j++) o += sc[j] * vn[((u64)j * hkv + kvh) * D + d];
                want_o.push_back(o / l);
                got_o.push_back(part_o[part * D + d] / part_ml[part * 2 + 1]);
            }
            want_l.push_back(m + std::log2(l));
            got_l.push_back(part_ml[part * 2] + std::log2(part_ml[part * 2 + 1]));
        }
    char what[96];
    std::snprintf(what, sizeof what, "prefill D %d n_old %d n_new %d: output", D, n_old, n_new);
    check(what, want_o, got_o, want_o, 5e-6);
    std::snprintf(what, sizeof what, "prefill D %d n_old %d n_new %d: log-sum-exp", D, n_old, n_new);
    check(what, want_l, got_l, want_l, 5e-6);
}

// ---- A whole step on the emulator: the GPU cache's layout in host memory (GpuCache's
// geometry, paged arenas, block tables, per-slot windows and sink rows), the step records of
// cache.rs's StepPlan (stream-relative after the sinks), and every kernel of GpuCache::attend
// and ::append in their order. Keys and values are drawn so that every quantization group is
// exact (power-of-two scale, a min on its grid, codes 0 and 2^b - 1 present): the cache then
// stores them exactly, and each step's attention must equal plain attention over every token
// appended so far, to rounding. A position or group mix-up shows as a large error. With R = 0
// (partial key groups quantized, and re-quantized as they fill) keys are drawn off the grid and
// the reference dequantizes the stream with the cache's own quantizer (dequantize_stream).
// KB = VB = 16: the f16 cache (rows paged in the window buffers, nothing quantized).
// `production`: the tensor-core choices GpuCache makes (whole blocks in multiples of the warps,
// a partial block only from 32 positions; the rest on CUDA cores), else every quantized block
// on the tensor cores. FST > 0 (the f16 cache): its blocks through the shared-memory ring of
// FST stages (F16_STAGES).
template <int D, int KB, int VB, int NG, int W, int FST = 0>
struct Pipeline {
    static constexpr bool F16 = KB == 16;
    int hkv, nh, G, R, S, split, slots, pool;
    bool production = false;
    u64 kq_head, ksm_head, kwin_head, vq_head, vsm_head, vwin_head;
    std::vector<u32> kq, vq;
    std::vector<u16> ks, km, vs, vm, kwin, vwin, ksink, vsink;
    std::vector<int> table;
    int width = 64;
    std::vector<int> lens;
    std::vector<std::vector<int>> blocks;
    std::vector<int> free_blocks;
    std::vector<std::vector<float>> hk, hv;  // [slot][position][Hkv][D]: every token appended
    // (slot, group, KV head, channel or channel group) -> (scale, min) of a quantization group.
    using GridKey = std::tuple<int, int, int, int>;
    using Grids = std::map<GridKey, std::pair<float, float>>;
    Grids kparams, vparams;
    double worst = 0;

    Pipeline(int hkv_, int nh_, int G_, int R_, int S_, int split_, int slots_, int pool_)
        : hkv(hkv_), nh(nh_), G(G_), R(R_), S(S_), split(split_), slots(slots_), pool(pool_) {
        kq_head = BLOCK_TOKENS * D * KB / 32;
        ksm_head = BLOCK_TOKENS / G * D;
        // R = 0: a G-row staging window for the partial key group, a one-row value window.
        kwin_head = F16 ? (u64)BLOCK_TOKENS * D : (u64)(R > 0 ? R : G) * D;
        vq_head = BLOCK_TOKENS * D * VB / 32;
        vsm_head = BLOCK_TOKENS * (D / G);
        vwin_head = F16 ? (u64)BLOCK_TOKENS * D : (u64)std::max(R, 1) * D;
        kq.assign(hkv * pool * kq_head, 0xdeadbeefu);
        vq.assign(hkv * pool * vq_head, 0xdeadbeefu);
        ks.assign(hkv * pool * ksm_head, 0x7e00);  // NaN: unwritten
        km = ks;
        vs.assign(hkv * pool * vsm_head, 0x7e00);
        vm = vs;
        kwin.assign((F16 ? pool : slots) * hkv * kwin_head, 0x7e00);
        vwin.assign((F16 ? pool : slots) * hkv * vwin_head, 0x7e00);
        ksink.assign(std::max(1, slots * hkv * S * D), 0x7e00);
        vsink = ksink;
        table.assign(slots * width, 0);
        lens.assign(slots, 0);
        blocks.resize(slots);
        hk.resize(slots);
        hv.resize(slots);
        for (int b = pool - 1; b >= 0; b--) free_blocks.push_back(b);
    }

    CacheBufs bufs() {
        CacheBufs c{};
        c.kq = kq.data();
        c.ks = ks.data();
        c.km = km.data();
        c.kwin = kwin.data();
        c.vq = vq.data();
        c.vs = vs.data();
        c.vm = vm.data();
        c.vwin = vwin.data();
        c.table = table.data();
        c.table_stride = width;
        c.kq_block = kq_head;
        c.kq_head = pool * kq_head;
        c.ksm_block = ksm_head;
        c.ksm_head = pool * ksm_head;
        c.vq_block = vq_head;
        c.vq_head = pool * vq_head;
        c.vsm_block = vsm_head;
        c.vsm_head = pool * vsm_head;
        c.kwin_unit = hkv * kwin_head;
        c.kwin_head = kwin_head;
        c.vwin_unit = hkv * vwin_head;
        c.vwin_head = vwin_head;
        c.n_kv = hkv;
        c.head_dim = D;
        c.group = G;
        c.resid = R;
        c.k_bits = KB;
        c.v_bits = VB;
        c.kwin_mod = R > 0 ? R : G;
        c.ksink = ksink.data();
        c.vsink = vsink.data();
        c.sink_unit = (u64)hkv * S * D;
        c.sink_head = (u64)S * D;
        c.sinks = S;
        if (F16) {  // rows paged in the window buffers, head-major like the other arenas
            c.kwin_unit = kwin_head;
            c.kwin_head = pool * kwin_head;
            c.vwin_unit = vwin_head;
            c.vwin_head = pool * vwin_head;
            c.is_f16 = 1;
            c.group = 32;
            c.resid = 0;
            c.k_bits = c.v_bits = 16;
        }
        return c;
    }

    static float exact_random() { return (float)((int)(rng() % 513) - 256) / 64.0f; }
    // The grid (power-of-two scale, min on it) of one quantization group, drawn on first use.
    static std::pair<float, float> grid(Grids& params, GridKey key) {
        auto it = params.find(key);
        if (it == params.end())
            it = params.insert({key, {std::ldexp(1.0f, -(int)(rng() % 4) - 2), (float)((int)(rng() % 17) - 8)}}).first;
        return it->second;
    }
    // A code for member `off` of a group: 0 and the top code at the first two, so that the
    // group's statistics are exactly its grid.
    static int grid_code(int off, int top) { return off == 0 ? 0 : off == 1 ? top : (int)(rng() % (top + 1)); }
    // Key channel c of KV head h at position p of a slot: sink positions anything f16-exact;
    // stream positions on their group's grid (codes 0 and max at the group's first two tokens).
    float key(int slot, int p, int h, int c) {
        if (F16 || p < S) return exact_random();
        const int sp = p - S, gi = sp / G, off = sp % G, top = (1 << KB) - 1;
        const auto [s, m] = grid(kparams, {slot, gi, h, c});
        if (R == 0) {
            // R = 0: partial groups are quantized (and re-quantized as they fill): off the grid,
            // extremes anywhere, so that a group's statistics change as its tokens arrive.
            return h2f(f2h((m + (float)uni(0.0, top)) * s));
        }
        return (m + grid_code(off, top)) * s;
    }
    // Value channel c: per token, groups of G channels on their grid (codes 0 and max at the
    // group's first two channels).
    float value(int slot, int p, int h, int c) {
        if (F16 || p < S) return exact_random();
        const int top = (1 << VB) - 1, off = c % G;
        const auto [s, m] = grid(vparams, {slot, p, h, c / G});
        return (m + grid_code(off, top)) * s;
    }

    // The stored (dequantized) stream of a slot with R = 0: keys per channel over groups of G
    // tokens, the last one partial; values per token over groups of G channels.
    void dequantize_stream(int slot, std::vector<float>& k, std::vector<float>& v) {
        const int n = lens[slot], s_n = n - std::min(n, S);
        auto deq = [](float x, GroupParams gp, int bits) {
            return (float)quantize_value(x, gp, bits) * h2f(gp.scale) + h2f(gp.min);
        };
        for (int h = 0; h < hkv; h++)
            for (int c = 0; c < D; c++)
                for (int g0 = 0; g0 < s_n; g0 += G) {
                    const int g1 = std::min(g0 + G, s_n);
                    float mn = INFINITY, mx = -INFINITY;
                    for (int p = g0; p < g1; p++) {
                        const float x = hk[slot][((u64)(S + p) * hkv + h) * D + c];
                        mn = std::min(mn, x);
                        mx = std::max(mx, x);
                    }
                    const GroupParams gp = group_params(mn, mx, KB);
                    for (int p = g0; p < g1; p++) {
                        float& x = k[((u64)(S + p) * hkv + h) * D + c];
                        x = deq(x, gp, KB);
                    }
                }
        for (int p = 0; p < s_n; p++)
            for (int h = 0; h < hkv; h++)
                for (int c0 = 0; c0 < D; c0 += G) {
                    float* row = &v[((u64)(S + p) * hkv + h) * D + c0];
                    float mn = INFINITY, mx = -INFINITY;
                    for (int c = 0; c < G; c++) {
                        mn = std::min(mn, row[c]);
                        mx = std::max(mx, row[c]);
                    }
                    const GroupParams gp = group_params(mn, mx, VB);
                    for (int c = 0; c < G; c++) row[c] = deq(row[c], gp, VB);
                }
    }

    // attend = false: the step's append alone (a long history, without the attention of its
    // own prompt, whose reference is O(n^2) in doubles and whose prefill tiles the emulator runs
    // mma by mma).
    void step(const std::vector<std::pair<int, int>>& items, bool attend = true) {
        // StepPlan (cache.rs).
        std::vector<int> sitems, toks, stoks, sinkw, kgroups, vtoks, tiles;
        int off = 0, max_len = 0;
        for (size_t it = 0; it < items.size(); it++) {
            const auto [slot, n_new] = items[it];
            const int n_old = lens[slot];
            const int new_sinks = std::min(n_old + n_new, S) - std::min(n_old, S);
            const int s_old = n_old - std::min(n_old, S), s_new = n_new - new_sinks, s_off = off + new_sinks;
            sitems.insert(sitems.end(), {slot, s_old, s_new, s_off});
            for (int i = 0; i < n_new; i++) {
                toks.insert(toks.end(), {slot, n_old, i, off, n_new});
                stoks.insert(stoks.end(), {slot, s_old, i - new_sinks, s_off, s_new});
                if (i < new_sinks) sinkw.insert(sinkw.end(), {off + i, slot, n_old + i});
            }
            if (s_new > 1)
                for (int i = 0; i < s_new; i += PF_ROWS) tiles.push_back(s_off + i);
            const int n = s_old + s_new;
            if (!F16) {
                // Quantized ends (R = 0: everything, the partial key group re-quantized).
                auto ends = [&](int m) { return R > 0 ? std::pair{m - m % R, std::max(m - R, 0)} : std::pair{m, m}; };
                const auto [k0, v0] = ends(s_old);
                const auto [k1, v1] = ends(n);
                if (k1 > k0)
                    for (int g = k0 / G; g < (k1 + G - 1) / G; g++) kgroups.insert(kgroups.end(), {(int)it, g});
                for (int p = v0; p < v1; p++) vtoks.insert(vtoks.end(), {(int)it, p});
            }
            // Blocks for the stream's quantized positions (the f16 cache: all of them).
            const int paged = F16 || R == 0 ? n : std::max(n - n % R, std::max(n - R, 0));
            const int want = (paged + BLOCK_TOKENS - 1) / BLOCK_TOKENS;
            while ((int)blocks[slot].size() < want) {
                blocks[slot].push_back(free_blocks.back());
                free_blocks.pop_back();
                table[slot * width + blocks[slot].size() - 1] = blocks[slot].back();
            }
            off += n_new;
            max_len = std::max(max_len, n);
        }
        const int T = off;
        // New tokens.
        std::vector<float> q(T * nh * D), kn(T * hkv * D), vn(T * hkv * D);
        for (auto& x : q) x = (float)uni(-1, 1);
        for (int z = 0; z < T; z++) {
            const int slot = toks[5 * z], p = toks[5 * z + 1] + toks[5 * z + 2];
            for (int h = 0; h < hkv; h++)
                for (int c = 0; c < D; c++) {
                    kn[(z * hkv + h) * D + c] = key(slot, p, h, c);
                    vn[(z * hkv + h) * D + c] = value(slot, p, h, c);
                }
        }
        std::vector<double> want;
        std::vector<float> got;
        if (attend) {
            // Attention (GpuCache::attend).
            const int n_rep = nh / hkv, nchunk = n_rep / NG;
            const int decode_splits = (max_len + split - 1) / split;
            const int prefill = tiles.empty() ? 0 : 1;
            const int nsplit = decode_splits + (S > 0 ? 1 : 0) + prefill;
            std::vector<float> part_o((size_t)T * nh * nsplit * D, NAN), part_ml((size_t)T * nh * nsplit * 2, NAN);
            std::vector<float> out((size_t)T * nh * D, NAN);
            AttnParams P{};
            P.c = bufs();
            P.q = q.data();
            P.knew = kn.data();
            P.vnew = vn.data();
            P.toks = (const Tok*)stoks.data();
            P.part_o = part_o.data();
            P.part_ml = part_ml.data();
            P.out = nullptr;
            P.n_head = nh;
            P.nsplit = nsplit;
            P.split_len = split;
            P.sc_stride = split + (NG > 1 ? 8 : 0);  // as the host (SCORE_ROW_PAD)
            P.scale_log2 = (float)(1.4426950408889634 / std::sqrt((double)D));
            P.tensor_cores = 1;
            P.tc_multiple = production && W > 1 ? W : 1;
            P.tc_partial_min = production ? 32 : 1;
            P.prefill = prefill;
            // As the host: with several decode splits only, the last CTA of each (token, head group)
            // combines them (tickets); the reduce kernel must then give the same bits.
            const bool fused = decode_splits > 1 && S == 0 && !prefill;
            std::vector<int> tickets((size_t)T * hkv * nchunk, 0);
            if (fused) {
                P.out = out.data();
                P.tickets = tickets.data();
            }
            const size_t smem = NG * D + W * NG * D + SML_FLOATS(NG) + NG * P.sc_stride + W * FST * 8 * D;
            if (decode_splits > 0)
                emu_launch({decode_splits, hkv * nchunk, T}, 32 * W, [&](int) { attn_split<D, KB, VB, NG, W, FST>(P); },
                           smem);
            if (S > 0) emu_launch({T, nh, 1}, 32, [&](int) { attn_sinks<D>(P, (const Tok*)toks.data(), decode_splits); });
            if (prefill)
                emu_launch({(int)tiles.size(), nh, 1}, 128, [&](int) { attn_prefill<D>(P, tiles.data()); });
            std::vector<float> reduced((size_t)T * nh * D, NAN);
            emu_launch({nh, T, 1}, 32, [&](int) {
                kivi_attn_reduce(part_o.data(), part_ml.data(), reduced.data(), nh, nsplit, D, (const Tok*)stoks.data(),
                                 prefill ? nsplit - 1 : -1);
            });
            if (fused) {
                n_fused++;
                for (int x : tickets) require(x == 0, "a ticket counter was left non-zero");
                require(std::memcmp(out.data(), reduced.data(), out.size() * sizeof(float)) == 0,
                      "the last CTA's combination differs from kivi_attn_reduce's");
            } else {
                out = reduced;
            }
            // Reference: plain attention over every token appended before (as stored) and this step's
            // up to it. With R > 0 the data is stored exactly; R = 0 quantizes every stream token (the
            // partial key group with its current statistics): dequantize as the cache's own
            // quantizer does (group_params, quantize_value of cache.cu).
            std::vector<std::vector<float>> sk = hk, sv = hv;
            if (!F16 && R == 0)
                for (int slot = 0; slot < slots; slot++) dequantize_stream(slot, sk[slot], sv[slot]);
            for (int z = 0; z < T; z++) {
                const int slot = toks[5 * z], n_old = toks[5 * z + 1], i = toks[5 * z + 2], o = toks[5 * z + 3];
                for (int h = 0; h < nh; h++) {
                    const int kvh = h / n_rep;
                    auto row = [&](bool k, int p) -> const float* {
                        if (p < n_old) return (k ? sk : sv)[slot].data() + ((u64)p * hkv + kvh) * D;
                        return (k ? kn : vn).data() + ((u64)(o + p - n_old) * hkv + kvh) * D;
                    };
                    std::vector<double> sc(n_old + i + 1);
                    double mx = -INFINITY;
                    for (int p = 0; p <= n_old + i; p++) {
                        double dot = 0;
                        for (int c = 0; c < D; c++) dot += (double)q[((u64)z * nh + h) * D + c] * row(true, p)[c];
                        sc[p] = dot / std::sqrt((double)D);
                        mx = std::max(mx, sc[p]);
                    }
                    double l = 0;
                    for (auto& x : sc) l += (x = std::exp(x - mx));
                    for (int c = 0; c < D; c++) {
                        double acc = 0;
                        for (int p = 0; p <= n_old + i; p++) acc += sc[p] * row(false, p)[c];
                        want.push_back(acc / l);
                        got.push_back(out[((u64)z * nh + h) * D + c]);
                    }
                }
            }
        }
        // Append (GpuCache::append).
        CacheBufs c = bufs();
        if (!sinkw.empty())
            emu_launch({(int)sinkw.size() / 3, hkv, 1}, D, [&](int) { kivi_write_sinks(c, sinkw.data(), kn.data(), vn.data()); });
        if (!kgroups.empty())
            emu_launch({(int)kgroups.size() / 2, hkv, 1}, 4 * D, [&](int) {
                kivi_quantize_keys(c, (const Item*)sitems.data(), (const Rec*)kgroups.data(), kn.data());
            });
        // A decode step (one token per item, none a sink) with values to quantize: one launch,
        // kivi_append_decode, as the host does.
        bool decode_only = sinkw.empty();
        for (const auto& it : items) decode_only = decode_only && it.second == 1;
        if (decode_only && !vtoks.empty()) {
            emu_launch({T, 1, 1}, 128, [&](int) { kivi_append_decode(c, (const Tok*)stoks.data(), kn.data(), vn.data()); });
        } else {
            if (!vtoks.empty())
                emu_launch({(int)vtoks.size() / 2, 1, 1}, 128, [&](int) {
                    kivi_quantize_values(c, (const Item*)sitems.data(), (const Rec*)vtoks.data(), vn.data());
                });
            emu_launch({T, 1, 1}, 128, [&](int) { kivi_write_window(c, (const Tok*)stoks.data(), kn.data(), vn.data()); });
        }
        for (int z = 0; z < T; z++) {
            const int slot = toks[5 * z];
            hk[slot].insert(hk[slot].end(), kn.begin() + (u64)z * hkv * D, kn.begin() + (u64)(z + 1) * hkv * D);
            hv[slot].insert(hv[slot].end(), vn.begin() + (u64)z * hkv * D, vn.begin() + (u64)(z + 1) * hkv * D);
        }
        for (const auto& [slot, n_new] : items) lens[slot] += n_new;
        double num = 0, den = 0;
        for (size_t j = 0; j < want.size(); j++) {
            num += std::isfinite(got[j]) ? (got[j] - want[j]) * (got[j] - want[j]) : INFINITY;
            den += want[j] * want[j];
        }
        worst = std::max(worst, std::sqrt(num / std::max(den, 1e-30)));
    }
};

// Longest prompt whose attention a pipeline checks (the prefill kernel at ~1100 tokens: ~10 s).
constexpr int PREFILL_CHECKED = 1100;

template <int D, int KB, int VB, int NG, int W, int FST = 0>
static void pipeline(int hkv, int nh, int G, int R, int S, int split, bool production = false, int prompt = 0) {
    Pipeline<D, KB, VB, NG, W, FST> pl(hkv, nh, G, R, S, split, 3, 64);
    pl.production = production;
    // Long prompts first (several blocks per warp), if asked for; their own attention (the
    // prefill kernel) is checked up to PREFILL_CHECKED tokens.
    if (prompt > 0) pl.step({{0, prompt}, {1, prompt / 2 + 3}}, prompt <= PREFILL_CHECKED);
    // Prompts that end inside, at and past the sinks; chunked prefill; decode steps of all three.
    const std::vector<std::vector<std::pair<int, int>>> steps = {
        {{0, 2}, {1, S + 1}, {2, 1}},
        {{0, S + 40}, {2, 1}},
        {{1, 90}, {2, 1}},
        {{0, 1}, {1, 1}, {2, 40}},
        {{0, 1}, {1, 1}, {2, 1}},
        {{0, 1}, {1, 37}, {2, 1}},
        {{0, 1}, {1, 1}, {2, 1}},
    };
    const auto t0 = std::chrono::steady_clock::now();
    for (const auto& st : steps) pl.step(st);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    char what[160];
    std::snprintf(what, sizeof what,
                  "pipeline D %d bits %d/%d heads %d/%d per CTA %d warps %d G %d R %d sinks %d split %d prompt %d%s%s",
                  D, KB, VB, nh, hkv, NG, W, G, R, S, split, prompt,
                  production ? " (production tensor-core choices)" : "", FST ? " (f16 ring)" : "");
    // On exactly quantizable data the dequantized values are exact; with R = 0 (data off the
    // grid) the tensor cores dequantize through f16 where the reference stays in f32.
    const double bound = R == 0 && KB < 16 ? 5e-4 : 1e-4;
    const bool ok = pl.worst <= bound;
    if (!ok) failures++;
    std::printf("%-4s %s: worst rel err %.2e (bound %.0e), %.1f s\n", ok ? "ok" : "FAIL", what, pl.worst, bound, secs);
}

// sample_rows' draw with its target in a rounding gap of the scan of the chunks' mass: an empty
// chunk whose interval [incl(t - 1), incl(t)) is an ulp wide, because the scan sums in a tree.
// The output must still be a kept token (it was left unwritten before session 21's fix). The
// gap and the draw u that lands in it come from the kernel's arithmetic replayed here (the
// emulator runs it in the same float operations).
static void sample_draw_in_gap() {
    const int vocab = 1000, nt = 128, chunk = (vocab + nt - 1) / nt;
    for (int attempt = 0; attempt < 100; attempt++) {
        std::vector<float> l(vocab);
        for (int i = 0; i < vocab; i++) l[i] = i > 0 && rng() % 2 ? (float)uni(-4.0, 4.0) : -INFINITY;
        float mx = -INFINITY;
        for (float v : l) mx = fmaxf(mx, v);
        // Chunk masses, the warps' inclusive scans (shfl_up), the warp totals' scan.
        std::vector<float> s(nt, 0.0f), x(nt), incl(nt);
        for (int t = 0; t < nt; t++)
            for (int i = std::min(t * chunk, vocab); i < std::min(t * chunk + chunk, vocab); i++) {
                const float w = expf((l[i] - mx) * 1.0f);
                if (w > 0.0f) s[t] += w;
            }
        x = s;
        for (int o = 1; o < 32; o <<= 1) {
            const std::vector<float> prev = x;
            for (int t = 0; t < nt; t++)
                if (t % 32 >= o) x[t] += prev[t - o];
        }
        float wtot[32] = {};
        for (int w = 0; w < nt / 32; w++) wtot[w] = x[32 * w + 31];
        for (int o = 1; o < 32; o <<= 1) {
            float prev[32];
            std::copy(wtot, wtot + 32, prev);
            for (int j = o; j < 32; j++) wtot[j] += prev[j - o];
        }
        for (int t = 0; t < nt; t++) incl[t] = x[t] + (t >= 32 ? wtot[t / 32 - 1] : 0.0f);
        const float total = incl[nt - 1];
        for (int t = 1; t < nt; t++) {
            if (s[t] != 0.0f || !(incl[t] > incl[t - 1])) continue;
            float u = incl[t - 1] / total;
            while (u * total < incl[t - 1]) u = std::nextafter(u, 1.0f);
            while (u * total >= incl[t - 1] && u > 0.0f && std::nextafter(u, 0.0f) * total >= incl[t - 1])
                u = std::nextafter(u, 0.0f);
            if (!(u * total < incl[t]) || u >= 1.0f) continue;
            const SampleRow row{0, 1.0f, 0, 1.0f, u};
            u32 out = 0xffffffffu;
            emu_launch({1, 1, 1}, nt, [&](int) { sample_rows(l.data(), vocab, &row, &out); });
            const bool ok = out < (u32)vocab && std::isfinite(l[out]);
            std::printf("%-4s sampling: draw in the scan's rounding gap after empty chunk %d (u %.9g): token %d\n",
                        ok ? "ok" : "FAIL", t, (double)u, (int)out);
            if (!ok) failures++;
            return;
        }
    }
    require(false, "sampling: no rounding gap in 100 random rows");
}

int main() {
    const u64 seed = std::chrono::system_clock::now().time_since_epoch().count();
    rng.seed(seed);
    std::printf("seed %llu\n", (unsigned long long)seed);
    auto partial = [] { return 1 + (int)(rng() % 127); };
    sample_draw_in_gap();
    // Whole and partial query tiles and key tiles; a tile starting past the first key tile.
    prefill<128>(0, 150);
    prefill<128>(0, 31);
    prefill<128>(7, 64);
    prefill<64>(3, 1 + (int)(rng() % 200));
    for (int G : {32, 64, 128}) {
        for (int valid : {128, partial()}) {
            key_block_heads<128, 2, 4>(G, valid);
            key_block_heads<128, 2, 4, true>(G, valid);
            key_block_heads<128, 2, 4, true, 1>(G, valid);
            key_block_heads<128, 2, 3, true>(G, valid);
            key_block_heads<128, 2, 3>(G, valid);
            key_block_heads<128, 2, 2>(G, valid);
            key_block_heads<128, 2, 4, true, 2, true>(G, valid);  // (PRE_B: four-warp CTAs, four heads)
            key_block_heads<128, 2, 4, true, 1, true>(G, valid);
            key_block_heads<128, 4, 4, true, 1, true>(G, valid);
            key_block_heads<128, 4, 4, true, 2>(G, valid);
            key_block_heads<128, 4, 3>(G, valid);
            value_block_heads<128, 2, 4>(G, valid);
            value_block_heads<128, 2, 4, 1>(G, valid);
            value_block_heads<128, 2, 4, 2, true>(G, valid);
            value_block_heads<128, 2, 4, 1, true>(G, valid);
            value_block_heads<128, 2, 3>(G, valid);
            value_block_heads<128, 2, 2>(G, valid);
            value_block_heads<128, 4, 4, 2, true>(G, valid);
            value_block_heads<128, 4, 4, 1>(G, valid);
            value_block_heads<128, 4, 3>(G, valid);
            if (G <= 64) {
                key_block_heads<64, 2, 3>(G, valid);
                key_block_heads<64, 2, 4>(G, valid);
                key_block_heads<64, 2, 2, true>(G, valid);
                key_block_heads<64, 4, 3>(G, valid);
                value_block_heads<64, 2, 3>(G, valid);
                value_block_heads<64, 2, 4>(G, valid);
                value_block_heads<64, 4, 3>(G, valid);
                value_block_heads<64, 4, 4, 1>(G, valid);
            }
            for (bool staged : {false, true}) {
                key_block<128, 2>(G, valid, staged);
                key_block<128, 4>(G, valid, staged);
                value_block<128, 2>(G, valid, staged);
                value_block<128, 4>(G, valid, staged);
                if (G <= 64) {
                    key_block<64, 2>(G, valid, staged);
                    key_block<64, 4>(G, valid, staged);
                    value_block<64, 2>(G, valid, staged);
                    value_block<64, 4>(G, valid, staged);
                }
            }
        }
    }
    sinks<128>(4, 0, 6);
    sinks<128>(4, 2, 1);
    sinks<64>(4, 4, 3);
    sinks<64>(37, 20, 25);
    pipeline<64, 2, 2, 2, 4>(2, 4, 32, 32, 4, 128);
    pipeline<128, 4, 2, 1, 4>(2, 2, 64, 128, 4, 128);
    pipeline<64, 2, 4, 1, 1>(2, 4, 32, 32, 37, 256);
    // Long prompts: several tensor-core blocks per warp and split.
    pipeline<128, 2, 2, 1, 1>(2, 2, 32, 32, 0, 512, true, 500);
    // (Four-head four-warp 2-bit CTAs with 4 blocks per warp: all 16 rows of key_mins_terms;
    // and at G = 64, 128.)
    pipeline<128, 2, 2, 4, 4>(1, 4, 32, 32, 0, 2048, true, 4200);
    pipeline<128, 2, 2, 4, 4>(1, 4, 64, 128, 0, 512, true, 1100);
    pipeline<128, 2, 2, 4, 4>(1, 4, 128, 128, 0, 512, true, 1100);
    // (Four-head four-warp 4-bit CTAs, B formed once per block, and mixed bit widths.)
    pipeline<128, 4, 4, 4, 4>(1, 4, 32, 128, 0, 512, true, 1100);
    pipeline<128, 4, 2, 4, 4>(1, 4, 64, 128, 0, 512, true, 700);
    pipeline<128, 4, 4, 1, 4>(1, 1, 64, 128, 4, 1024, false, 700);
    pipeline<128, 2, 2, 1, 4>(1, 1, 32, 32, 1, 128);
    // Without sinks: four and three query heads per CTA (GQA; SmolLM2 has 9 / 3).
    pipeline<128, 2, 2, 4, 4>(1, 4, 32, 128, 0, 256);
    pipeline<64, 4, 4, 3, 1>(1, 3, 32, 64, 0, 128);
    // One-warp CTAs of four heads at D = 128 combining their splits (combine_splits: four output
    // quads per thread).
    pipeline<128, 2, 2, 4, 1>(1, 4, 32, 32, 0, 128);
    // ... at 2 bits (tc_key_block_heads, tc_value_block_heads), SmolLM2's shape, and long
    // prompts (several blocks per warp, partial value blocks).
    pipeline<64, 2, 2, 3, 4>(1, 3, 32, 64, 0, 256, false, 300);
    pipeline<128, 2, 2, 4, 4>(1, 4, 32, 128, 0, 512, true, 600);
    // The f16 cache; the production tensor-core choices (CUDA-core partial blocks).
    pipeline<64, 16, 16, 2, 4>(1, 2, 32, 0, 0, 128);
    // The f16 cache over several blocks per warp (through the tensor cores unless built with
    // F16_TC=0).
    pipeline<128, 16, 16, 4, 4>(2, 8, 32, 0, 0, 512, false, 300);
    pipeline<128, 16, 16, 1, 4>(2, 2, 32, 0, 0, 512, true, 300);
    // ... with whole blocks left over after the blocks per warp (F16_TC_REST): 7-block splits.
    pipeline<128, 16, 16, 4, 4>(1, 4, 32, 0, 0, 896, true, 1000);
    // ... through the f16 ring (F16_STAGES, D = 128): 2-4 stages, streams of 1-3 blocks per
    // warp, a partial last block, leftover blocks spread unevenly.
    pipeline<128, 16, 16, 4, 4, 4>(2, 8, 32, 0, 0, 512, false, 300);
    pipeline<128, 16, 16, 1, 4, 3>(2, 2, 32, 0, 0, 512, true, 300);
    pipeline<128, 16, 16, 2, 4, 2>(1, 4, 32, 0, 0, 896, true, 1000);
    pipeline<128, 16, 16, 1, 4, 3>(1, 1, 32, 0, 0, 1536, false, 1400);
    pipeline<64, 2, 2, 1, 4>(2, 2, 32, 32, 4, 256, true);
    // R = 0 (every token quantized, the partial key group re-quantized on each append), sinks.
    pipeline<64, 4, 2, 2, 4>(1, 2, 32, 0, 4, 128);
    std::printf("%d pipeline steps combined their splits in the attention kernel\n", n_fused);
    require(n_fused > 0, "no pipeline step took the combining attention kernel");
    std::printf("%s\n", failures ? "FAILED" : "all passed");
    return failures ? 1 : 0;
}
