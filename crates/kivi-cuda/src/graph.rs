//! Piecewise CUDA graphs for decode steps.
//!
//! At small batches the host's launch work, not the GPU, sets the pace (Llama-2-7B, batch 1:
//! ~6.4 ms of host time per pass against ~2.8 ms of GPU time; ~15 us per cuBLAS call, ~4.5 us
//! per kernel launch). The ops between two attentions (norms, GEMMs, RoPE, SwiGLU, residual
//! adds) take the same arguments at every decode step of the same batch size, so each run of
//! them (a *segment*) is recorded once into a CUDA graph and then replayed with one launch.
//! Attention and the cache append, whose launch shapes follow the sequences' lengths, run as
//! usual between segments (vLLM's piecewise graphs make the same cut).
//!
//! Per batch size (the key): the first decode step runs eagerly (cuBLAS picks its kernels
//! outside any capture), the second is captured segment by segment, later ones replay.
//!
//! A graph never runs with arguments other than the ones the model asked for: every op is an
//! [`Op`] holding its device addresses and sizes; in a replayed step the ops of a segment are
//! queued, compared with the recorded segment's at the segment's end, and the graph launches
//! only if they are equal. Otherwise they launch one by one and the key's graphs are dropped.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaStream, DriverError};

/// Most batch sizes with graphs at a time (the least recently used is dropped).
const MAX_KEYS: usize = 16;
/// A key whose recordings diverged this many times in a row before being replayed once is not
/// captured again (its ops differ from step to step). A divergence after replays (a new
/// cache, a buffer that grew) only starts a new recording.
const MAX_FALLBACKS: u32 = 2;

/// One launch of the forward pass's fixed-shape ops, with raw device addresses (`u64`) and
/// sizes: what the backend launches, and what a recorded segment is compared against.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Op {
    /// `x += y` (unless `y` is 0), then `out = rmsnorm(x) * w` and its 16-bit copy `out16`;
    /// `rows` rows of `h`.
    RmsNorm {
        out: u64,
        out16: u64,
        x: u64,
        y: u64,
        w: u64,
        h: i32,
        rows: u32,
        eps: f32,
    },
    /// `x16 = x` rounded to the 16-bit type.
    ToHalf {
        x: u64,
        x16: u64,
        n: i64,
    },
    /// cuBLAS: `out[rows][n_out] = x16[rows][cols] · w[n_out][cols]ᵀ`.
    Gemm {
        w: u64,
        x16: u64,
        out: u64,
        n_out: i32,
        rows: i32,
        cols: i32,
    },
    /// The small-batch kernel: `out[i] = x16 · w[i]ᵀ` for up to three matrices of `cols`
    /// columns (unused ones: `n_out` 0).
    Gemv {
        w: [u64; 3],
        out: [u64; 3],
        n_out: [i32; 3],
        x16: u64,
        rows: i32,
        cols: i32,
    },
    AddBias {
        x: u64,
        b: u64,
        width: i32,
        n: i64,
    },
    /// RoPE over `rows` rows of `heads` heads, positions from the step's token table `toks`.
    Rope {
        x: u64,
        toks: u64,
        inv_freq: u64,
        heads: i32,
        head_dim: i32,
        neox: i32,
        rows: u32,
        /// `rope_heads` (head_dim a multiple of 8, at most 256; x 16-byte aligned), else
        /// `rope_per_head`.
        vector: bool,
    },
    /// `gate = silu(gate) * up`, and its 16-bit copy `gate16`.
    Swiglu {
        gate: u64,
        gate16: u64,
        up: u64,
        n: i64,
    },
    /// `x += y`.
    Add {
        x: u64,
        y: u64,
        n: i64,
    },
}

/// What happened to the graphs so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Segments recorded into graphs.
    pub captured: u64,
    /// Segment graphs launched instead of their ops.
    pub replayed: u64,
    /// Ops those replays stood for.
    pub ops_replayed: u64,
    /// Replayed segments whose ops differed from the recording (launched one by one).
    pub fallbacks: u64,
    /// Captures the driver refused (the ops launched one by one, the key left eager).
    pub capture_errors: u64,
}

impl std::fmt::Display for GraphStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} segments captured, {} replayed ({} ops), {} fallbacks, {} capture errors",
            self.captured, self.replayed, self.ops_replayed, self.fallbacks, self.capture_errors
        )
    }
}

/// A graph and the ops it was recorded from.
struct Segment {
    ops: Vec<Op>,
    graph: CudaGraph,
}

/// The recorded segments of one key, in order.
struct Recorded {
    segments: Vec<Segment>,
    last_used: u64,
    /// Steps that replayed at least one segment.
    replayed_steps: u64,
}

