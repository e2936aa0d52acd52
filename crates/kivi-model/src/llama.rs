//! The Llama-family forward pass (Llama 2/3, Mistral, SmolLM2, Qwen2), written top to bottom
//! like llama2.c's `forward`, generic over the KV cache (`dyn KvCache`: f16 or KIVI).

use kivi_core::{AttendItem, KvCache, SeqId};
use rayon::prelude::*;

use crate::config::{Arch, Config, RopeStyle};
use crate::matrix::{dequantize, Matrix};
use crate::tensor::{RawTensor, TensorSource};
use crate::{ModelError, Result};

/// Tensor names of one checkpoint format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    Gguf,
    HuggingFace,
}

impl Naming {
    fn global(self, role: &str) -> String {
        match (self, role) {
            (Naming::Gguf, "embed") => "token_embd.weight".into(),
            (Naming::Gguf, "norm") => "output_norm.weight".into(),
            (Naming::Gguf, "output") => "output.weight".into(),
            (Naming::HuggingFace, "embed") => "model.embed_tokens.weight".into(),
            (Naming::HuggingFace, "norm") => "model.norm.weight".into(),
            (Naming::HuggingFace, "output") => "lm_head.weight".into(),
            _ => unreachable!("unknown global tensor role {role}"),
        }
    }

    fn layer(self, i: usize, role: &str) -> String {
        match self {
            Naming::Gguf => {
                let n = match role {
                    "attn_norm" => "attn_norm.weight",
                    "wq" => "attn_q.weight",
                    "wk" => "attn_k.weight",
                    "wv" => "attn_v.weight",
                    "bq" => "attn_q.bias",
                    "bk" => "attn_k.bias",
                    "bv" => "attn_v.bias",
                    "wo" => "attn_output.weight",
                    "ffn_norm" => "ffn_norm.weight",
                    "w_gate" => "ffn_gate.weight",
                    "w_up" => "ffn_up.weight",
                    "w_down" => "ffn_down.weight",
                    _ => unreachable!("unknown layer tensor role {role}"),
                };
                format!("blk.{i}.{n}")
            }
            Naming::HuggingFace => {
                let n = match role {
                    "attn_norm" => "input_layernorm.weight",
                    "wq" => "self_attn.q_proj.weight",
                    "wk" => "self_attn.k_proj.weight",
                    "wv" => "self_attn.v_proj.weight",
                    "bq" => "self_attn.q_proj.bias",
                    "bk" => "self_attn.k_proj.bias",
                    "bv" => "self_attn.v_proj.bias",
                    "wo" => "self_attn.o_proj.weight",
                    "ffn_norm" => "post_attention_layernorm.weight",
                    "w_gate" => "mlp.gate_proj.weight",
                    "w_up" => "mlp.up_proj.weight",
                    "w_down" => "mlp.down_proj.weight",
                    _ => unreachable!("unknown layer tensor role {role}"),
                };
                format!("model.layers.{i}.{n}")
            }
        }
    }
}

struct Layer {
    attn_norm: Vec<f32>, // [hidden]
    wq: Matrix,          // [n_head*head_dim][hidden]
    wk: Matrix,          // [n_kv_head*head_dim][hidden]
    wv: Matrix,          // [n_kv_head*head_dim][hidden]
    bias: Option<QkvBias>,
    wo: Matrix,         // [hidden][n_head*head_dim]
    ffn_norm: Vec<f32>, // [hidden]
    w_gate: Matrix,     // [ffn][hidden]
    w_up: Matrix,       // [ffn][hidden]
    w_down: Matrix,     // [hidden][ffn]
}

struct QkvBias {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Which positions of a forward pass produce logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token (generation).
    Last,
    /// Every token (evaluation).
    All,
}

/// One sequence's new tokens in [`Model::forward_batch`].
#[derive(Clone, Copy, Debug)]
pub struct BatchItem<'a> {
    pub seq: SeqId,
    /// Tokens at positions `cache.seq_len(seq)..`; may be empty (no logits then).
    pub tokens: &'a [u32],
    pub logits: Logits,
}

