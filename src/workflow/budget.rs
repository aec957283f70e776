//! Budgets: what a topic (or a day) may still spend, what a step may cost
//! at worst, and how many draft variants fit. Pure arithmetic on numbers
//! the caller brings: no I/O, no clocks, no model calls.
//!
//! A step's worst case is its prompt estimate (characters / 4, as the
//! limiter counts it) plus the most output it may be billed for: its cap
//! after every doubling a truncation may bring (`llm.max_output_tokens`),
//! times the attempts it may make. Reserving that before a step starts is
//! what keeps a topic from being billed past its budget by the server's own
//! count, retries and truncations included.
//!
//! Must not: guess a price (no price → no USD figure, and a USD budget is
//! refused at config or submit time), or let a topic start a step whose
//! worst case does not fit.

use crate::config::{Config, Price};
use crate::state::{TopicBudget, UsageTotals};

/// The most a step can cost: tokens as billed (input + output), and USD
/// when its model has a price.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WorstCase {
    pub tokens: u64,
    pub cost_usd: Option<f64>,
}

impl WorstCase {
    /// `n` of the same step (variants).
    pub fn times(self, n: u32) -> WorstCase {
        WorstCase { tokens: self.tokens * u64::from(n), cost_usd: self.cost_usd.map(|c| c * f64::from(n)) }
    }

    pub fn plus(self, other: WorstCase) -> WorstCase {
        WorstCase {
            tokens: self.tokens + other.tokens,
            cost_usd: match (self.cost_usd, other.cost_usd) {
                (Some(a), Some(b)) => Some(a + b),
                _ => None,
            },
        }
    }
}

/// Worst case of one step: every one of `attempts` calls billed for the
/// whole prompt and the most output it may ask for (`output_ceiling`; a
/// retry after truncation asks for more than the first cap). Cached input
/// is priced as uncached: the cache is not promised.
pub fn step_worst_case(prompt_tokens: u32, output_ceiling: u32, attempts: u32, price: Option<&Price>) -> WorstCase {
    let attempts = attempts.max(1);
    let input = u64::from(prompt_tokens) * u64::from(attempts);
    let output = u64::from(output_ceiling) * u64::from(attempts);
    WorstCase { tokens: input + output, cost_usd: price.map(|p| p.cost_usd(input, 0, output)) }
}

/// What a topic has left. `None` = that budget is not set (unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Remaining {
    pub tokens: Option<u64>,
    pub cost_usd: Option<f64>,
}

/// Budget minus what the journal says was billed. A USD budget with an
/// unknown spend (a step without a price slipped in) counts as spent: the
/// topic cannot prove it is under.
pub fn remaining(budget: &TopicBudget, spent: &UsageTotals) -> Remaining {
    Remaining {
        tokens: budget.max_tokens.map(|max| max.saturating_sub(spent.total_tokens())),
        cost_usd: budget.max_cost_usd.map(|max| match spent.cost_usd {
            Some(c) => (max - c).max(0.0),
            None if spent.llm_calls == 0 => max,
            None => 0.0,
        }),
    }
}

/// Why something does not fit; stable names for state files and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortfall {
    Tokens,
    CostUsd,
}

impl Shortfall {
    pub fn as_str(self) -> &'static str {
        match self {
            Shortfall::Tokens => "max_tokens",
            Shortfall::CostUsd => "max_cost_usd",
        }
    }
}

/// Whether a step with this worst case may start. A USD budget against a
/// step with no price does not fit (config and submit refuse that case,
/// so this is the safe answer if it happens anyway).
pub fn fits(remaining: &Remaining, worst: &WorstCase) -> Result<(), Shortfall> {
    if let Some(left) = remaining.tokens {
        if worst.tokens > left {
            return Err(Shortfall::Tokens);
        }
    }
    if let Some(left) = remaining.cost_usd {
        match worst.cost_usd {
            Some(c) if c <= left => {}
            _ => return Err(Shortfall::CostUsd),
        }
    }
    Ok(())
}

