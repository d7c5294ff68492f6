//! What a benchmark run's request records add up to, with the meaning and the result keys of
//! vLLM's `bench serve`: TTFT (send → first token), TPOT (per output token after the first:
//! `(e2e - ttft) / (output_tokens - 1)`), ITL (every gap between streamed chunks), E2EL (send
//! → last token); request, output and total token throughput over the run's duration; the
//! peak output rate (most tokens finished within one second); goodput (requests per second
//! that met every SLO given).

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

/// One request as the client saw it. Times are seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    /// None when it succeeded; otherwise the kind of failure ("http 429", "connect", ...).
    pub error: Option<String>,
    /// Prompt tokens as the workload counted them ([`crate::client::Prompt::tokens`]).
    pub input_tokens: usize,
    /// Tokens generated: the server's final `usage.completion_tokens` when it sends one,
    /// else the number of chunks with text.
    pub output_tokens: usize,
    /// When it was sent, from the start of the run.
    pub start: f64,
    /// Send → first token.
    pub ttft: f64,
    /// Gaps between successive streamed chunks.
    pub itl: Vec<f64>,
    /// Send → last token.
    pub e2el: f64,
}

impl Record {
    /// Whether it succeeded: only successful records count in the tokens, throughputs and
    /// latencies of the results.
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// Time per output token after the first (None for one token or fewer).
    pub fn tpot(&self) -> Option<f64> {
        (self.output_tokens > 1).then(|| (self.e2el - self.ttft) / (self.output_tokens - 1) as f64)
    }
}

/// Service-level objectives for goodput, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Slo {
    /// Longest time to first token a good request may have (None: no limit).
    pub ttft_ms: Option<f64>,
    /// Longest time per output token (a request of one token counts as 0).
    pub tpot_ms: Option<f64>,
    /// Longest end-to-end latency.
    pub e2el_ms: Option<f64>,
}

impl Slo {
    /// Whether no objective is set; the results then have no `request_goodput`.
    pub fn is_empty(&self) -> bool {
        self.ttft_ms.is_none() && self.tpot_ms.is_none() && self.e2el_ms.is_none()
    }

    fn met(&self, r: &Record) -> bool {
        let within = |slo: Option<f64>, v: Option<f64>| slo.is_none_or(|s| v.is_some_and(|v| v * 1e3 <= s));
        r.ok() && within(self.ttft_ms, Some(r.ttft)) && within(self.tpot_ms, r.tpot().or(Some(0.0))) && within(self.e2el_ms, Some(r.e2el))
    }
}

/// A per-request latency the results report: vLLM's `--percentile-metrics` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Latency {
    /// Time to first token.
    Ttft,
    /// Time per output token after the first.
    Tpot,
    /// Inter-token latency: every gap between streamed chunks.
    Itl,
    /// End-to-end latency.
    E2el,
}

impl Latency {
    /// All four, in the order vLLM's table lists them.
    pub const ALL: [Latency; 4] = [Latency::Ttft, Latency::Tpot, Latency::Itl, Latency::E2el];

    /// The name in result keys (`mean_ttft_ms`) and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ttft => "ttft",
            Self::Tpot => "tpot",
            Self::Itl => "itl",
            Self::E2el => "e2el",
        }
    }
}

impl std::str::FromStr for Latency {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|l| l.name() == s.trim()).ok_or_else(|| format!("{s:?} is not a latency metric (ttft, tpot, itl, e2el)"))
    }
}

/// The `p`-th percentile (0-100) of `v`, interpolated linearly between the closest ranks
/// (numpy's default, which vLLM uses). 0 for no values.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = p / 100.0 * (s.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (rank - lo as f64)
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn std(v: &[f64]) -> f64 {
    let m = mean(v);
    if v.is_empty() {
        0.0
    } else {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
    }
}

