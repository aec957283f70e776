//! Retries: per-step exponential backoff with full jitter, `retry-after`
//! honoured (up to `retry.max_retry_after_s`), a process-wide retry budget,
//! `StepCaller::call`, the one retry loop of a step, and
//! `StepCaller::attempt`, one attempt (limiter → provider → gate) as a stage
//! worker runs it.
//!
//! Must not: retry a fatal error, retry around the limiter, or retry a step
//! that already succeeded (callers journal success before moving on).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::limiter::RateLimit;
use super::{FailureReason, LlmError, LlmProvider, LlmRequest, Usage};
use crate::config::RetryConfig;
use crate::workflow::gates::GateError;
use crate::workflow::Step;

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    pub fn from_config(c: &RetryConfig) -> Self {
        Self {
            max_attempts: c.max_attempts,
            initial_backoff: Duration::from_millis(c.initial_backoff_ms),
            max_backoff: Duration::from_millis(c.max_backoff_ms),
        }
    }

    /// Full jitter: uniform in [0, min(max, initial · 2^(failed-1))].
    pub fn backoff(&self, failed_attempts: u32, rng: &mut impl Rng) -> Duration {
        let exp = failed_attempts.saturating_sub(1).min(20);
        let ceiling = self.initial_backoff.saturating_mul(1u32 << exp).min(self.max_backoff);
        let ms = ceiling.as_millis() as u64;
        Duration::from_millis(if ms == 0 { 0 } else { rng.random_range(0..=ms) })
    }
}

/// Process-wide retry budget (after tower's TPS budget): every first attempt
/// deposits `percent/100` of a retry, time deposits `min_per_s` retries per
/// second, and each retry withdraws one. When the budget is spent a retry
/// waits for it; it never fails the step.
pub struct RetryBudget {
    percent: f64,
    min_per_s: f64,
    cap: f64,
    state: std::sync::Mutex<(f64, Instant)>,
}

impl RetryBudget {
    pub fn new(c: &RetryConfig) -> Self {
        let min_per_s = c.budget_min_per_s as f64;
        Self {
            percent: c.budget_percent as f64 / 100.0,
            min_per_s,
            cap: (min_per_s * 10.0).max(100.0),
            state: std::sync::Mutex::new((min_per_s, Instant::now())),
        }
    }

    fn with_state<R>(&self, f: impl FnOnce(&mut f64) -> R) -> R {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let (balance, last) = &mut *guard;
        let now = Instant::now();
        *balance = (*balance + now.duration_since(*last).as_secs_f64() * self.min_per_s).min(self.cap);
        *last = now;
        f(balance)
    }

    pub fn record_first_attempt(&self) {
        self.with_state(|b| *b = (*b + self.percent).min(self.cap));
    }

    pub fn try_withdraw(&self) -> bool {
        self.with_state(|b| {
            if *b >= 1.0 {
                *b -= 1.0;
                true
            } else {
                false
            }
        })
    }