pub struct Model {
    pub config: Config,
    tok_embd: Matrix, // [vocab][hidden]
    layers: Vec<Layer>,
    out_norm: Vec<f32>, // [hidden]
    /// `None` when the output matrix is tied to the token embedding.
    output: Option<Matrix>, // [vocab][hidden]
    /// RoPE inverse frequencies, `[head_dim/2]`.
    inv_freq: Vec<f32>,
}

fn check_shape(t: &RawTensor, expected: &[usize]) -> Result<()> {
    if t.shape != expected {
        return Err(ModelError::TensorShape {
            name: t.name.clone(),
            expected: expected.to_vec(),
            found: t.shape.clone(),
        });
    }
    Ok(())
}

impl Model {
    /// Loads every tensor the architecture needs, checking each shape against `config`.
    pub fn load(src: &dyn TensorSource, naming: Naming, config: Config) -> Result<Model> {
        let c = &config;
        let matrix = |name: String, rows: usize, cols: usize| -> Result<Matrix> {
            let t = src.tensor(&name)?;
            check_shape(&t, &[rows, cols])?;
            Matrix::from_raw(t)
        };
        let vector = |name: String, len: usize| -> Result<Vec<f32>> {
            let t = src.tensor(&name)?;
            check_shape(&t, &[len])?;
            let v = dequantize(&t)?;
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(ModelError::format(
                    "model",
                    name,
                    format!("non-finite value at {i}"),
                ));
            }
            Ok(v)
        };
        let (h, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn);
        let layers = (0..c.n_layer)
            .map(|i| {
                let name = |role: &str| naming.layer(i, role);
                Ok(Layer {
                    attn_norm: vector(name("attn_norm"), h)?,
                    wq: matrix(name("wq"), q, h)?,
                    wk: matrix(name("wk"), kv, h)?,
                    wv: matrix(name("wv"), kv, h)?,
                    bias: if c.qkv_bias {
                        Some(QkvBias {
                            q: vector(name("bq"), q)?,
                            k: vector(name("bk"), kv)?,
                            v: vector(name("bv"), kv)?,
                        })
                    } else {
                        None
                    },
                    wo: matrix(name("wo"), h, q)?,
                    ffn_norm: vector(name("ffn_norm"), h)?,
                    w_gate: matrix(name("w_gate"), f, h)?,
                    w_up: matrix(name("w_up"), f, h)?,
                    w_down: matrix(name("w_down"), h, f)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let output_name = naming.global("output");
        let output = if src.contains(&output_name) {
            Some(matrix(output_name, c.vocab, h)?)
        } else {
            None
        };
        let half = c.head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| c.rope_theta.powf(-((2 * i) as f32) / c.head_dim as f32))
            .collect();
        Ok(Model {
            tok_embd: matrix(naming.global("embed"), c.vocab, h)?,
            out_norm: vector(naming.global("norm"), h)?,
            layers,
            output,
            inv_freq,
            config,
        })
    }

    /// Bytes of weights held or mapped.
    pub fn weight_bytes(&self) -> usize {
        let mut n = self.tok_embd.n_bytes() + self.output.as_ref().map_or(0, |m| m.n_bytes());
        for l in &self.layers {
            for m in [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down] {
                n += m.n_bytes();
            }
        }
        n
    }

    /// Runs `tokens` (positions `cache.seq_len(seq)..`) through the model, reading and extending
    /// `seq`'s KV cache, and returns logits `[n][vocab]` (`Logits::All`) or `[vocab]` (`Last`).
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut dyn KvCache,
        seq: SeqId,
        logits: Logits,
    ) -> Result<Vec<f32>> {
        let item = BatchItem {
            seq,
            tokens,
            logits,
        };
        Ok(self
            .forward_batch(&[item], cache)?
            .pop()
            .unwrap_or_default())
    }

    /// Runs several sequences, each with its own new tokens (1 for decode, many for a prefill
    /// chunk), in one pass: their rows are concatenated for every matmul (weights are read once
    /// per step), RoPE uses each item's own positions, attention goes through
    /// [`KvCache::attend_batch`]. Returns each item's logits as [`Model::forward`] would.
    ///
    /// Each row's result does not depend on the other rows of the batch (the weight kernels
    /// compute every activation row with the same instruction sequence whatever the tile, and
    /// attention is per item), so a sequence's outputs are bit-identical alone or batched.
    /// Everything is checked before anything is computed: on error the cache is unchanged.
    pub fn forward_batch(
        &self,
        items: &[BatchItem<'_>],
        cache: &mut dyn KvCache,
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        // Row offsets and positions of every item; checks first, so errors leave no trace.
        let mut starts = Vec::with_capacity(items.len() + 1);
        let mut pos = Vec::new(); // position of every row
        let mut n = 0;
        for (i, it) in items.iter().enumerate() {
            starts.push(n);
            if items[..i].iter().any(|o| o.seq == it.seq) {
                return Err(ModelError::Cache(kivi_core::Error::Shape {
                    op: "forward_batch",
                    detail: format!("sequence {:?} appears twice in one batch", it.seq),
                }));
            }
            let pos0 = cache.seq_len(0, it.seq)?;
            if pos0 + it.tokens.len() > c.context_len {
                return Err(ModelError::ContextOverflow {
                    prompt: pos0 + it.tokens.len(),
                    context: c.context_len,
                });
            }
            if let Some(&t) = it.tokens.iter().find(|&&t| t as usize >= c.vocab) {
                return Err(ModelError::Tokenizer(format!(
                    "token id {t} >= vocab {}",
                    c.vocab
                )));
            }
            pos.extend(pos0..pos0 + it.tokens.len());
            n += it.tokens.len();
        }
        starts.push(n);
        if n == 0 {
            return Ok(vec![Vec::new(); items.len()]);
        }
        let (h, qd, kvd) = (c.hidden, c.q_dim(), c.kv_dim());

        // x = embed(tokens): [n][hidden]
        let mut x = vec![0f32; n * h];
        let all_tokens = items.iter().flat_map(|it| it.tokens.iter());
        for (row, &t) in x.chunks_exact_mut(h).zip(all_tokens) {
            self.tok_embd.row_f32(t as usize, row);
        }

        let mut xb = vec![0f32; n * h]; // normed activations [n][hidden]
        let mut q = vec![0f32; n * qd]; // [n][n_head][head_dim]
        let mut k = vec![0f32; n * kvd]; // [n][n_kv_head][head_dim]
        let mut v = vec![0f32; n * kvd];
        let mut att = vec![0f32; n * qd]; // attention output [n][n_head][head_dim]
        let mut gate = vec![0f32; n * c.ffn]; // [n][ffn]
        let mut up = vec![0f32; n * c.ffn];
        let mut tmp = vec![0f32; n * h];

        for (li, layer) in self.layers.iter().enumerate() {
            // --- attention block: xb = rmsnorm(x); q,k,v = xb·Wqᵀ,.. ; rope; attend; x += att·Woᵀ
            rmsnorm(&mut xb, &x, &layer.attn_norm, c.rms_eps);
            layer.wq.matmul(&xb, n, &mut q);
            layer.wk.matmul(&xb, n, &mut k);
            layer.wv.matmul(&xb, n, &mut v);
            if let Some(b) = &layer.bias {
                add_bias(&mut q, &b.q);
                add_bias(&mut k, &b.k);
                add_bias(&mut v, &b.v);
            }
            self.rope(&mut q, c.n_head, &pos);
            self.rope(&mut k, c.n_kv_head, &pos);
            {
                let mut att_rest = &mut att[..];
                let mut attend = Vec::with_capacity(items.len());
                for (i, it) in items.iter().enumerate() {
                    let (a, b) = (starts[i], starts[i + 1]);
                    let (out, rest) = std::mem::take(&mut att_rest).split_at_mut((b - a) * qd);
                    att_rest = rest;
                    attend.push(AttendItem {
                        seq: it.seq,
                        q: &q[a * qd..b * qd],
                        k_new: &k[a * kvd..b * kvd],
                        v_new: &v[a * kvd..b * kvd],
                        out,
                    });
                }
                cache.attend_batch(li, c.n_head, &mut attend)?;
            }
            for (i, it) in items.iter().enumerate() {
                let (a, b) = (starts[i], starts[i + 1]);
                if b > a {
                    cache.append(li, it.seq, &k[a * kvd..b * kvd], &v[a * kvd..b * kvd])?;
                }
            }
            layer.wo.matmul(&att, n, &mut tmp);
            add_in_place(&mut x, &tmp);

            // --- feed-forward block: x += W_down·(silu(W_gate·xb) * W_up·xb), xb = rmsnorm(x)
            rmsnorm(&mut xb, &x, &layer.ffn_norm, c.rms_eps);
            layer.w_gate.matmul(&xb, n, &mut gate);
            layer.w_up.matmul(&xb, n, &mut up);
            swiglu_in_place(&mut gate, &up);
            layer.w_down.matmul(&gate, n, &mut tmp);
            add_in_place(&mut x, &tmp);
        }

        // --- logits = rmsnorm(x)·W_outᵀ, for the rows each item asks for, in one matmul
        let rows: Vec<std::ops::Range<usize>> = items
            .iter()
            .enumerate()
            .map(|(i, it)| {
                let (a, b) = (starts[i], starts[i + 1]);
                match it.logits {
                    _ if a == b => a..a,
                    Logits::All => a..b,
                    Logits::Last => b - 1..b,
                }
            })
            .collect();
        let m: usize = rows.iter().map(|r| r.len()).sum();
        let mut normed = vec![0f32; m * h];
        let mut o = 0;
        for r in &rows {
            let xs = &x[r.start * h..r.end * h];
            rmsnorm(
                &mut normed[o * h..(o + r.len()) * h],
                xs,
                &self.out_norm,
                c.rms_eps,
            );
            o += r.len();
        }
        let mut out = vec![0f32; m * c.vocab];
        self.output
            .as_ref()
            .unwrap_or(&self.tok_embd)
            .matmul(&normed, m, &mut out);
        let mut o = 0;
        Ok(rows
            .iter()
            .map(|r| {
                let l = out[o * c.vocab..(o + r.len()) * c.vocab].to_vec();
                o += r.len();
                l
            })
            .collect())
    }

    /// Rotates each head of `x` (`[n][heads][head_dim]`) by its row's position `pos[row]`.
    fn rope(&self, x: &mut [f32], heads: usize, pos: &[usize]) {
        let d = self.config.head_dim;
        let half = d / 2;
        let style = self.config.rope_style;
        x.par_chunks_mut(heads * d)
            .zip(pos.par_iter())
            .for_each(|(tok, &p)| {
                let p = p as f32;
                let (sin, cos): (Vec<f32>, Vec<f32>) =
                    self.inv_freq.iter().map(|f| (p * f).sin_cos()).unzip();
                for head in tok.chunks_exact_mut(d) {
                    for i in 0..half {
                        let (a, b) = match style {
                            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                            RopeStyle::Neox => (i, i + half),
                        };
                        let (x0, x1) = (head[a], head[b]);
                        head[a] = x0 * cos[i] - x1 * sin[i];
                        head[b] = x0 * sin[i] + x1 * cos[i];
                    }
                }
            });
    }

    pub fn arch(&self) -> Arch {
        self.config.arch
    }
}

/// `out[t] = x[t] / sqrt(mean(x[t]²) + eps) * w` for each row `t`.
fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let h = w.len();
    for (o, xr) in out.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((o, xv), wv) in o.iter_mut().zip(xr).zip(w) {
            *o = xv * inv * wv;
        }
    }
}

fn add_bias(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_exact_mut(b.len()) {
        add_in_place(row, b);
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `gate = silu(gate) * up`; threads only pay off for prefill-sized inputs.
fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    let f = |(g, u): (&mut f32, &f32)| *g = silu(*g) * u;
    if gate.len() >= 1 << 16 {
        gate.par_iter_mut().zip(up.par_iter()).for_each(f);
    } else {
        gate.iter_mut().zip(up).for_each(f);
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}
