use std::fmt::Debug;
use std::time::{SystemTime, UNIX_EPOCH};

/// Source of physical time in milliseconds since the Unix epoch. Injected so
/// that tests and the simulator control time.
pub trait Clock: Send + Sync + Debug {
    fn now_ms(&self) -> u64;
}

/// The host's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A hybrid logical clock: `physical_ms << 16 | logical`. Strictly
/// increasing across [`Hlc::tick`] calls and never behind any timestamp it
/// has [`Hlc::observe`]d, whatever the wall clock does.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Hlc {
    last: u64,
}

impl Hlc {
    pub const LOGICAL_BITS: u32 = 16;

    pub fn new(last: u64) -> Self {
        Hlc { last }
    }

    /// Timestamp for a local event at physical time `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> u64 {
        let physical = now_ms.saturating_mul(1 << Self::LOGICAL_BITS);
        self.last = physical.max(self.last.saturating_add(1));
        self.last
    }

    /// Take in a timestamp seen on a record from elsewhere.
    pub fn observe(&mut self, remote: u64) {
        self.last = self.last.max(remote);
    }

    /// [`Hlc::observe`], but a remote timestamp more than `max_skew_ms`
    /// ahead of `now_ms` counts only as `now_ms + max_skew_ms`: a peer with
    /// a wrong (or hostile) clock cannot drag this clock, and everything
    /// stamped after it, into the future.
    pub fn observe_bounded(&mut self, remote: u64, now_ms: u64, max_skew_ms: u64) {
        self.observe(remote.min(Self::bound(now_ms, max_skew_ms)));
    }

    /// The largest timestamp accepted from elsewhere at `now_ms`.
    pub fn bound(now_ms: u64, max_skew_ms: u64) -> u64 {
        now_ms
            .saturating_add(max_skew_ms)
            .saturating_mul(1 << Self::LOGICAL_BITS)
            | ((1 << Self::LOGICAL_BITS) - 1)
    }

    pub fn last(&self) -> u64 {
        self.last
    }

    /// Milliseconds part of an HLC timestamp.
    pub fn physical_ms(ts: u64) -> u64 {
        ts >> Self::LOGICAL_BITS
    }
}
