//! `kivi inspect`: per-channel magnitudes of the post-RoPE keys and of the values that reach the KV
//! cache, for chosen layers and KV heads, as PNG (the KIVI paper's Figure 2) and a table of how much
//! the largest channel stands out.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use kivi_core::quant::{key_quant_error, logit_error_rms};
use kivi_engine::inspect::{
    channel_absmax, channel_absmean, head_matrix, outlier_ratio, record_kv,
};
use kivi_engine::plot::{text_width, viridis, Canvas, BLACK, GREY, WHITE};

use crate::ModelArgs;

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to run (default: $KIVI_CACHE/data/austen/prideprejudice.txt from scripts/fetch-data.sh,
    /// from "Chapter 1").
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Start the text at the first occurrence of this string.
    #[arg(long)]
    pub start_at: Option<String>,
    /// Tokens to run.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Layers to plot, comma-separated (default: first, middle, last).
    #[arg(long)]
    pub layers: Option<String>,
    /// KV heads to plot, comma-separated, or `all`.
    #[arg(long, default_value = "0")]
    pub heads: String,
    /// Directory for the PNGs (`layer<L>_head<H>.png`); created if missing.
    #[arg(long, default_value = "inspect")]
    pub out_dir: PathBuf,
}

fn parse_list(s: &str, what: &str, n: usize) -> Result<Vec<usize>> {
    if s.trim() == "all" {
        return Ok((0..n).collect());
    }
    let v: Vec<usize> = s
        .split(',')
        .map(|x| {
            x.trim()
                .parse::<usize>()
                .with_context(|| format!("`{x}` is not a {what} index"))
        })
        .collect::<Result<_>>()?;
    if let Some(bad) = v.iter().find(|&&x| x >= n) {
        bail!(
            "{what} {bad} does not exist: the model has {n} {what}s (0..{})",
            n - 1
        );
    }
    Ok(v)
}

pub fn run(a: InspectArgs) -> Result<()> {
    if a.max_tokens < 2 {
        bail!("--max-tokens must be at least 2");
    }
    let (file, start_at) = match &a.file {
        Some(f) => (f.clone(), a.start_at.clone()),
        None => (
            crate::fetch::cache_dir()?
                .join("data")
                .join("austen")
                .join("prideprejudice.txt"),
            a.start_at.clone().or(Some("Chapter 1".into())),
        ),
    };
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("reading {} (run scripts/fetch-data.sh)", file.display()))?;
    let text = match &start_at {
        Some(s) => {
            let i = text
                .find(s.as_str())
                .with_context(|| format!("`{s}` not found in {}", file.display()))?;
            &text[i..]
        }
        None => &text[..],
    };
    let m = a.model.load()?;
    let c = &m.model.config;
    let layers = match &a.layers {
        Some(s) => parse_list(s, "layer", c.n_layer)?,
        None => {
            let mut v = vec![0, c.n_layer / 2, c.n_layer - 1];
            v.dedup();
            v
        }
    };
    let heads = parse_list(&a.heads, "KV head", c.n_kv_head)?;
    let mut tokens = m.tokenizer.encode(text, true)?;
    if a.max_tokens > c.context_len {
        bail!(
            "--max-tokens {} is beyond the model's context window of {}",
            a.max_tokens,
            c.context_len
        );
    }
    tokens.truncate(a.max_tokens);
    if tokens.len() < 2 {
        bail!("{} has fewer than 2 tokens", file.display());
    }
    let rec = record_kv(&m.model, &tokens, &layers, 512)?;
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("creating {}", a.out_dir.display()))?;
    println!(
        "{}: {} tokens of {}, post-RoPE K and V. Outlier ratio: the largest channel's max|x| \
         (or mean|x|) / the median channel's. K 2-bit error: ‖K − Q(K)‖ / ‖K − mean‖ of KIVI-2 \
         keys (per channel, G = 32) after the first 4 tokens (sinks); logit error: the RMS error of \
         q·k/sqrt(d) that those keys cause (every 4th query)",
        m.name,
        tokens.len(),
        file.display()
    );
    println!(
        "| layer | KV head | K max|x| | K ratio (max) | K ratio (mean) | top K channels \
         | K 2-bit error | logit error | V max|x| | V ratio (max) | V ratio (mean) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let n_rep = c.n_head / c.n_kv_head;
    let d = c.head_dim;
    for l in &rec {
        for &h in &heads {
            let k = head_matrix(&l.k, c.n_kv_head, d, h);
            let v = head_matrix(&l.v, c.n_kv_head, d, h);
            let (ka, va) = (channel_absmax(&k, d), channel_absmax(&v, d));
            let mut order: Vec<usize> = (0..d).collect();
            order.sort_by(|&x, &y| ka[y].total_cmp(&ka[x]));
            let top: Vec<String> = order.iter().take(3).map(|i| i.to_string()).collect();
            let kmax = ka.iter().cloned().fold(0f32, f32::max);
            let vmax = va.iter().cloned().fold(0f32, f32::max);
            println!(
                "| {} | {h} | {kmax:.2} | {:.1} | {:.1} | {} | {:.3} | {:.3} | {vmax:.2} | {:.1} | {:.1} |",
                l.layer,
                outlier_ratio(&ka),
                outlier_ratio(&channel_absmean(&k, d)),
                top.join(", "),
                key_quant_error(k.get(4 * d..).unwrap_or_default(), d, 32, 2),
                logit_error_rms(
                    &head_matrix(&l.q, c.n_kv_head, n_rep * d, h),
                    &k,
                    d,
                    n_rep,
                    32,
                    2,
                    4,
                    4
                ),
                outlier_ratio(&va),
                outlier_ratio(&channel_absmean(&v, d))
            );
            let png = a.out_dir.join(format!("layer{}_head{h}.png", l.layer));
            let title = format!(
                "{}  LAYER {}  KV HEAD {h}  {} TOKENS",
                m.name,
                l.layer,
                tokens.len()
            );
            figure(&title, &k, &ka, &v, &va, d)
                .save_png(&png)
                .with_context(|| format!("writing {}", png.display()))?;
        }
    }
    println!("PNGs in {}", a.out_dir.display());
    Ok(())
}