/// How the current step's ops are run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Launched as they come.
    Eager,
    /// Launched into a capture; each segment's graph launches at its end.
    Capture,
    /// Queued; at a segment's end, the recorded graph (ops equal) or the ops.
    Replay { next: usize },
}

/// What the backend does with an op it submitted.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Submit {
    /// Launch it now (eagerly, or into the open capture).
    Launch,
    /// Nothing: it is queued for the segment's end.
    Queued,
}

/// The graphs of one backend, and the state of the current step.
pub(crate) struct Graphs {
    stream: Arc<CudaStream>,
    /// Decode steps run so far per key, before capture.
    seen: HashMap<usize, u32>,
    /// Divergences in a row before any replay, per key (at `MAX_FALLBACKS` the key stays
    /// eager; a refused capture sets it there at once).
    eager_keys: HashMap<usize, u32>,
    recorded: HashMap<usize, Recorded>,
    key: Option<usize>,
    mode: Mode,
    capturing: bool,
    /// The open segment's ops (captured, or queued for replay).
    pending: Vec<Op>,
    /// Segments captured in this step.
    captured: Vec<Segment>,
    clock: u64,
    stats: GraphStats,
}

// SAFETY: the graphs (raw driver handles) are only touched through `&mut Graphs`, which the
// backend keeps behind a mutex; the driver allows a graph to be used from any thread as long
// as calls on it are serialised.
unsafe impl Send for Graphs {}

impl Graphs {
    pub(crate) fn new(stream: Arc<CudaStream>) -> Graphs {
        Graphs {
            stream,
            seen: HashMap::new(),
            eager_keys: HashMap::new(),
            recorded: HashMap::new(),
            key: None,
            mode: Mode::Eager,
            capturing: false,
            pending: Vec::new(),
            captured: Vec::new(),
            clock: 0,
            stats: GraphStats::default(),
        }
    }

    pub(crate) fn stats(&self) -> GraphStats {
        self.stats
    }

    /// Drops every recorded graph (e.g. when graphs are switched off).
    pub(crate) fn clear(&mut self) {
        self.discard();
        let recorded = std::mem::take(&mut self.recorded);
        self.retire(recorded);
        self.seen.clear();
    }

    /// Drops graphs that may still be running (launched in this or a recent step) once the
    /// stream has finished them: an executable graph is not destroyed while a launch of it is
    /// queued.
    fn retire<T>(&self, graphs: T) {
        let _ = self.stream.synchronize();
        drop(graphs);
    }

    /// Starts a step: `key` is its batch size when it may use graphs (a decode step), else
    /// `None`. Whatever the previous step left open (it ended in an error before
    /// [`Graphs::finish`]) is discarded, never launched.
    pub(crate) fn begin(&mut self, key: Option<usize>) {
        self.discard();
        self.clock += 1;
        self.key = key.filter(|k| self.eager_keys.get(k).is_none_or(|&n| n < MAX_FALLBACKS));
        let Some(k) = self.key else {
            return;
        };
        if let Some(r) = self.recorded.get_mut(&k) {
            r.last_used = self.clock;
            self.mode = Mode::Replay { next: 0 };
            return;
        }
        let seen = self.seen.entry(k).or_insert(0);
        *seen += 1;
        if *seen >= 2 {
            self.mode = Mode::Capture;
        }
    }

    /// Ends an open capture and forgets the step's state, launching nothing.
    fn discard(&mut self) {
        if self.capturing {
            self.capturing = false;
            // The graph (if any) is dropped unlaunched.
            let _ = self.stream.end_capture(CUgraphInstantiate_flags(0));
        }
        self.pending.clear();
        if !self.captured.is_empty() {
            let captured = std::mem::take(&mut self.captured);
            self.retire(captured);
        }
        self.mode = Mode::Eager;
        self.key = None;
    }

    /// Whether the current step takes part (its ops are captured or replayed).
    pub(crate) fn active(&self) -> bool {
        self.mode != Mode::Eager
    }

    /// Whether a capture is open (ops launched now are recorded, not run).
    pub(crate) fn capturing(&self) -> bool {
        self.capturing
    }

    /// Takes an op of the current step.
    pub(crate) fn submit(&mut self, op: &Op) -> Submit {
        match self.mode {
            Mode::Eager => Submit::Launch,
            Mode::Capture => {
                if !self.capturing {
                    let mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
                    if self.stream.begin_capture(mode).is_err() {
                        self.give_up_capture();
                        return Submit::Launch;
                    }
                    self.capturing = true;
                }
                self.pending.push(op.clone());
                Submit::Launch
            }
            Mode::Replay { .. } => {
                self.pending.push(op.clone());
                Submit::Queued
            }
        }
    }

