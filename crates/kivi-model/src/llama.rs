//! The Llama-family forward pass (Llama 2/3, Mistral, SmolLM2, Qwen2), written once, top to
//! bottom like llama2.c's `forward`, over a [`Backend`] (CPU: [`Cpu`] with any `dyn KvCache`,
//! f16 or KIVI; GPU: `kivi_cuda::CudaBackend`).

use kivi_core::{KvCache, SeqId};

use crate::backend::{finite_vector, Backend, Cpu, Rope};
use crate::config::{Arch, Config};
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

/// One transformer block's weights.
pub struct LayerWeights<B: Backend> {
    pub attn_norm: B::Vector, // [hidden]
    pub wq: B::Weight,        // [n_head*head_dim][hidden]
    pub wk: B::Weight,        // [n_kv_head*head_dim][hidden]
    pub wv: B::Weight,        // [n_kv_head*head_dim][hidden]
    pub bias: Option<QkvBias<B>>,
    pub wo: B::Weight,       // [hidden][n_head*head_dim]
    pub ffn_norm: B::Vector, // [hidden]
    pub w_gate: B::Weight,   // [ffn][hidden]
    pub w_up: B::Weight,     // [ffn][hidden]
    pub w_down: B::Weight,   // [hidden][ffn]
}

/// Qwen2's q/k/v projection biases.
pub struct QkvBias<B: Backend> {
    pub q: B::Vector,
    pub k: B::Vector,
    pub v: B::Vector,
}

/// Every weight of a model, in a backend's form.
pub struct Weights<B: Backend> {
    pub tok_embd: B::Weight, // [vocab][hidden]
    pub layers: Vec<LayerWeights<B>>,
    pub out_norm: B::Vector, // [hidden]
    /// `None` when the output matrix is tied to the token embedding.
    pub output: Option<B::Weight>, // [vocab][hidden]
}

/// Which positions of a forward pass produce logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token (generation).
    Last,
    /// Every token (evaluation).
    All,
    /// None (a prefill chunk whose logits nobody reads).
    None,
}

/// One sequence's new tokens in [`Model::forward_batch`].
#[derive(Clone, Copy, Debug)]
pub struct BatchItem<'a> {
    pub seq: SeqId,
    /// Tokens at positions `cache.seq_len(seq)..`; may be empty (no logits then).
    pub tokens: &'a [u32],
    pub logits: Logits,
}

/// A Llama-family model on backend `B`.
pub struct Llama<B: Backend> {
    pub config: Config,
    pub backend: B,
    weights: Weights<B>,
    rope: Rope,
}