/// The run's results under vLLM's keys (`duration`, `completed`, `failed`,
/// `total_input_tokens`, `total_output_tokens`, `request_throughput`, `request_goodput`,
/// `output_throughput`, `total_token_throughput`, `max_output_tokens_per_s`, and
/// `mean_/median_/std_/pNN_` + `ttft_ms`, `tpot_ms`, `itl_ms`, `e2el_ms`), plus
/// `errors_by_kind`. `duration` is seconds from the first send to the last answer. As in
/// vLLM, only the `latencies` asked for are reported, each with its mean, median, standard
/// deviation and every percentile (0-100) of `percentiles`.
pub fn summarize(records: &[Record], duration: f64, percentiles: &[f64], latencies: &[Latency], slo: &Slo) -> Value {
    let ok: Vec<&Record> = records.iter().filter(|r| r.ok()).collect();
    let per_s = |x: f64| if duration > 0.0 { x / duration } else { 0.0 };
    let total_in: usize = ok.iter().map(|r| r.input_tokens).sum();
    let total_out: usize = ok.iter().map(|r| r.output_tokens).sum();
    let mut m = Map::new();
    m.insert("duration".into(), json!(duration));
    m.insert("completed".into(), json!(ok.len()));
    m.insert("failed".into(), json!(records.len() - ok.len()));
    m.insert("total_input_tokens".into(), json!(total_in));
    m.insert("total_output_tokens".into(), json!(total_out));
    m.insert("request_throughput".into(), json!(per_s(ok.len() as f64)));
    if !slo.is_empty() {
        m.insert("request_goodput".into(), json!(per_s(ok.iter().filter(|r| slo.met(r)).count() as f64)));
    }
    m.insert("output_throughput".into(), json!(per_s(total_out as f64)));
    m.insert("total_token_throughput".into(), json!(per_s((total_in + total_out) as f64)));
    m.insert("max_output_tokens_per_s".into(), json!(peak_output_rate(&ok)));
    let ms = |v: Vec<f64>| v.into_iter().map(|x| x * 1e3).collect::<Vec<f64>>();
    for l in Latency::ALL.into_iter().filter(|l| latencies.contains(l)) {
        let v = &match l {
            Latency::Ttft => ms(ok.iter().map(|r| r.ttft).collect()),
            Latency::Tpot => ms(ok.iter().filter_map(|r| r.tpot()).collect()),
            Latency::Itl => ms(ok.iter().flat_map(|r| r.itl.iter().copied()).collect()),
            Latency::E2el => ms(ok.iter().map(|r| r.e2el).collect()),
        };
        let name = l.name();
        m.insert(format!("mean_{name}_ms"), json!(mean(v)));
        m.insert(format!("median_{name}_ms"), json!(percentile(v, 50.0)));
        m.insert(format!("std_{name}_ms"), json!(std(v)));
        for &p in percentiles {
            m.insert(percentile_key(p, name), json!(percentile(v, p)));
        }
    }
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for r in records {
        if let Some(e) = &r.error {
            *kinds.entry(e.clone()).or_default() += 1;
        }
    }
    m.insert("errors_by_kind".into(), json!(kinds));
    Value::Object(m)
}

/// The result key of percentile `p` of metric `name`, as vLLM spells it: `p99_ttft_ms`,
/// `p99.9_itl_ms`.
pub fn percentile_key(p: f64, name: &str) -> String {
    if p.fract() == 0.0 {
        format!("p{}_{name}_ms", p as u64)
    } else {
        format!("p{p}_{name}_ms")
    }
}