    /// Waits until a retry is affordable, then spends it.
    pub async fn withdraw(&self) {
        while !self.try_withdraw() {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// One attempt's report, for events, logs and metrics.
#[derive(Debug, Clone)]
pub struct AttemptReport {
    pub step: Step,
    pub attempt: u32,
    pub elapsed: Duration,
    pub waited: Duration,
    pub usage: Usage,
    /// `None` on success.
    pub failure: Option<(FailureReason, String)>,
}

#[derive(Debug, Clone)]
pub struct StepSuccess<T> {
    pub value: T,
    pub attempts: u32,
    pub calls: u32,
    pub usage: Usage,
}

#[derive(Debug, Clone)]
pub struct StepFailure {
    pub error: LlmError,
    pub attempts: u32,
    pub calls: u32,
    pub usage: Usage,
}

/// What `StepCaller::call` hands each attempt: its number and the previous
/// attempt's gate or parse error, told to the model. Owned, so an attempt
/// can travel to a stage worker in a message.
#[derive(Debug, Clone, Default)]
pub struct Attempt {
    pub number: u32,
    /// The previous attempt's gate or parse error, told to the model.
    pub feedback: Option<Arc<str>>,
    /// Earlier attempts of this step cut off by the output cap; the worker
    /// raises the built request's cap by `output_cap` accordingly.
    pub truncations: u32,
    /// What the step's earlier attempts were billed: checked against the
    /// request's `spend_limit` before this one goes out.
    pub spent: Usage,
}

impl Attempt {
    pub fn feedback(&self) -> Option<&str> {
        self.feedback.as_deref()
    }
}

/// What one attempt came to, as the stage worker (or, when the worker was
/// lost, its caller) reports it.
#[derive(Debug)]
pub struct AttemptOutcome<T> {
    pub result: Result<T, LlmError>,
    pub usage: Usage,
    /// Time spent waiting for the limiter.
    pub waited: Duration,
    /// Time of the model call (0 when none was made).
    pub elapsed: Duration,
    /// Whether a request went out.
    pub called: bool,
}

impl<T> AttemptOutcome<T> {
    /// An attempt that ended before any request went out.
    pub fn without_call(error: LlmError, waited: Duration) -> AttemptOutcome<T> {
        AttemptOutcome { result: Err(error), usage: Usage::default(), waited, elapsed: Duration::ZERO, called: false }
    }
}

/// Everything a step needs to reach the model. Shared by all stage workers.
pub struct StepCaller {
    provider: Arc<dyn LlmProvider>,
    limiter: Arc<dyn RateLimit>,
    policy: RetryPolicy,
    budget: Arc<RetryBudget>,
    request_timeout: Duration,
    max_retry_after: Duration,
    metrics: CallMetrics,
}

/// The metric handles every successful call touches, registered once: the
/// label sets are fixed per provider and model, and looking them up in the
/// recorder (and building the model label) on every call was a measurable
/// share of the per-step cost. Failures are rare and use the macros.
struct CallMetrics {
    ok: metrics::Counter,
    duration: metrics::Histogram,
    gen_ai_duration: metrics::Histogram,
    input_tokens: metrics::Counter,
    output_tokens: metrics::Counter,
    cached_input_tokens: metrics::Counter,
    reasoning_tokens: metrics::Counter,
    gen_ai_input_tokens: metrics::Histogram,
    gen_ai_output_tokens: metrics::Histogram,
}

impl CallMetrics {
    fn register(provider: &'static str, model: &str) -> CallMetrics {
        let model = model.to_string();
        let op = super::traced::OPERATION;
        CallMetrics {
            ok: metrics::counter!("scriptorium_llm_requests_total", "provider" => provider, "status" => "200"),
            duration: metrics::histogram!("scriptorium_llm_request_duration_seconds", "provider" => provider),
            gen_ai_duration: metrics::histogram!(
                "gen_ai_client_operation_duration_seconds",
                "gen_ai_provider_name" => provider,
                "gen_ai_request_model" => model.clone(),
                "gen_ai_operation_name" => op
            ),
            input_tokens: metrics::counter!("scriptorium_llm_tokens_total", "direction" => "input"),
            output_tokens: metrics::counter!("scriptorium_llm_tokens_total", "direction" => "output"),
            // Parts of the two above (as OpenAI counts them), not additions.
            cached_input_tokens: metrics::counter!("scriptorium_llm_tokens_total", "direction" => "cached_input"),
            reasoning_tokens: metrics::counter!("scriptorium_llm_tokens_total", "direction" => "reasoning"),
            gen_ai_input_tokens: metrics::histogram!(
                "gen_ai_client_token_usage",
                "gen_ai_provider_name" => provider,
                "gen_ai_operation_name" => op,
                "gen_ai_token_type" => "input",
                "gen_ai_request_model" => model.clone()
            ),
            gen_ai_output_tokens: metrics::histogram!(
                "gen_ai_client_token_usage",
                "gen_ai_provider_name" => provider,
                "gen_ai_operation_name" => op,
                "gen_ai_token_type" => "output",
                "gen_ai_request_model" => model
            ),
        }
    }

    fn record(
        &self,
        provider: &'static str,
        model: &str,
        result: &Result<super::LlmReply, LlmError>,
        elapsed: Duration,
    ) {
        let seconds = elapsed.as_secs_f64();
        self.duration.record(seconds);
        if let Some(usage) = billed(result) {
            self.input_tokens.increment(usage.input_tokens);
            self.output_tokens.increment(usage.output_tokens);
            self.cached_input_tokens.increment(usage.cached_input_tokens);
            self.reasoning_tokens.increment(usage.reasoning_tokens);
            self.gen_ai_input_tokens.record(usage.input_tokens as f64);
            self.gen_ai_output_tokens.record(usage.output_tokens as f64);
        }
        match result {
            Ok(_) => {
                self.gen_ai_duration.record(seconds);
                self.ok.increment(1);
            }
            Err(e) => {
                // The GenAI conventions put failed calls in the same
                // histogram with `error.type`: here the classified reason.
                metrics::histogram!(
                    "gen_ai_client_operation_duration_seconds",
                    "gen_ai_provider_name" => provider,
                    "gen_ai_request_model" => model.to_string(),
                    "gen_ai_operation_name" => super::traced::OPERATION,
                    "error_type" => e.reason().as_str()
                )
                .record(seconds);
                let status = e.http_status().map_or("error", status_label);
                metrics::counter!("scriptorium_llm_requests_total", "provider" => provider, "status" => status)
                    .increment(1);
            }
        }
    }
}

/// Adds one attempt's bill to its step's. The step has a cost once a
/// priced call was made, and keeps it only while every call was priced;
/// attempts that made no call change nothing.
fn merge_attempt(step: &mut Usage, attempt: &Usage, called: bool, priced_call_seen: &mut bool) {
    step.input_tokens += attempt.input_tokens;
    step.output_tokens += attempt.output_tokens;
    step.cached_input_tokens += attempt.cached_input_tokens;
    step.reasoning_tokens += attempt.reasoning_tokens;
    if !called {
        return;
    }
    step.cost_usd = match (std::mem::replace(priced_call_seen, true), step.cost_usd, attempt.cost_usd) {
        (false, _, cost) => cost,
        (true, Some(a), Some(b)) => Some(a + b),
        _ => None,
    };
}

/// The tokens a call was billed for: a reply's, or a truncated answer's.
fn billed(result: &Result<super::LlmReply, LlmError>) -> Option<&Usage> {
    match result {
        Ok(reply) => Some(&reply.usage),
        Err(LlmError::Truncated { usage, .. }) => Some(usage),
        Err(_) => None,
    }
}

/// `scriptorium_cost_usd_total{step, model}`: looked up per priced call (a
/// per-step model is only known from the request). The `metrics` crate's
/// counters are integers, so this is a gauge that only ever goes up.
fn record_cost(step: Step, model: &str, usd: f64) {
    if usd > 0.0 && usd.is_finite() {
        metrics::gauge!("scriptorium_cost_usd_total", "step" => step.as_str(), "model" => model.to_string())
            .increment(usd);
    }
}

/// What a `StepCaller` is built from.
pub struct CallerParts {
    pub provider: Arc<dyn LlmProvider>,
    pub limiter: Arc<dyn RateLimit>,
    pub policy: RetryPolicy,
    pub budget: Arc<RetryBudget>,
    pub request_timeout: Duration,
    /// Longest server retry-after obeyed (`retry.max_retry_after_s`).
    pub max_retry_after: Duration,
}

impl StepCaller {
    /// Registers the call metrics: install the metrics recorder first.
    pub fn new(parts: CallerParts) -> StepCaller {
        let metrics = CallMetrics::register(parts.provider.name(), parts.provider.model());
        StepCaller {
            provider: parts.provider,
            limiter: parts.limiter,
            policy: parts.policy,
            budget: parts.budget,
            request_timeout: parts.request_timeout,
            max_retry_after: parts.max_retry_after,
            metrics,
        }
    }

    pub fn max_attempts(&self) -> u32 {
        self.policy.max_attempts
    }

    /// A server's retry-after, cut to `retry.max_retry_after_s`.
    fn retry_after(&self, error: &LlmError) -> Option<Duration> {
        error.retry_after().map(|d| d.min(self.max_retry_after))
    }

    /// One attempt: budget check → limiter → provider → gate. Runs inside
    /// a stage worker's handler, so a panic anywhere in it (provider
    /// parsing, the gate) kills that worker. `cancel` drops the limiter wait
    /// or the in-flight request at once (the HTTP connection is closed,
    /// nothing more is spent). The cap is raised per earlier truncation.
    pub async fn attempt<T>(
        &self,
        mut request: LlmRequest,
        attempt: &Attempt,
        gate: impl FnOnce(&str) -> Result<T, GateError>,
        cancel: &CancellationToken,
    ) -> AttemptOutcome<T> {
        let provider = self.provider.name();
        if provider == "simulated" {
            // Offline answers cost nothing: a price here would be a made-up
            // cost.
            request.price = None;
        }
        request.max_output_tokens =
            super::output_cap(request.max_output_tokens, request.max_output_tokens_ceiling, attempt.truncations);
        if let Some(limit) = &request.spend_limit {
            let spent = &attempt.spent;
            let left = crate::workflow::budget::Remaining {
                tokens: limit.tokens.map(|t| t.saturating_sub(spent.total_tokens())),
                cost_usd: limit.cost_usd.map(|c| (c - spent.cost_usd.unwrap_or(0.0)).max(0.0)),
            };
            let worst = request.worst_case();
            if let Err(short) = crate::workflow::budget::fits(&left, &worst) {
                let error = LlmError::BudgetExceeded(format!(
                    "attempt {} may cost {} tokens{}, more than {} leaves",
                    attempt.number,
                    worst.tokens,
                    worst.cost_usd.map(|c| format!(" (${c:.4})")).unwrap_or_default(),
                    short.as_str()
                ));
                return AttemptOutcome::without_call(error, Duration::ZERO);
            }
        }
        let reserved = request.estimated_tokens();
        let wait_started = Instant::now();
        let waited = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                return AttemptOutcome::without_call(LlmError::Cancelled, wait_started.elapsed());
            }
            waited = self.limiter.acquire(reserved) => waited,
        };
        let started = Instant::now();
        let span = tracing::debug_span!("attempt", attempt = attempt.number, provider);
        let call = tokio::time::timeout(self.request_timeout, self.provider.complete(&request)).instrument(span);
        let result = tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(LlmError::Cancelled),
            r = call => r.unwrap_or(Err(LlmError::Timeout(self.request_timeout))),
        };
        let elapsed = started.elapsed();
        if !matches!(result, Err(LlmError::Cancelled)) {
            self.metrics.record(provider, self.provider.model(), &result, elapsed);
        }
        // This attempt's bill: priced calls start at $0, unpriced ones
        // have no cost.
        let mut usage = Usage { cost_usd: request.price.map(|_| 0.0), ..Usage::default() };
        if let Some(call) = billed(&result) {
            usage.add_call(call, request.price.as_ref());
            if let Some(cost) = usage.cost_usd {
                record_cost(request.step, request.model.as_deref().unwrap_or(self.provider.model()), cost);
            }
            let used = u32::try_from(call.total_tokens()).unwrap_or(u32::MAX);
            self.limiter.settle(reserved, used);
        }
        if let Ok(reply) = &result {
            let limits = self.limiter.snapshot();
            if let Some(pause) = reply.meta.limits.pause(limits.requests_per_minute, limits.tokens_per_minute) {
                self.limiter.pause_for(pause);
            }
        }
        let result = result.and_then(|reply| {
            gate(&reply.text).map_err(|g| {
                let message = match &reply.meta.request_id {
                    Some(id) => format!("{} (request id {id})", g.0),
                    None => g.0,
                };
                LlmError::InvalidOutput(message)
            })
        });
        if let Err(error @ LlmError::RateLimited { .. }) = &result {
            if let Some(pause) = self.retry_after(error) {
                self.limiter.pause_for(pause);
            }
        }
        AttemptOutcome { result, usage, waited, elapsed, called: true }
    }

