//! Opt-in time per op of the forward pass (`KIVI_CUDA_PROFILE=1`, or [`Profiler::set_enabled`]):
//! GPU time from a pair of CUDA events around every backend op, read back once the step is done;
//! or, with `KIVI_CUDA_PROFILE=host`, the host's time to queue each op (wall clock, no events).
//!
//! Events time the op on the stream (GPU time, including any wait for the host to queue the
//! next launch inside the span), so the sum over ops against the step's GPU span shows how
//! much of the step the GPU sat idle between ops. Host mode shows where the host spends a pass
//! when it, not the GPU, sets the pace (small batches). Off by default: two event records (or
//! clock reads) per op.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};

/// Which kind of forward pass an op ran in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StepKind {
    /// One new token per sequence.
    Decode,
    /// Some sequence brings several tokens (a prefill chunk, possibly with decode tokens).
    Mixed,
}

impl StepKind {
    pub fn name(self) -> &'static str {
        match self {
            StepKind::Decode => "decode",
            StepKind::Mixed => "prefill+decode",
        }
    }
}

/// GPU time summed over calls.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OpTime {
    pub calls: u64,
    pub ms: f64,
}

/// What a profiler measures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProfileMode {
    #[default]
    Off,
    /// GPU time per op (CUDA events).
    Gpu,
    /// Host time to queue each op (wall clock).
    Host,
}

/// Totals per step kind: every op's time, and the steps' spans (first op start to last op end).
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub ops: BTreeMap<(StepKind, &'static str), OpTime>,
    pub steps: BTreeMap<StepKind, OpTime>,
    /// Host times (else GPU times).
    pub host: bool,
}

impl Profile {
    /// A table: per step kind, the span per step, each op's share and time per step, and the
    /// part of the span no op covered (the GPU waiting for the host).
    pub fn table(&self) -> String {
        let mut out = String::new();
        for (&kind, span) in &self.steps {
            let per = |ms: f64| ms / span.calls.max(1) as f64;
            out.push_str(&format!(
                "{} passes: {}, {} span {:.2} ms per pass\n",
                kind.name(),
                span.calls,
                if self.host { "host" } else { "GPU" },
                per(span.ms)
            ));
            let mut ops: Vec<(&str, OpTime)> = self
                .ops
                .iter()
                .filter(|((k, _), _)| *k == kind)
                .map(|((_, n), t)| (*n, *t))
                .collect();
            ops.sort_by(|a, b| b.1.ms.total_cmp(&a.1.ms));
            let covered: f64 = ops.iter().map(|(_, t)| t.ms).sum();
            for (name, t) in &ops {
                out.push_str(&format!(
                    "  {name:<14} {:>9.3} ms/pass {:>5.1} %  ({} calls/pass)\n",
                    per(t.ms),
                    100.0 * t.ms / span.ms.max(1e-12),
                    t.calls / span.calls.max(1)
                ));
            }
            out.push_str(&format!(
                "  {:<14} {:>9.3} ms/pass {:>5.1} %\n",
                "(between ops)",
                per(span.ms - covered),
                100.0 * (span.ms - covered) / span.ms.max(1e-12)
            ));
        }
        out
    }
}

struct Open {
    kind: StepKind,
    name: &'static str,
    start: CudaEvent,
    end: CudaEvent,
}

/// A finished op span of host mode.
struct HostOp {
    kind: StepKind,
    name: &'static str,
    start: Instant,
    end: Instant,
}

#[derive(Default)]
struct State {
    kind: Option<StepKind>,
    open: Vec<Open>,
    host_ops: Vec<HostOp>,
    spare: Vec<CudaEvent>,
    profile: Profile,
}

/// Records op spans on one stream while enabled.
pub struct Profiler {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    mode: AtomicU8,
    state: Mutex<State>,
}

/// Where an open span started.
enum Start {
    Event(CudaEvent),
    Clock(Instant),
}

/// Ends its op's span when dropped.
pub struct Span<'p> {
    profiler: &'p Profiler,
    open: Option<(&'static str, Start)>,
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        if let Some((name, start)) = self.open.take() {
            self.profiler.close(name, start);
        }
    }
}