/// How many of `requested` variants to write when each may cost
/// `per_variant` (its write and its review): as many as fit, at least one
/// (the topic then stops at the first step that does not fit, keeping what
/// it has). The reason is `Some` when fewer than requested run, for the
/// state file.
pub fn fit_variants(remaining: &Remaining, per_variant: &WorstCase, requested: u32) -> (u32, Option<String>) {
    let requested = requested.max(1);
    let mut n = requested;
    while n > 1 && fits(remaining, &per_variant.times(n)).is_err() {
        n -= 1;
    }
    if n == requested {
        return (n, None);
    }
    let why = fits(remaining, &per_variant.times(n + 1)).err().map_or("budget", Shortfall::as_str);
    let reason = format!(
        "{n} of {requested} variants: each may cost up to {} tokens{}, and {why} leaves room for {n}",
        per_variant.tokens,
        per_variant.cost_usd.map(|c| format!(" (${c:.4})")).unwrap_or_default(),
    );
    (n, Some(reason))
}

/// A topic's budget from the config and the submitter's overrides, or why
/// it cannot be had (one line, for `bad_request`).
pub fn topic_budget(
    config: &Config,
    max_tokens: Option<u64>,
    max_cost_usd: Option<f64>,
) -> Result<TopicBudget, String> {
    if max_tokens == Some(0) {
        return Err("max_tokens must be at least 1".into());
    }
    if let Some(usd) = max_cost_usd {
        if !(usd.is_finite() && usd > 0.0) {
            return Err("max_cost_usd must be a positive number".into());
        }
        if let Some(model) = config.unpriced_model() {
            return Err(format!("max_cost_usd needs a price for model `{model}` ([prices.\"{model}\"] in the config)"));
        }
    }
    Ok(TopicBudget {
        max_tokens: max_tokens.or(config.workflow.max_tokens),
        max_cost_usd: max_cost_usd.or(config.workflow.max_cost_usd),
    })
}

/// The refusal for a new topic when the day's spend reached the daily
/// limit, else `None`.
pub fn daily_refusal(limit_usd: f64, spent_today_usd: f64) -> Option<String> {
    (spent_today_usd >= limit_usd).then(|| {
        format!(
            "daily budget spent: ${spent_today_usd:.4} of limits.max_cost_usd_per_day = ${limit_usd:.4} (UTC day); try again tomorrow"
        )
    })
}