    /// Runs attempts until one is accepted, a fatal error, or the attempts
    /// run out: the one retry loop. `run` executes one attempt (on a stage
    /// worker); the loop owns the budget, the backoff and the feedback.
    /// Dropping the returned future (cancel) stops it between attempts too.
    pub async fn call<T, F>(
        &self,
        step: Step,
        mut run: impl FnMut(Attempt) -> F,
        observe: &(dyn Fn(&AttemptReport) + Send + Sync),
    ) -> Result<StepSuccess<T>, StepFailure>
    where
        F: std::future::Future<Output = AttemptOutcome<T>>,
    {
        let mut usage = Usage::default();
        let mut feedback: Option<Arc<str>> = None;
        let mut calls = 0;
        let mut truncations = 0;
        let mut priced_call_seen = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            if attempt > 1 {
                self.budget.withdraw().await;
                metrics::counter!("scriptorium_retries_total", "step" => step.as_str()).increment(1);
            } else {
                self.budget.record_first_attempt();
            }
            let outcome = run(Attempt { number: attempt, feedback: feedback.clone(), truncations, spent: usage }).await;
            if outcome.called {
                calls += 1;
            }
            merge_attempt(&mut usage, &outcome.usage, outcome.called, &mut priced_call_seen);
            let failure = outcome.result.as_ref().err().map(|e| (e.reason(), e.to_string()));
            if !matches!(outcome.result, Err(LlmError::Cancelled)) {
                observe(&AttemptReport {
                    step,
                    attempt,
                    elapsed: outcome.elapsed,
                    waited: outcome.waited,
                    usage: outcome.usage,
                    failure,
                });
            }
            let error = match outcome.result {
                Ok(value) => return Ok(StepSuccess { value, attempts: attempt, calls, usage }),
                Err(LlmError::BudgetExceeded(message)) if !outcome.called => {
                    // Refused before it went out: not an attempt.
                    let done = attempt - 1;
                    let error = LlmError::BudgetExceeded(message);
                    metrics::counter!(
                        "scriptorium_step_failures_total",
                        "step" => step.as_str(),
                        "reason" => error.reason().as_str()
                    )
                    .increment(1);
                    return Err(StepFailure { error, attempts: done, calls, usage });
                }
                Err(e) => e,
            };
            if !matches!(error, LlmError::Cancelled) {
                metrics::counter!(
                    "scriptorium_step_failures_total",
                    "step" => step.as_str(),
                    "reason" => error.reason().as_str()
                )
                .increment(1);
            }
            if !error.is_retryable() || attempt >= self.policy.max_attempts {
                return Err(StepFailure { error, attempts: attempt, calls, usage });
            }
            feedback = match &error {
                LlmError::InvalidOutput(msg) => Some(msg.as_str().into()),
                _ => None,
            };
            if let LlmError::Truncated { .. } = error {
                // Not the model's fault: the same request would be cut off
                // again, so the next one gets a larger cap instead.
                truncations += 1;
            }
            let backoff = self.policy.backoff(attempt, &mut rand::rng());
            let delay = backoff.max(self.retry_after(&error).unwrap_or_default());
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Static labels for the statuses we expect; anything else is bucketed by
/// class so the label set stays bounded.
fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        408 => "408",
        409 => "409",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        s if s >= 500 => "5xx",
        s if s >= 400 => "4xx",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn backoff_is_bounded_full_jitter() {
        let p = RetryPolicy::from_config(&RetryConfig::default());
        let mut rng = SmallRng::seed_from_u64(1);
        for failed in 1..12 {
            let ceiling = Duration::from_millis((500u64 << (failed - 1).min(20)).min(8000));
            for _ in 0..50 {
                assert!(p.backoff(failed, &mut rng) <= ceiling);
            }
        }
    }

    #[test]
    fn budget_limits_retries_to_a_share_of_requests() {
        let b = RetryBudget::new(&RetryConfig { budget_percent: 20, budget_min_per_s: 0, ..RetryConfig::default() });
        for _ in 0..100 {
            b.record_first_attempt();
        }
        let granted = (0..100).filter(|_| b.try_withdraw()).count();
        assert!((19..=20).contains(&granted), "{granted}");
    }
}