impl Profiler {
    pub fn new(ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Profiler {
        let mode = match std::env::var("KIVI_CUDA_PROFILE").as_deref() {
            Ok("1") => ProfileMode::Gpu,
            Ok("host") => ProfileMode::Host,
            _ => ProfileMode::Off,
        };
        let p = Profiler {
            ctx,
            stream,
            mode: AtomicU8::new(0),
            state: Mutex::new(State::default()),
        };
        p.set_mode(mode);
        p
    }

    /// GPU times on (unless host mode is on: `KIVI_CUDA_PROFILE=host` wins), or off.
    pub fn set_enabled(&self, on: bool) {
        if !on {
            self.set_mode(ProfileMode::Off);
        } else if self.mode() == ProfileMode::Off {
            self.set_mode(ProfileMode::Gpu);
        }
    }

    pub fn set_mode(&self, mode: ProfileMode) {
        let v = match mode {
            ProfileMode::Off => 0,
            ProfileMode::Gpu => 1,
            ProfileMode::Host => 2,
        };
        self.mode.store(v, Ordering::Relaxed);
    }

    pub fn mode(&self) -> ProfileMode {
        match self.mode.load(Ordering::Relaxed) {
            1 => ProfileMode::Gpu,
            2 => ProfileMode::Host,
            _ => ProfileMode::Off,
        }
    }

    pub fn enabled(&self) -> bool {
        self.mode() != ProfileMode::Off
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An event recorded now on the stream (a spare one reused), or `None` if that failed:
    /// profiling never fails the forward pass.
    fn record(&self, state: &mut State) -> Option<CudaEvent> {
        let ev = match state.spare.pop() {
            Some(e) => e,
            None => self
                .ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .ok()?,
        };
        ev.record(&self.stream).ok()?;
        Some(ev)
    }

    /// Starts a pass of `kind`.
    pub fn begin_step(&self, kind: StepKind) {
        if self.enabled() {
            self.lock().kind = Some(kind);
        }
    }

    /// Times the ops queued until the returned span is dropped as `name`.
    pub fn span(&self, name: &'static str) -> Span<'_> {
        let open = match self.mode() {
            ProfileMode::Off => None,
            ProfileMode::Gpu => {
                let mut st = self.lock();
                self.record(&mut st).map(|e| (name, Start::Event(e)))
            }
            ProfileMode::Host => Some((name, Start::Clock(Instant::now()))),
        };
        Span {
            profiler: self,
            open,
        }
    }

    fn close(&self, name: &'static str, start: Start) {
        let end_clock = Instant::now();
        let mut st = self.lock();
        let kind = st.kind.unwrap_or(StepKind::Mixed);
        match start {
            Start::Event(start) => {
                if let Some(end) = self.record(&mut st) {
                    st.open.push(Open {
                        kind,
                        name,
                        start,
                        end,
                    });
                }
            }
            Start::Clock(start) => st.host_ops.push(HostOp {
                kind,
                name,
                start,
                end: end_clock,
            }),
        }
    }

    /// Adds the finished pass's spans to the totals (waits for them; call after the step's
    /// results are on the host).
    pub fn end_step(&self) {
        if !self.enabled() {
            return;
        }
        let mut st = self.lock();
        let host_ops = std::mem::take(&mut st.host_ops);
        if let (Some(first), Some(last)) = (host_ops.first(), host_ops.last()) {
            let kind = first.kind;
            let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1e3;
            let s = st.profile.steps.entry(kind).or_default();
            s.calls += 1;
            s.ms += ms(first.start, last.end);
            for o in host_ops {
                let t = st.profile.ops.entry((o.kind, o.name)).or_default();
                t.calls += 1;
                t.ms += ms(o.start, o.end);
            }
        }
        let open = std::mem::take(&mut st.open);
        let (Some(first), Some(last)) = (open.first(), open.last()) else {
            st.kind = None;
            return;
        };
        let kind = first.kind;
        if let Ok(ms) = first.start.elapsed_ms(&last.end) {
            let s = st.profile.steps.entry(kind).or_default();
            s.calls += 1;
            s.ms += ms as f64;
        }
        for o in open {
            if let Ok(ms) = o.start.elapsed_ms(&o.end) {
                let t = st.profile.ops.entry((o.kind, o.name)).or_default();
                t.calls += 1;
                t.ms += ms as f64;
            }
            st.spare.push(o.start);
            st.spare.push(o.end);
        }
        st.kind = None;
    }

    /// The totals so far, and starts new ones.
    pub fn take(&self) -> Profile {
        let mut p = std::mem::take(&mut self.lock().profile);
        p.host = self.mode() == ProfileMode::Host;
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_reports_per_pass_times_shares_and_the_gap_between_ops() {
        let mut p = Profile::default();
        let t = |calls, ms| OpTime { calls, ms };
        p.steps.insert(StepKind::Decode, t(4, 40.0)); // 10 ms per pass
        p.ops.insert((StepKind::Decode, "gemm"), t(8, 16.0)); // 4 ms, 40 %
        p.ops.insert((StepKind::Decode, "attend"), t(4, 20.0)); // 5 ms, 50 %
        p.steps.insert(StepKind::Mixed, t(1, 8.0));
        p.ops.insert((StepKind::Mixed, "gemm"), t(3, 6.0));
        let table = p.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "decode passes: 4, GPU span 10.00 ms per pass");
        // Largest first; calls per pass.
        assert!(lines[1].starts_with("  attend") && lines[1].contains("5.000 ms/pass  50.0 %"));
        assert!(lines[1].ends_with("(1 calls/pass)"), "{}", lines[1]);
        assert!(lines[2].starts_with("  gemm") && lines[2].contains("4.000 ms/pass  40.0 %"));
        assert!(lines[2].ends_with("(2 calls/pass)"));
        // 40 - 36 ms not covered by any op: 1 ms per pass, 10 %.
        assert!(
            lines[3].starts_with("  (between ops)") && lines[3].contains("1.000 ms/pass  10.0 %")
        );
        assert_eq!(
            lines[4],
            "prefill+decode passes: 1, GPU span 8.00 ms per pass"
        );
        assert!(lines[6].contains("2.000 ms/pass  25.0 %"), "{}", lines[6]);
        p.host = true;
        assert_eq!(
            p.table().lines().next().unwrap(),
            "decode passes: 4, host span 10.00 ms per pass"
        );
    }
}
