// Runs the tensor-core key and value block paths and the sink attention of ../src/cache.cu on
// the host emulator (emu.h) against a double-precision reference over fresh random inputs:
// codes, scales and mins in the GPU cache layout, every supported head dim, bit width and group
// size, whole and partial blocks. `tests/emulator.rs` builds and runs it once per FOLD_SCALES
// setting.
#include "emu.h"
#include "../src/cache.cu"

#include <chrono>
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

// Quantized key block 0 of KV head 0: scores of one query head for the block's first `valid`
// tokens, through tc_key_block.
template <int D, int KB>
static void key_block(int G, int valid) {
    constexpr int WPD = KB, FPI = 32 / KB;
    std::vector<u32> kq((BLOCK_TOKENS / 32) * D * WPD);
    for (auto& w : kq) w = (u32)rng();
    const int ng = BLOCK_TOKENS / G;
    std::vector<u16> ks(ng * D), km(ng * D);
    for (int i = 0; i < ng * D; i++) {
        ks[i] = f2h((float)uni(0.01, 0.6));
        km[i] = f2h((float)uni(-3.0, 3.0));
    }
    std::vector<float> q(D);
    for (auto& x : q) x = (float)uni(-1.5, 1.5);
    AttnParams P{};
    P.c.kq = kq.data();
    P.c.ks = ks.data();
    P.c.km = km.data();
    P.c.kq_block = kq.size();
    P.c.ksm_block = ks.size();
    P.c.n_kv = 1;
    P.c.head_dim = D;
    P.c.group = G;
    P.c.k_bits = KB;
    P.split_len = BLOCK_TOKENS;
    P.scale_log2 = 1.0f;
    std::vector<uint2> qf((D / 16) * 32);
    query_fragments<D, 1>(q.data(), qf.data(), 0, 1);
    std::vector<float> sc(BLOCK_TOKENS, NAN);
    emu_run_warp({}, [&](int lane) { tc_key_block<D, KB, 1>(P, 0, 0, 0, 0, valid, qf.data(), sc.data(), lane); });
    std::vector<double> want(valid), mag(valid);
    std::vector<float> got(valid);
    for (int b = 0; b < valid; b++) {
        double s = 0, a = 0;
        for (int c = 0; c < D; c++) {
            const u32 w = kq[((b / 32) * D + c) * WPD + (b % 32) / FPI];
            const u32 code = (w >> ((b % FPI) * KB)) & ((1u << KB) - 1);
            const double k = code * (double)h2f(ks[(b / G) * D + c]) + (double)h2f(km[(b / G) * D + c]);
            s += (double)q[c] * k;
            a += std::fabs((double)q[c] * k);
        }
        want[b] = s;
        mag[b] = a;
        got[b] = sc[b];
    }
    char what[96];
    std::snprintf(what, sizeof what, "key block D %d bits %d G %d valid %d", D, KB, G, valid);
    check(what, want, got, mag, 1e-3);
}

// Quantized value block 0 of KV head 0 weighted by random softmax weights (first `valid`
// tokens), through tc_value_block and tc_value_store.
template <int D, int VB>
static void value_block(int G, int valid) {
    constexpr int FPI = 32 / VB;
    std::vector<u32> vq(BLOCK_TOKENS * D / FPI);
    for (auto& w : vq) w = (u32)rng();
    const int gpt = D / G;
    std::vector<u16> vs(BLOCK_TOKENS * gpt), vm(BLOCK_TOKENS * gpt);
    for (size_t i = 0; i < vs.size(); i++) {
        vs[i] = f2h((float)uni(0.01, 0.6));
        vm[i] = f2h((float)uni(-3.0, 3.0));
    }
    std::vector<float> p(BLOCK_TOKENS), sc(BLOCK_TOKENS);
    for (int t = 0; t < BLOCK_TOKENS; t++) {
        p[t] = (float)uni(0.0, 1.0);
        sc[t] = __uint_as_float(split_bits(p[t]));  // as the softmax stores tensor-core weights
    }
    AttnParams P{};
    P.c.vq = vq.data();
    P.c.vs = vs.data();
    P.c.vm = vm.data();
    P.c.vq_block = vq.size();
    P.c.vsm_block = vs.size();
    P.c.n_kv = 1;
    P.c.head_dim = D;
    P.c.group = G;
    P.c.v_bits = VB;
    P.split_len = BLOCK_TOKENS;
    std::vector<float> wacc(D, 0.0f);
    std::vector<u16> stage(2 * D / 32 * STAGE_ROW);
    emu_run_warp({}, [&](int lane) {
        float tacc[D / 16][4] = {};
#if FOLD_SCALES
        float tqm[4] = {};
        tc_value_block<D, VB, 1>(P, 0, 0, 0, 0, valid, sc.data(), tacc, tqm, stage.data(), lane);
        tc_value_store<D, 1>(P.c, tacc, tqm, wacc.data(), lane);
#else
        tc_value_block<D, VB, 1>(P, 0, 0, 0, 0, valid, sc.data(), tacc, stage.data(), lane);
        tc_value_store<D, 1>(P.c, tacc, wacc.data(), lane);
#endif
    });
    std::vector<double> want(D, 0.0), mag(D, 0.0);
    for (int t = 0; t < valid; t++)
        for (int c = 0; c < D; c++) {
            const u32 w = vq[t * (D / FPI) + c / FPI];
            const u32 code = (w >> ((c % FPI) * VB)) & ((1u << VB) - 1);
            const double v = code * (double)h2f(vs[t * gpt + c / G]) + (double)h2f(vm[t * gpt + c / G]);
            want[c] += (double)p[t] * v;
            mag[c] += std::fabs((double)p[t] * v);
        }
    char what[96];
    std::snprintf(what, sizeof what, "value block D %d bits %d G %d valid %d", D, VB, G, valid);
    check(what, want, wacc, mag, 1e-3);
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

int main() {
    const u64 seed = std::chrono::system_clock::now().time_since_epoch().count();
    rng.seed(seed);
    std::printf("FOLD_SCALES %d, seed %llu\n", FOLD_SCALES, (unsigned long long)seed);
    auto partial = [] { return 1 + (int)(rng() % 127); };
    for (int G : {32, 64, 128}) {
        for (int valid : {128, partial()}) {
            key_block<128, 2>(G, valid);
            key_block<128, 4>(G, valid);
            value_block<128, 2>(G, valid);
            value_block<128, 4>(G, valid);
            if (G <= 64) {
                key_block<64, 2>(G, valid);
                key_block<64, 4>(G, valid);
                value_block<64, 2>(G, valid);
                value_block<64, 4>(G, valid);
            }
        }
    }
    sinks<128>(4, 0, 6);
    sinks<128>(4, 2, 1);
    sinks<64>(4, 4, 3);
    sinks<64>(37, 20, 25);
    std::printf("%s\n", failures ? "FAILED" : "all passed");
    return failures ? 1 : 0;
}
