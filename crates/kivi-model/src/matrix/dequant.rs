//! Scalar reference dequantizers: these define the block formats, exactly as ggml's
//! `dequantize_row_*` in `ggml/src/ggml-quants.c` (block layouts from `ggml-common.h`).
//! Checked bit-exact against the `gguf` Python package (`tests/matrix_dequant.rs`).

use half::{bf16, f16};

use crate::tensor::DType;

/// Elements per K-quant super-block.
pub const QK_K: usize = 256;
/// Elements per legacy block (Q4_0, Q4_1, Q5_0, Q8_0).
pub const QK: usize = 32;

#[inline]
pub(crate) fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

/// `F32` little-endian bytes.
pub fn dequantize_row_f32_ref(b: &[u8], y: &mut [f32]) {
    for (y, c) in y.iter_mut().zip(b.chunks_exact(4)) {
        *y = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

/// `F16` little-endian bytes.
pub fn dequantize_row_f16_ref(b: &[u8], y: &mut [f32]) {
    for (y, c) in y.iter_mut().zip(b.chunks_exact(2)) {
        *y = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
    }
}

/// `BF16` little-endian bytes.
pub fn dequantize_row_bf16_ref(b: &[u8], y: &mut [f32]) {
    for (y, c) in y.iter_mut().zip(b.chunks_exact(2)) {
        *y = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
    }
}

/// `block_q4_0 { f16 d; u8 qs[16] }`: `y[j] = (lo(qs[j]) - 8) d`, `y[j+16] = (hi(qs[j]) - 8) d`.
pub fn dequantize_row_q4_0_ref(b: &[u8], y: &mut [f32]) {
    for (blk, y) in b.chunks_exact(18).zip(y.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        for j in 0..16 {
            let q = blk[2 + j];
            y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
            y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// `block_q4_1 { f16 d, m; u8 qs[16] }`: `y = q d + m`, low nibbles are elements 0..15.
pub fn dequantize_row_q4_1_ref(b: &[u8], y: &mut [f32]) {
    for (blk, y) in b.chunks_exact(20).zip(y.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        let m = f16_at(blk, 2);
        for j in 0..16 {
            let q = blk[4 + j];
            y[j] = (q & 0x0F) as f32 * d + m;
            y[j + 16] = (q >> 4) as f32 * d + m;
        }
    }
}

/// `block_q5_0 { f16 d; u8 qh[4]; u8 qs[16] }`: bit `k` of `qh` is the 5th bit of element `k`;
/// `y = (q - 16) d`.
pub fn dequantize_row_q5_0_ref(b: &[u8], y: &mut [f32]) {
    for (blk, y) in b.chunks_exact(22).zip(y.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        for j in 0..16 {
            let q = blk[6 + j];
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            y[j] = (((q & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
            y[j + 16] = (((q >> 4) as u32 | h1) as i32 - 16) as f32 * d;
        }
    }
}

/// `block_q8_0 { f16 d; i8 qs[32] }`: `y = q d`.
pub fn dequantize_row_q8_0_ref(b: &[u8], y: &mut [f32]) {
    for (blk, y) in b.chunks_exact(34).zip(y.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        for j in 0..QK {
            y[j] = (blk[2 + j] as i8) as f32 * d;
        }
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) of a Q4_K block.
#[inline]
pub fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `block_q4_K { f16 d, dmin; u8 scales[12]; u8 qs[128] }`: 8 sub-blocks of 32,
/// `y = d sc q - dmin m`; each 32 bytes of `qs` hold two sub-blocks (low nibbles first).
pub fn dequantize_row_q4_k_ref(b: &[u8], y: &mut [f32]) {
    for (blk, y) in b.chunks_exact(144).zip(y.chunks_exact_mut(QK_K)) {
        let d = f16_at(blk, 0);
        let dmin = f16_at(blk, 2);
        let scales = &blk[4..16];
        let qs = &blk[16..144];
        for j in 0..4 {
            let (sc1, m1) = get_scale_min_k4(2 * j, scales);
            let (sc2, m2) = get_scale_min_k4(2 * j + 1, scales);
            let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
            let q = &qs[32 * j..32 * j + 32];
            let y = &mut y[64 * j..64 * j + 64];
            for l in 0..32 {
                y[l] = d1 * (q[l] & 0x0F) as f32 - m1;
                y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
            }
        }
    }
}

/// `block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d }`: 16 groups of 16,
/// `y = d sc (q - 32)`, q = 4 low bits from `ql` | 2 high bits from `qh`.
pub fn dequantize_row_q6_k_ref(b: &[u8], y: &mut [f32]) {
    for (blk, y) in b.chunks_exact(210).zip(y.chunks_exact_mut(QK_K)) {
        let d = f16_at(blk, 208);
        for n in 0..2 {
            let ql = &blk[64 * n..64 * n + 64];
            let qh = &blk[128 + 32 * n..128 + 32 * n + 32];
            let sc = &blk[192 + 8 * n..192 + 8 * n + 8];
            let y = &mut y[128 * n..128 * n + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
            }
        }
    }
}

/// Dequantizes `y.len()` elements (a whole number of blocks) of type `dtype` from `b`.
pub fn dequantize_row_ref(dtype: DType, b: &[u8], y: &mut [f32]) {
    debug_assert_eq!(y.len() % dtype.block_size(), 0);
    debug_assert!(b.len() >= y.len() / dtype.block_size() * dtype.block_bytes());
    match dtype {
        DType::F32 => dequantize_row_f32_ref(b, y),
        DType::F16 => dequantize_row_f16_ref(b, y),
        DType::BF16 => dequantize_row_bf16_ref(b, y),
        DType::Q4_0 => dequantize_row_q4_0_ref(b, y),
        DType::Q4_1 => dequantize_row_q4_1_ref(b, y),
        DType::Q5_0 => dequantize_row_q5_0_ref(b, y),
        DType::Q8_0 => dequantize_row_q8_0_ref(b, y),
        DType::Q4_K => dequantize_row_q4_k_ref(b, y),
        DType::Q6_K => dequantize_row_q6_k_ref(b, y),
    }
}