/// Two columns (K, V); each: a bar chart of per-channel max |x|, and below it |x| as an image with
/// channels across and tokens down (binned by max to at most 300 rows).
fn figure(title: &str, k: &[f32], ka: &[f32], v: &[f32], va: &[f32], d: usize) -> Canvas {
    let px = (512 / d).clamp(2, 8);
    let panel_w = px * d;
    let (bar_h, img_h) = (160usize, 300usize);
    let (left, top, gap) = (20usize, 40usize, 40usize);
    let width = (left + 2 * panel_w + gap + 20).max(text_width(title, 1) + 20);
    let height = top + 20 + bar_h + 30 + img_h + 40;
    let mut c = Canvas::new(width, height, WHITE);
    c.text(10, 10, title, 1, BLACK);
    for (col, (name, x, amax)) in [("KEY (POST-ROPE)", k, ka), ("VALUE", v, va)]
        .into_iter()
        .enumerate()
    {
        let x0 = left + col * (panel_w + gap);
        let peak = amax.iter().cloned().fold(0f32, f32::max).max(1e-12);
        c.text(
            x0,
            top,
            &format!("{name}: MAX|X| PER CHANNEL, PEAK {peak:.1}"),
            1,
            BLACK,
        );
        let y_base = top + 20 + bar_h;
        c.frame(x0 - 1, top + 18, panel_w + 2, bar_h + 3, GREY);
        for (ch, &m) in amax.iter().enumerate() {
            let h = ((m / peak) as f64 * bar_h as f64).round() as usize;
            c.fill_rect(
                x0 + ch * px,
                y_base - h,
                px.saturating_sub(1).max(1),
                h,
                [49, 104, 142],
            );
        }
        let yi = y_base + 30;
        c.text(x0, yi - 12, "|X|: CHANNELS ACROSS, TOKENS DOWN", 1, BLACK);
        let n_tok = x.len() / d;
        let rows = n_tok.min(img_h);
        let row_h = img_h / rows.max(1);
        for r in 0..rows {
            let (t0, t1) = (
                r * n_tok / rows,
                ((r + 1) * n_tok / rows).max(r * n_tok / rows + 1),
            );
            for ch in 0..d {
                let m = (t0..t1).map(|t| x[t * d + ch].abs()).fold(0f32, f32::max);
                c.fill_rect(
                    x0 + ch * px,
                    yi + r * row_h,
                    px,
                    row_h,
                    viridis((m / peak) as f64),
                );
            }
        }
        c.text(
            x0,
            yi + rows * row_h + 6,
            &format!("0..{} CHANNELS, {n_tok} TOKENS", d - 1),
            1,
            GREY,
        );
    }
    c
}
