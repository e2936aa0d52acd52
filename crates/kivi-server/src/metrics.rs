//! Prometheus text exposition (`GET /metrics`): engine gauges and counters from
//! [`kivi_engine::EngineStats`], plus the server's own latency histograms and request counts.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Engine state for one scrape (a copy of the engine's stats, so this module does not depend on
/// the engine's types).
#[derive(Clone, Debug, Default)]
pub struct EngineGauges {
    pub waiting: usize,
    pub running: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    pub kv_bytes_used: u64,
    pub kv_bytes_reserved: u64,
    pub kv_bytes_budget: Option<u64>,
    pub prompt_tokens_total: u64,
    pub generated_tokens_total: u64,
    pub preemptions_total: u64,
    pub requests_finished: u64,
}

/// A fixed-bucket histogram of seconds; lock-free.
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), plus one for +Inf.
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self.bounds.partition_point(|&b| b < s);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            match self.bounds.get(i) {
                Some(b) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

const TTFT_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const ITL_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The server's own metrics.
pub struct Metrics {
    /// From the request's arrival to its first generated token.
    pub time_to_first_token: Histogram,
    /// Between consecutive generated tokens of one request.
    pub inter_token_latency: Histogram,
    /// Requests answered, by (endpoint, HTTP status).
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Requests whose client went away before the answer was complete.
    pub disconnects: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            time_to_first_token: Histogram::new(TTFT_BOUNDS),
            inter_token_latency: Histogram::new(ITL_BOUNDS),
            requests: Mutex::new(BTreeMap::new()),
            disconnects: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn count_request(&self, endpoint: &'static str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry((endpoint, status)).or_default() += 1;
    }

    /// The Prometheus text for `engine` and these metrics.
    pub fn render(&self, engine: &EngineGauges) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let e = engine;
        metric(
            "kivi_requests_waiting",
            "gauge",
            "Requests queued for admission.",
            e.waiting.to_string(),
        );
        metric(
            "kivi_requests_running",
            "gauge",
            "Sequences in the running batch.",
            e.running.to_string(),
        );
        metric(
            "kivi_kv_blocks_used",
            "gauge",
            "KV cache blocks in use.",
            e.kv_blocks_used.to_string(),
        );
        metric(
            "kivi_kv_blocks_free",
            "gauge",
            "KV cache blocks free (0 without a --kv-memory budget).",
            e.kv_blocks_total
                .saturating_sub(e.kv_blocks_used)
                .to_string(),
        );
        metric(
            "kivi_kv_blocks_total",
            "gauge",
            "KV cache blocks in the budget (0 without a --kv-memory budget).",
            e.kv_blocks_total.to_string(),
        );
        metric(
            "kivi_kv_bytes_used",
            "gauge",
            "KV cache bytes holding tokens (all layers and sequences).",
            e.kv_bytes_used.to_string(),
        );
        metric(
            "kivi_kv_bytes_reserved",
            "gauge",
            "KV cache bytes allocated.",
            e.kv_bytes_reserved.to_string(),
        );
        if let Some(b) = e.kv_bytes_budget {
            metric(
                "kivi_kv_bytes_budget",
                "gauge",
                "KV cache memory budget in bytes.",
                b.to_string(),
            );
        }
        metric(
            "kivi_prompt_tokens_total",
            "counter",
            "Prompt tokens prefilled.",
            e.prompt_tokens_total.to_string(),
        );
        metric(
            "kivi_generation_tokens_total",
            "counter",
            "Tokens generated.",
            e.generated_tokens_total.to_string(),
        );
        metric(
            "kivi_preemptions_total",
            "counter",
            "Sequences preempted (recomputed) to free KV memory.",
            e.preemptions_total.to_string(),
        );
        metric(
            "kivi_engine_requests_finished_total",
            "counter",
            "Requests the engine finished (any reason).",
            e.requests_finished.to_string(),
        );
        metric(
            "kivi_client_disconnects_total",
            "counter",
            "Requests whose client went away before the answer was complete.",
            self.disconnects.load(Ordering::Relaxed).to_string(),
        );
        self.time_to_first_token.render(
            &mut out,
            "kivi_time_to_first_token_seconds",
            "From request arrival to the first generated token.",
        );
        self.inter_token_latency.render(
            &mut out,
            "kivi_inter_token_latency_seconds",
            "Between consecutive generated tokens of a request.",
        );
        let _ = writeln!(
            out,
            "# HELP kivi_http_requests_total HTTP requests answered, by endpoint and status.\n# TYPE kivi_http_requests_total counter"
        );
        let map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        for ((endpoint, status), n) in map.iter() {
            let _ = writeln!(
                out,
                "kivi_http_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `name{labels} value` lines back (an independent reader of the format).
    fn sample(text: &str, name_and_labels: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name_and_labels} missing in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        let ms = |x: u64| Duration::from_micros(x * 1000);
        for d in [ms(3), ms(7), ms(7), ms(400), ms(100_000)] {
            m.time_to_first_token.observe(d);
        }
        let text = m.render(&EngineGauges::default());
        let h = "kivi_time_to_first_token_seconds";
        assert_eq!(sample(&text, &format!("{h}_bucket{{le=\"0.005\"}}")), 1.0);
        assert_eq!(sample(&text, &format!("{h}_bucket{{le=\"0.01\"}}")), 3.0);
        assert_eq!(sample(&text, &format!("{h}_bucket{{le=\"0.5\"}}")), 4.0);
        assert_eq!(sample(&text, &format!("{h}_bucket{{le=\"60\"}}")), 4.0);
        assert_eq!(sample(&text, &format!("{h}_bucket{{le=\"+Inf\"}}")), 5.0);
        assert_eq!(sample(&text, &format!("{h}_count")), 5.0);
        let sum = sample(&text, &format!("{h}_sum"));
        assert!((sum - 100.417).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn gauges_and_request_counts() {
        let m = Metrics::default();
        m.count_request("chat", 200);
        m.count_request("chat", 200);
        m.count_request("chat", 429);
        let g = EngineGauges {
            waiting: 3,
            running: 2,
            kv_blocks_used: 5,
            kv_blocks_total: 12,
            kv_bytes_used: 777,
            ..Default::default()
        };
        let text = m.render(&g);
        assert_eq!(sample(&text, "kivi_requests_waiting"), 3.0);
        assert_eq!(sample(&text, "kivi_requests_running"), 2.0);
        assert_eq!(sample(&text, "kivi_kv_blocks_free"), 7.0);
        assert_eq!(sample(&text, "kivi_kv_bytes_used"), 777.0);
        assert_eq!(
            sample(
                &text,
                r#"kivi_http_requests_total{endpoint="chat",status="200"}"#
            ),
            2.0
        );
        assert_eq!(
            sample(
                &text,
                r#"kivi_http_requests_total{endpoint="chat",status="429"}"#
            ),
            1.0
        );
        // Every sample line belongs to a declared metric.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let base = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {name} "))
                    || text.contains(&format!("# TYPE {base} ")),
                "{line}"
            );
        }
    }
}