/// Unix milliseconds of the start of the UTC day containing `now_ms`.
pub fn utc_day_start_ms(now_ms: u64) -> u64 {
    now_ms - now_ms % 86_400_000
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRICE: Price = Price { input_per_mtok: 1.0, cached_input_per_mtok: None, output_per_mtok: 10.0 };

    #[test]
    fn worst_case_counts_every_attempt_at_the_ceiling() {
        let w = step_worst_case(300, 8000, 2, Some(&PRICE));
        assert_eq!(w.tokens, 2 * (300 + 8000));
        // 600 input at $1/M + 16,000 output at $10/M.
        assert!((w.cost_usd.unwrap() - 0.1606).abs() < 1e-9, "{w:?}");
        assert_eq!(step_worst_case(300, 8000, 0, None), WorstCase { tokens: 8300, cost_usd: None });
    }

    #[test]
    fn remaining_subtracts_what_was_billed() {
        let budget = TopicBudget { max_tokens: Some(10_000), max_cost_usd: Some(1.0) };
        let spent = UsageTotals {
            llm_calls: 2,
            input_tokens: 3000,
            output_tokens: 1000,
            cost_usd: Some(0.25),
            ..UsageTotals::default()
        };
        let r = remaining(&budget, &spent);
        assert_eq!(r.tokens, Some(6000));
        assert!((r.cost_usd.unwrap() - 0.75).abs() < 1e-12);
        // Over budget never goes negative.
        let over = UsageTotals { input_tokens: 20_000, cost_usd: Some(3.0), llm_calls: 1, ..UsageTotals::default() };
        assert_eq!(remaining(&budget, &over), Remaining { tokens: Some(0), cost_usd: Some(0.0) });
        // An unknown spend against a USD budget leaves nothing.
        let unknown = UsageTotals { llm_calls: 1, ..UsageTotals::default() };
        assert_eq!(remaining(&budget, &unknown).cost_usd, Some(0.0));
        assert_eq!(remaining(&TopicBudget::default(), &spent), Remaining::default());
    }

    #[test]
    fn fits_checks_both_limits() {
        let w = WorstCase { tokens: 5000, cost_usd: Some(0.5) };
        assert_eq!(fits(&Remaining::default(), &w), Ok(()));
        assert_eq!(fits(&Remaining { tokens: Some(5000), cost_usd: None }, &w), Ok(()));
        assert_eq!(fits(&Remaining { tokens: Some(4999), cost_usd: None }, &w), Err(Shortfall::Tokens));
        assert_eq!(fits(&Remaining { tokens: None, cost_usd: Some(0.49) }, &w), Err(Shortfall::CostUsd));
        let unpriced = WorstCase { tokens: 1, cost_usd: None };
        assert_eq!(fits(&Remaining { tokens: None, cost_usd: Some(10.0) }, &unpriced), Err(Shortfall::CostUsd));
    }

    #[test]
    fn fit_variants_runs_as_many_as_fit_and_at_least_one() {
        let per = WorstCase { tokens: 10_000, cost_usd: Some(0.1) };
        let all = Remaining { tokens: Some(30_000), cost_usd: None };
        assert_eq!(fit_variants(&all, &per, 3), (3, None));
        let two = Remaining { tokens: Some(29_999), cost_usd: None };
        let (n, why) = fit_variants(&two, &per, 3);
        assert_eq!(n, 2);
        let why = why.unwrap();
        assert!(why.contains("2 of 3") && why.contains("max_tokens"), "{why}");
        let money = Remaining { tokens: None, cost_usd: Some(0.15) };
        let (n, why) = fit_variants(&money, &per, 3);
        assert_eq!(n, 1);
        assert!(why.unwrap().contains("max_cost_usd"));
        // Not even one fits: still one (the step check then stops the topic).
        assert_eq!(fit_variants(&Remaining { tokens: Some(0), cost_usd: None }, &per, 3).0, 1);
        assert_eq!(fit_variants(&Remaining::default(), &per, 0), (1, None));
    }

    #[test]
    fn topic_budget_takes_overrides_and_refuses_unpriced_usd() {
        let mut config = Config::from_toml_str("[workflow]\nmax_tokens = 50000\n", &[]).unwrap();
        let b = topic_budget(&config, None, None).unwrap();
        assert_eq!(b, TopicBudget { max_tokens: Some(50_000), max_cost_usd: None });
        let b = topic_budget(&config, Some(9), Some(0.5)).unwrap();
        assert_eq!(b, TopicBudget { max_tokens: Some(9), max_cost_usd: Some(0.5) });
        assert!(topic_budget(&config, Some(0), None).is_err());
        assert!(topic_budget(&config, None, Some(-1.0)).is_err());
        config.llm.steps.write.model = Some("no-price-model".into());
        let err = topic_budget(&config, None, Some(0.5)).unwrap_err();
        assert!(err.contains("no-price-model"), "{err}");
    }

    #[test]
    fn daily_refusal_and_day_start() {
        assert_eq!(daily_refusal(5.0, 4.99), None);
        assert!(daily_refusal(5.0, 5.0).unwrap().contains("max_cost_usd_per_day"));
        assert_eq!(utc_day_start_ms(86_400_000 * 3 + 5), 86_400_000 * 3);
    }
}