/// The CPU model (quantized GGUF weights as stored, any [`KvCache`]).
pub type Model = Llama<Cpu>;

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
    /// Loads every tensor the architecture needs for the CPU, checking each shape against `config`.
    pub fn load(src: &dyn TensorSource, naming: Naming, config: Config) -> Result<Model> {
        Llama::load_on(Cpu, src, naming, config)
    }

    /// Runs `tokens` (positions `cache.seq_len(seq)..`) through the model, reading and extending
    /// `seq`'s KV cache, and returns logits `[n][vocab]` (`Logits::All`) or `[vocab]` (`Last`).
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut (dyn KvCache + 'static),
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

    /// Runs several sequences in one pass ([`Llama::forward_rows`]) and returns each item's
    /// logits as [`Model::forward`] would.
    ///
    /// Each row's result does not depend on the other rows of the batch (the weight kernels
    /// compute every activation row with the same instruction sequence whatever the tile, and
    /// attention is per item), so a sequence's outputs are bit-identical alone or batched.
    pub fn forward_batch(
        &self,
        items: &[BatchItem<'_>],
        cache: &mut (dyn KvCache + 'static),
    ) -> Result<Vec<Vec<f32>>> {
        let Some((out, rows)) = self.forward_rows(items, cache)? else {
            return Ok(vec![Vec::new(); items.len()]);
        };
        let vocab = self.config.vocab;
        let mut o = 0;
        Ok(rows
            .iter()
            .map(|&r| {
                let l = out[o * vocab..(o + r) * vocab].to_vec();
                o += r;
                l
            })
            .collect())
    }
}

impl<B: Backend> Llama<B> {
    /// Loads every tensor the architecture needs onto `backend`, checking each shape against
    /// `config`.
    pub fn load_on(
        backend: B,
        src: &dyn TensorSource,
        naming: Naming,
        config: Config,
    ) -> Result<Llama<B>> {
        let c = &config;
        let b = &backend;
        let matrix = |name: String, rows: usize, cols: usize| -> Result<B::Weight> {
            let t = src.tensor(&name)?;
            check_shape(&t, &[rows, cols])?;
            b.matrix(t)
        };
        let vector = |name: String, len: usize| -> Result<B::Vector> {
            let t = src.tensor(&name)?;
            check_shape(&t, &[len])?;
            b.vector(finite_vector(&t)?)
        };
        let (h, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn);
        let layers = (0..c.n_layer)
            .map(|i| {
                let name = |role: &str| naming.layer(i, role);
                Ok(LayerWeights {
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
        let weights = Weights {
            tok_embd: matrix(naming.global("embed"), c.vocab, h)?,
            out_norm: vector(naming.global("norm"), h)?,
            layers,
            output,
        };
        Ok(Llama::from_weights(backend, config, weights))
    }

    /// A model from weights already on `backend` (e.g. random weights made on a GPU).
    pub fn from_weights(backend: B, config: Config, weights: Weights<B>) -> Llama<B> {
        let half = config.head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| {
                config
                    .rope_theta
                    .powf(-((2 * i) as f32) / config.head_dim as f32)
            })
            .collect();
        let rope = Rope {
            style: config.rope_style,
            head_dim: config.head_dim,
            inv_freq,
        };
        Llama {
            config,
            backend,
            weights,
            rope,
        }
    }

    /// Bytes of weights held or mapped.
    pub fn weight_bytes(&self) -> usize {
        let (b, w) = (&self.backend, &self.weights);
        let mut n =
            b.weight_bytes(&w.tok_embd) + w.output.as_ref().map_or(0, |m| b.weight_bytes(m));
        for l in &w.layers {
            for m in [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down] {
                n += b.weight_bytes(m);
            }
        }
        n
    }

    /// Runs several sequences, each with its own new tokens (1 for decode, many for a prefill
    /// chunk), in one pass: their rows are concatenated for every matmul (weights are read once
    /// per step), RoPE uses each item's own positions, attention goes through the backend's
    /// cache. Returns the logits rows `[m][vocab]` of every item in order and how many rows each
    /// item has (0, 1 for `Logits::Last`, its token count for `Logits::All`); `None` when no
    /// item has tokens.
    ///
    /// Everything is checked before anything is computed: on error the cache is unchanged.
    pub fn forward_rows(
        &self,
        items: &[BatchItem<'_>],
        cache: &mut B::Cache,
    ) -> Result<Option<(B::Act, Vec<usize>)>> {
        let (c, b, w) = (&self.config, &self.backend, &self.weights);
        // Checks first, so errors leave no trace.
        let mut n = 0;
        for (i, it) in items.iter().enumerate() {
            if items[..i].iter().any(|o| o.seq == it.seq) {
                return Err(ModelError::Cache(kivi_core::Error::Shape {
                    op: "forward_batch",
                    detail: format!("sequence {:?} appears twice in one batch", it.seq),
                }));
            }
            let pos0 = b.seq_len(cache, it.seq)?;
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
            n += it.tokens.len();
        }
        if n == 0 {
            return Ok(None);
        }
        let (h, qd, kvd) = (c.hidden, c.q_dim(), c.kv_dim());
        let step_items: Vec<(SeqId, usize)> =
            items.iter().map(|it| (it.seq, it.tokens.len())).collect();
        let step = b.begin_step(cache, &step_items)?;

        // x = embed(tokens): [n][hidden]
        let tokens: Vec<u32> = items
            .iter()
            .flat_map(|it| it.tokens.iter().copied())
            .collect();
        let mut x = b.zeros(n * h)?;
        b.embed(&w.tok_embd, &tokens, &mut x)?;

        let mut xb = b.zeros(n * h)?; // normed activations [n][hidden]
        let mut q = b.zeros(n * qd)?; // [n][n_head][head_dim]
        let mut k = b.zeros(n * kvd)?; // [n][n_kv_head][head_dim]
        let mut v = b.zeros(n * kvd)?;
        let mut att = b.zeros(n * qd)?; // attention output [n][n_head][head_dim]
        let mut gate = b.zeros(n * c.ffn)?; // [n][ffn]
        let mut up = b.zeros(n * c.ffn)?;
        let mut tmp = b.zeros(n * h)?;

        // Each residual add is fused with the norm that reads its result (`add_rmsnorm`): the
        // attention output's with the FFN norm, the FFN output's with the next layer's
        // attention norm (the last layer's is added after the loop).
        for (li, layer) in w.layers.iter().enumerate() {
            // --- attention block: x += previous FFN output; xb = rmsnorm(x);
            //     q,k,v = xb·Wqᵀ,.. ; rope; attend; tmp = att·Woᵀ
            if li == 0 {
                b.rmsnorm(&mut xb, &x, &layer.attn_norm, c.rms_eps)?;
            } else {
                b.add_rmsnorm(&mut x, &tmp, &mut xb, &layer.attn_norm, c.rms_eps)?;
            }
            b.matmuls(
                &xb,
                n,
                &mut [
                    (&layer.wq, &mut q),
                    (&layer.wk, &mut k),
                    (&layer.wv, &mut v),
                ],
            )?;
            if let Some(bias) = &layer.bias {
                b.add_bias(&mut q, &bias.q)?;
                b.add_bias(&mut k, &bias.k)?;
                b.add_bias(&mut v, &bias.v)?;
            }
            b.rope(&mut q, c.n_head, &self.rope, &step)?;
            b.rope(&mut k, c.n_kv_head, &self.rope, &step)?;
            b.attend_append(cache, &step, li, c.n_head, &q, &k, &v, &mut att)?;
            b.matmul(&layer.wo, &att, n, &mut tmp)?;

            // --- feed-forward block: x += tmp; xb = rmsnorm(x);
            //     tmp = W_down·(silu(W_gate·xb) * W_up·xb)
            b.add_rmsnorm(&mut x, &tmp, &mut xb, &layer.ffn_norm, c.rms_eps)?;
            b.matmuls(
                &xb,
                n,
                &mut [(&layer.w_gate, &mut gate), (&layer.w_up, &mut up)],
            )?;
            b.swiglu(&mut gate, &up)?;
            b.matmul(&layer.w_down, &gate, n, &mut tmp)?;
        }
        b.add(&mut x, &tmp)?;
        b.end_step(cache, step)?;

        // --- logits = rmsnorm(x)·W_outᵀ, for the rows each item asks for, in one matmul
        let mut rows = Vec::with_capacity(items.len());
        let mut start = 0;
        for it in items {
            let end = start + it.tokens.len();
            rows.push(match it.logits {
                _ if start == end => start..start,
                Logits::None => end..end,
                Logits::All => start..end,
                Logits::Last => end - 1..end,
            });
            start = end;
        }
        let m: usize = rows.iter().map(|r| r.len()).sum();
        if m == 0 {
            let empty = b.zeros(0)?;
            b.flush()?;
            return Ok(Some((empty, vec![0; items.len()])));
        }
        let picked = b.gather_rows(&x, h, &rows)?;
        let mut normed = b.zeros(m * h)?;
        let mut out = b.zeros(m * c.vocab)?;
        b.rmsnorm(&mut normed, &picked, &w.out_norm, c.rms_eps)?;
        let w_out = w.output.as_ref().unwrap_or(&w.tok_embd);
        b.matmul(w_out, &normed, m, &mut out)?;
        b.flush()?;
        Ok(Some((out, rows.iter().map(|r| r.len()).collect())))
    }

    pub fn arch(&self) -> Arch {
        self.config.arch
    }
}