    /// An op failed to launch into the open capture: the capture is abandoned, the key stays
    /// eager, and the segment's ops so far (none of which ran) are returned to be launched
    /// one by one.
    pub(crate) fn abort_capture(&mut self) -> Vec<Op> {
        if self.capturing {
            self.capturing = false;
            let _ = self.stream.end_capture(CUgraphInstantiate_flags(0));
        }
        self.give_up_capture();
        std::mem::take(&mut self.pending)
    }

    fn give_up_capture(&mut self) {
        self.stats.capture_errors += 1;
        if let Some(k) = self.key {
            self.eager_keys.insert(k, MAX_FALLBACKS);
        }
        let captured = std::mem::take(&mut self.captured);
        self.retire(captured);
        self.mode = Mode::Eager;
    }

    /// Ends the open segment before work that is not an [`Op`] (attention, copies,
    /// allocations, reads of results): launches its graph, or returns the ops to launch one by
    /// one (in order, before anything else).
    pub(crate) fn boundary(&mut self) -> Result<Vec<Op>, DriverError> {
        match self.mode {
            Mode::Eager => Ok(Vec::new()),
            Mode::Capture => {
                if !self.capturing {
                    return Ok(Vec::new());
                }
                self.capturing = false;
                match self.stream.end_capture(CUgraphInstantiate_flags(0)) {
                    Ok(Some(graph)) => {
                        // Captured ops did not run: the graph's first launch runs them.
                        graph.launch()?;
                        self.stats.captured += 1;
                        let ops = std::mem::take(&mut self.pending);
                        self.captured.push(Segment { ops, graph });
                        Ok(Vec::new())
                    }
                    _ => {
                        self.give_up_capture();
                        Ok(std::mem::take(&mut self.pending))
                    }
                }
            }
            Mode::Replay { next } => {
                if self.pending.is_empty() {
                    return Ok(Vec::new());
                }
                let key = self.key.expect("replay has a key");
                let segment = self.recorded.get(&key).and_then(|r| r.segments.get(next));
                match segment {
                    Some(seg) if seg.ops == self.pending => {
                        seg.graph.launch()?;
                        if next == 0 {
                            let r = self.recorded.get_mut(&key).expect("found above");
                            r.replayed_steps += 1;
                            self.eager_keys.remove(&key);
                        }
                        self.stats.replayed += 1;
                        self.stats.ops_replayed += self.pending.len() as u64;
                        self.pending.clear();
                        self.mode = Mode::Replay { next: next + 1 };
                        Ok(Vec::new())
                    }
                    _ => {
                        // Different addresses or sizes (a buffer was reallocated, the batch
                        // changed shape): run the ops themselves, record again later.
                        self.stats.fallbacks += 1;
                        let removed = self.recorded.remove(&key);
                        let replayed = removed.as_ref().is_some_and(|r| r.replayed_steps > 0);
                        self.retire(removed);
                        self.seen.remove(&key);
                        if !replayed {
                            *self.eager_keys.entry(key).or_insert(0) += 1;
                        }
                        self.mode = Mode::Eager;
                        Ok(std::mem::take(&mut self.pending))
                    }
                }
            }
        }
    }

    /// Ends the step: the open segment as at a [`Graphs::boundary`]; a captured step's
    /// segments are kept for its key.
    pub(crate) fn finish(&mut self) -> Result<Vec<Op>, DriverError> {
        let ops = self.boundary()?;
        if self.mode == Mode::Capture {
            if let Some(k) = self.key {
                if self.recorded.len() >= MAX_KEYS {
                    let oldest = self
                        .recorded
                        .iter()
                        .min_by_key(|(_, r)| r.last_used)
                        .map(|(&k, _)| k);
                    if let Some(o) = oldest {
                        let evicted = self.recorded.remove(&o);
                        self.retire(evicted);
                        self.seen.remove(&o);
                    }
                }
                let segments = std::mem::take(&mut self.captured);
                self.recorded.insert(
                    k,
                    Recorded {
                        segments,
                        last_used: self.clock,
                        replayed_steps: 0,
                    },
                );
            }
        }
        self.mode = Mode::Eager;
        self.key = None;
        self.captured.clear();
        Ok(ops)
    }
}

impl Drop for Graphs {
    fn drop(&mut self) {
        if self.capturing {
            let _ = self.stream.end_capture(CUgraphInstantiate_flags(0));
        }
        if !self.recorded.is_empty() || !self.captured.is_empty() {
            let _ = self.stream.synchronize();
        }
    }
}