/// Most output tokens whose arrival falls within one whole second of the run (each request's
/// tokens placed at its first-token time plus its inter-token gaps).
fn peak_output_rate(ok: &[&Record]) -> f64 {
    let mut per_second: BTreeMap<u64, f64> = BTreeMap::new();
    for r in ok {
        let mut t = r.start + r.ttft;
        let mut times = vec![t];
        for g in &r.itl {
            t += g;
            times.push(t);
        }
        // A chunk may carry several tokens: the tokens are spread evenly over the chunks.
        let per_chunk = r.output_tokens as f64 / times.len() as f64;
        for t in times {
            *per_second.entry(t.max(0.0) as u64).or_default() += per_chunk;
        }
    }
    per_second.values().copied().fold(0.0, f64::max).round()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(start: f64, ttft: f64, itl: &[f64], out: usize) -> Record {
        Record { error: None, input_tokens: 10, output_tokens: out, start, ttft, itl: itl.to_vec(), e2el: ttft + itl.iter().sum::<f64>() }
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert!((percentile(&v, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn a_known_run_adds_up_exactly() {
        // Two requests of 3 tokens, one failure.
        let a = rec(0.0, 0.1, &[0.02, 0.04], 3);
        let b = rec(0.5, 0.3, &[0.06, 0.06], 3);
        let bad = Record { error: Some("http 429".into()), ..Record::default() };
        let s = summarize(&[a, b, bad], 2.0, &[99.0], &Latency::ALL, &Slo { ttft_ms: Some(200.0), ..Slo::default() });
        assert_eq!(s["completed"], 2);
        assert_eq!(s["failed"], 1);
        assert_eq!(s["total_input_tokens"], 20);
        assert_eq!(s["total_output_tokens"], 6);
        assert_eq!(s["request_throughput"], 1.0);
        assert_eq!(s["output_throughput"], 3.0);
        assert_eq!(s["total_token_throughput"], 13.0);
        // Only the first request met the 200 ms TTFT objective.
        assert_eq!(s["request_goodput"], 0.5);
        let close = |k: &str, want: f64| assert!((s[k].as_f64().unwrap() - want).abs() < 1e-9, "{k}: {} vs {want}", s[k]);
        close("mean_ttft_ms", 200.0);
        close("median_ttft_ms", 200.0);
        close("p99_ttft_ms", 100.0 + 0.99 * 200.0);
        // TPOT: (0.16 - 0.1) / 2 = 30 ms and (0.42 - 0.3) / 2 = 60 ms.
        close("mean_tpot_ms", 45.0);
        // ITL: 20, 40, 60, 60 ms.
        close("mean_itl_ms", 45.0);
        close("median_itl_ms", 50.0);
        close("mean_e2el_ms", (160.0 + 420.0) / 2.0);
        close("std_ttft_ms", 100.0);
        assert_eq!(s["errors_by_kind"]["http 429"], 1);
        // Tokens at 0.1, 0.12, 0.16 and 0.8, 0.86, 0.92: at most 6 within second 0.
        assert_eq!(s["max_output_tokens_per_s"], 6.0);
    }

    #[test]
    fn only_the_latencies_asked_for_are_reported_with_exactly_the_percentiles_asked_for() {
        let r = rec(0.0, 0.1, &[0.02, 0.04], 3);
        let s = summarize(&[r], 1.0, &[50.0, 99.9], &[Latency::Tpot, Latency::Ttft], &Slo::default());
        let mut keys: Vec<&str> = s.as_object().unwrap().keys().map(String::as_str).filter(|k| k.ends_with("_ms")).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "mean_tpot_ms",
                "mean_ttft_ms",
                "median_tpot_ms",
                "median_ttft_ms",
                "p50_tpot_ms",
                "p50_ttft_ms",
                "p99.9_tpot_ms",
                "p99.9_ttft_ms",
                "std_tpot_ms",
                "std_ttft_ms"
            ]
        );
        // What is reported is unchanged by what is left out.
        assert_eq!(s["p50_ttft_ms"], summarize(&[rec(0.0, 0.1, &[0.02, 0.04], 3)], 1.0, &[50.0], &Latency::ALL, &Slo::default())["p50_ttft_ms"]);
    }

    #[test]
    fn latency_names_parse_and_a_wrong_one_is_named() {
        assert_eq!(" e2el".parse::<Latency>(), Ok(Latency::E2el));
        assert!(Latency::ALL.iter().all(|l| l.name().parse::<Latency>() == Ok(*l)));
        assert!("ttfb".parse::<Latency>().unwrap_err().contains("\"ttfb\""));
    }
}
