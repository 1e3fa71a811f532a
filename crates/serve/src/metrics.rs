//! The server's counters, exported at `GET /metrics` in Prometheus' text format: requests by
//! endpoint and status, prompt and generated tokens, queue depth and running rows, time to first
//! token and request latency (histograms), decode throughput.
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

const BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, x: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (i, b) in BUCKETS.iter().enumerate() {
            if x <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += x;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", self.counts.get(i).copied().unwrap_or(0));
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            self.count, self.sum, self.count
        );
    }
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub queue_depth: AtomicUsize,
    pub running: AtomicUsize,
    pub failed_batches: AtomicU64,
    ttft: Mutex<Histogram>,
    latency: Mutex<Histogram>,
    /// Decode throughput of the recent steps (tokens/s), an exponential average.
    throughput: Mutex<f64>,
}

impl Metrics {
    pub fn count_request(&self, endpoint: &str, status: u16) {
        let mut r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *r.entry((endpoint.to_string(), status)).or_default() += 1;
    }

    pub fn observe_ttft(&self, seconds: f64) {
        self.ttft.lock().unwrap_or_else(|e| e.into_inner()).observe(seconds);
    }

    pub fn observe_latency(&self, seconds: f64) {
        self.latency.lock().unwrap_or_else(|e| e.into_inner()).observe(seconds);
    }

    /// One engine step made `tokens` tokens in `seconds`.
    pub fn record_step(&self, tokens: usize, seconds: f64) {
        self.generation_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        if tokens > 0 && seconds > 0.0 {
            let mut t = self.throughput.lock().unwrap_or_else(|e| e.into_inner());
            let now = tokens as f64 / seconds;
            *t = if *t == 0.0 { now } else { 0.9 * *t + 0.1 * now };
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP align_requests_total Requests answered, by endpoint and HTTP status.\n# TYPE align_requests_total counter");
        for ((endpoint, status), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "align_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}");
        }
        let counters = [
            (
                "align_prompt_tokens_total",
                "Prompt tokens prefilled.",
                self.prompt_tokens.load(Ordering::Relaxed) as f64,
            ),
            (
                "align_generation_tokens_total",
                "Tokens generated.",
                self.generation_tokens.load(Ordering::Relaxed) as f64,
            ),
            (
                "align_failed_batches_total",
                "Engine batches that failed (their requests got an error).",
                self.failed_batches.load(Ordering::Relaxed) as f64,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let gauges = [
            (
                "align_queue_depth",
                "Requests waiting for a place in the batch.",
                self.queue_depth.load(Ordering::Relaxed) as f64,
            ),
            ("align_running_sequences", "Sequences in the running batch.", self.running.load(Ordering::Relaxed) as f64),
            (
                "align_decode_tokens_per_second",
                "Tokens per second of the recent decode steps.",
                *self.throughput.lock().unwrap_or_else(|e| e.into_inner()),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        self.ttft.lock().unwrap_or_else(|e| e.into_inner()).write(
            &mut out,
            "align_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first token.",
        );
        self.latency.lock().unwrap_or_else(|e| e.into_inner()).write(
            &mut out,
            "align_request_duration_seconds",
            "Seconds from a request's arrival to its last token.",
        );
        out
    }
}
