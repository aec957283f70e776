//! Server-side rate limits of the fake OpenAI server: one GCRA bucket per
//! limit (requests per minute, tokens per minute), each with a burst of one
//! second's worth, checked together so a request is admitted only when both
//! allow it.
//!
//! Written independently of `governor` (which the client side uses) so the
//! fake is an oracle for the client's limiter, not a copy of it. Semantics:
//! a request of cost `n` is admitted at `now` when
//! `max(tat, now) + n·T − now ≤ burst·T`, where `T` is the time one unit
//! replenishes in and `tat` the theoretical arrival time; exactly `burst`
//! units pass at once from a full bucket, then one unit every `T`.
//! Must not: sleep, or charge a bucket for a request that is refused.

use std::time::Duration;

/// One limit. Times are nanoseconds since the server's epoch, in `f64` so
/// that limits whose interval is not a whole number of nanoseconds do not
/// drift.
#[derive(Debug, Clone)]
pub struct Gcra {
    per_minute: u32,
    burst: u32,
    interval_ns: f64,
    tolerance_ns: f64,
    tat_ns: f64,
}

/// Why a request was refused and when it could pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refusal {
    pub wait: Duration,
    /// The cost exceeds the burst: waiting will not help.
    pub too_large: bool,
}

impl Gcra {
    /// `per_minute` must be non-zero; burst is one second's worth (at least 1).
    pub fn per_minute(per_minute: u32) -> Gcra {
        let per_minute = per_minute.max(1);
        let burst = (per_minute / 60).max(1);
        let interval_ns = 60e9 / f64::from(per_minute);
        Gcra { per_minute, burst, interval_ns, tolerance_ns: interval_ns * f64::from(burst), tat_ns: 0.0 }
    }

    pub fn limit(&self) -> u32 {
        self.per_minute
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// The new TAT if `cost` units were admitted at `now_ns`, or why not.
    pub fn test(&self, now_ns: f64, cost: u32) -> Result<f64, Refusal> {
        if cost > self.burst {
            return Err(Refusal { wait: Duration::ZERO, too_large: true });
        }
        let next = self.tat_ns.max(now_ns) + f64::from(cost) * self.interval_ns;
        let excess = next - now_ns - self.tolerance_ns;
        if excess > 0.0 {
            return Err(Refusal { wait: Duration::from_nanos(excess.ceil() as u64), too_large: false });
        }
        Ok(next)
    }

    pub fn commit(&mut self, tat_ns: f64) {
        self.tat_ns = tat_ns;
    }

    /// Units that would pass right now (what `x-ratelimit-remaining-*` shows).
    pub fn remaining(&self, now_ns: f64) -> u32 {
        let used = (self.tat_ns - now_ns).max(0.0);
        ((self.tolerance_ns - used) / self.interval_ns).floor().max(0.0) as u32
    }

    /// Time until the bucket is full again (`x-ratelimit-reset-*`).
    pub fn reset(&self, now_ns: f64) -> Duration {
        Duration::from_nanos((self.tat_ns - now_ns).max(0.0) as u64)
    }
}

/// OpenAI's duration format in `x-ratelimit-reset-*`: `17ms`, `1s`, `1.5s`,
/// `6m0s`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let minutes = ms / 60_000;
    let rest_ms = ms % 60_000;
    let seconds = if rest_ms % 1000 == 0 {
        format!("{}s", rest_ms / 1000)
    } else {
        let s = format!("{:.3}", rest_ms as f64 / 1000.0);
        format!("{}s", s.trim_end_matches('0').trim_end_matches('.'))
    };
    if minutes > 0 {
        format!("{minutes}m{seconds}")
    } else {
        seconds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_steady_rate() {
        // 6000/min: T = 10 ms, burst 100.
        let mut g = Gcra::per_minute(6000);
        assert_eq!(g.burst(), 100);
        for _ in 0..100 {
            let tat = g.test(0.0, 1).expect("burst passes");
            g.commit(tat);
        }
        let refused = g.test(0.0, 1).unwrap_err();
        assert_eq!(refused.wait, Duration::from_millis(10));
        assert!(g.test(10e6, 1).is_ok());
        assert_eq!(g.remaining(0.0), 0);
        assert_eq!(g.remaining(1e9), 100);
        assert_eq!(g.reset(0.0), Duration::from_secs(1));
    }

    #[test]
    fn weighted_costs_and_too_large() {
        // 60,000 tokens/min: 1,000/s burst.
        let mut g = Gcra::per_minute(60_000);
        let tat = g.test(0.0, 600).unwrap();
        g.commit(tat);
        assert!(g.test(0.0, 600).is_err());
        assert!(g.test(0.0, 400).is_ok());
        assert!(g.test(0.0, 1001).unwrap_err().too_large);
    }

    #[test]
    fn reset_format() {
        assert_eq!(format_reset(Duration::from_millis(17)), "17ms");
        assert_eq!(format_reset(Duration::from_secs(1)), "1s");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
    }
}
