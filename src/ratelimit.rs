//! Per-client request rate limits: a token bucket (GCRA, `governor`) per client — the
//! API key's name when the request authenticated, else the peer's IP address.
//! `http.rate_limit_per_second` requests per second with bursts of
//! `http.rate_limit_burst`; past it a request gets `429` with `Retry-After`.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// Who a request is counted against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClientId {
    Key(String),
    Ip(IpAddr),
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Key(name) => write!(f, "API key {name:?}"),
            Self::Ip(ip) => write!(f, "client {ip}"),
        }
    }
}

pub struct ClientLimiter {
    limiter: DefaultKeyedRateLimiter<ClientId>,
    clock: DefaultClock,
    per_second: u32,
    checks: AtomicU64,
}

/// Buckets of clients not seen for a while are dropped every this many checks.
const RETAIN_EVERY: u64 = 4096;

impl ClientLimiter {
    /// `None` when `per_second` is 0 (no limit). A `burst` of 0 means twice the rate.
    pub fn new(per_second: u32, burst: u32) -> Option<Self> {
        let rate = NonZeroU32::new(per_second)?;
        let burst = NonZeroU32::new(burst).unwrap_or(rate.saturating_mul(NonZeroU32::MIN.saturating_add(1)));
        let quota = Quota::per_second(rate).allow_burst(burst);
        Some(Self {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
            clock: DefaultClock::default(),
            per_second,
            checks: AtomicU64::new(0),
        })
    }

    /// `Err(wait)`: over the limit, retry after `wait`.
    pub fn check(&self, client: &ClientId) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % RETAIN_EVERY == RETAIN_EVERY - 1 {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        self.limiter.check_key(client).map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    pub fn per_second(&self) -> u32 {
        self.per_second
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_past_its_burst_waits_and_others_do_not() {
        let limiter = ClientLimiter::new(10, 5).expect("on");
        let noisy = ClientId::Ip("10.0.0.1".parse().expect("ip"));
        let quiet = ClientId::Key("grafana".into());
        for _ in 0..5 {
            assert!(limiter.check(&noisy).is_ok());
        }
        let wait = limiter.check(&noisy).expect_err("over the burst");
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        assert!(limiter.check(&quiet).is_ok(), "buckets are per client");
        assert!(ClientLimiter::new(0, 0).is_none(), "0: off");
    }
}
