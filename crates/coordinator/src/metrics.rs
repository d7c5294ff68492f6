//! The Prometheus metrics the engine records, described in one place: what each family
//! means and its unit, so `/metrics` carries HELP text for every one (`promtool check
//! metrics` passes). Names follow vLLM's (`vllm:time_to_first_token_seconds` is
//! `tpserve_time_to_first_token_seconds` here). The engine records them through the
//! `metrics` facade; whoever installs the recorder calls [`describe_metrics`] once after.

use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

/// Describes every metric the engine records to the installed recorder (a recorder keeps
/// the first description of a name, so calling it again changes nothing).
pub fn describe_metrics() {
    describe_counter!("tpserve_prompt_tokens_total", Unit::Count, "Prompt tokens of the requests admitted to the queue.");
    describe_counter!("tpserve_generation_tokens_total", Unit::Count, "Tokens generated (sampled) for all requests.");
    describe_counter!("tpserve_request_success_total", Unit::Count, "Requests finished, by finished_reason (stop, length, abort).");
    describe_counter!(
        "tpserve_num_preemptions_total",
        Unit::Count,
        "Running sequences preempted (freed and queued to be recomputed) for want of KV-cache blocks."
    );
    describe_counter!(
        "tpserve_prefix_cache_queries_total",
        Unit::Count,
        "Prompt tokens looked up in the prefix cache when their requests were first scheduled."
    );
    describe_counter!("tpserve_prefix_cache_hits_total", Unit::Count, "Prompt tokens found in the prefix cache (not recomputed).");
    describe_counter!("tpserve_cluster_failures_total", Unit::Count, "Times a step failed because a worker was lost (killed, stopped or cut off).");
    describe_counter!("tpserve_cluster_recoveries_total", Unit::Count, "Times the cluster was reloaded on every rank and served again after a failure.");
    describe_gauge!("tpserve_num_requests_running", Unit::Count, "Requests being computed (in the scheduler's running set).");
    describe_gauge!("tpserve_num_requests_waiting", Unit::Count, "Requests waiting to be scheduled.");
    describe_gauge!("tpserve_kv_cache_usage_perc", Unit::Percent, "Fraction (0-1) of the full-attention KV-cache blocks in use.");
    describe_gauge!("tpserve_kv_cache_blocks_free", Unit::Count, "Free KV-cache blocks, by group of layers with the same attention window.");
    describe_histogram!("tpserve_time_to_first_token_seconds", Unit::Seconds, "From a request's arrival to its first generated token.");
    describe_histogram!("tpserve_inter_token_latency_seconds", Unit::Seconds, "Between successive generated tokens of a request.");
    describe_histogram!("tpserve_e2e_request_latency_seconds", Unit::Seconds, "From a request's arrival to its end.");
    describe_histogram!("tpserve_request_queue_time_seconds", Unit::Seconds, "From a request's arrival to its first step.");
    describe_histogram!(
        "tpserve_step_duration_seconds",
        Unit::Seconds,
        "Wall time of one engine step through every worker, by phase (prefill: any prompt work in the batch; decode: one token per sequence)."
    );
    describe_histogram!("tpserve_step_tokens", Unit::Count, "Tokens computed in one engine step, by phase.");
    describe_histogram!("tpserve_rank_comm_seconds", Unit::Seconds, "Time one rank spent in collectives during a step, by rank.");
    describe_histogram!("tpserve_rank_compute_seconds", Unit::Seconds, "Time one rank spent computing during a step, by rank.");
}
