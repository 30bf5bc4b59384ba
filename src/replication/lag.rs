//! Freshness figures an operator can alert on: how long remote transactions
//! took from their commit on the remote to their commit here, as a
//! histogram (since start, for Prometheus, and over the last minute or two,
//! for `status`), and how much WAL the slot makes the remote keep.
//!
//! Pure bookkeeping; the apply feeds it one observation per remote
//! transaction, the reporting code reads it from [`super::Status`].

use std::time::Duration;

/// Upper bounds of the histogram buckets, in seconds (the last bucket,
/// `+Inf`, is implicit). From a sub-millisecond apply on an idle remote to
/// minutes behind after an outage.
pub const LAG_BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// Remote-commit-to-local-commit times of applied transactions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LagHistogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    counts: [u64; LAG_BUCKETS.len() + 1],
    count: u64,
    sum: Duration,
}

impl LagHistogram {
    /// Records `n` transactions that each took `lag`.
    pub fn observe(&mut self, lag: Duration, n: u64) {
        let secs = lag.as_secs_f64();
        let bucket = LAG_BUCKETS.iter().position(|&le| secs <= le).unwrap_or(LAG_BUCKETS.len());
        self.counts[bucket] += n;
        self.count += n;
        self.sum += lag * u32::try_from(n).unwrap_or(u32::MAX);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The sum of all observed lags.
    pub fn sum(&self) -> Duration {
        self.sum
    }

    /// `(upper bound in seconds, cumulative count)` per bucket, ending with
    /// `(+Inf, count)`: Prometheus's `_bucket{le=...}` series.
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        LAG_BUCKETS.iter().copied().chain([f64::INFINITY]).zip(self.counts.iter().scan(0, |total, n| {
            *total += n;
            Some(*total)
        }))
    }

    /// An upper bound of the `q` quantile (0..=1): the bound of the bucket
    /// it falls in (`None` without observations; `+Inf` past the last bound).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        self.cumulative().find(|&(_, total)| total >= rank).map(|(le, _)| le)
    }

    fn add(&mut self, other: &LagHistogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine += theirs;
        }
        self.count += other.count;
        self.sum += other.sum;
    }
}

/// How often the "recent" window moves on: it covers between one and two
/// of these.
pub const RECENT_WINDOW: Duration = Duration::from_secs(60);

/// Lag since start and over the recent past.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LagStats {
    /// Every transaction applied since start.
    pub total: LagHistogram,
    /// The current window and the one before it.
    current: LagHistogram,
    previous: LagHistogram,
    /// When the current window started, as an offset on the caller's clock.
    current_since: Duration,
}

impl LagStats {
    /// Records `n` transactions that each took `lag`; `now` is any
    /// monotonic clock reading (e.g. time since the process started).
    pub fn observe(&mut self, lag: Duration, n: u64, now: Duration) {
        self.roll(now);
        self.total.observe(lag, n);
        self.current.observe(lag, n);
    }

    /// Moves the window on when it is older than [`RECENT_WINDOW`].
    pub fn roll(&mut self, now: Duration) {
        let age = now.saturating_sub(self.current_since);
        if age >= RECENT_WINDOW * 2 {
            self.previous = LagHistogram::default();
            self.current = LagHistogram::default();
            self.current_since = now;
        } else if age >= RECENT_WINDOW {
            self.previous = std::mem::take(&mut self.current);
            self.current_since = now;
        }
    }

    /// Transactions applied in the last one to two [`RECENT_WINDOW`]s.
    pub fn recent(&self) -> LagHistogram {
        let mut recent = self.previous.clone();
        recent.add(&self.current);
        recent
    }
}

/// A monotonic clock for [`LagStats::observe`]: time since first use.
pub fn clock() -> Duration {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed()
}

/// WAL the remote keeps for the slot: from the slot's `restart_lsn` to the
/// remote's current position, in bytes (0 when the slot is ahead, as right
/// after creating it).
pub fn retained_wal(current: super::Lsn, restart: super::Lsn) -> u64 {
    restart.distance_to(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn buckets_are_cumulative_and_end_with_inf() {
        let mut h = LagHistogram::default();
        h.observe(MS / 2, 1); // <= 1 ms
        h.observe(MS, 1); // <= 1 ms (bounds are inclusive)
        h.observe(3 * MS, 2); // <= 5 ms
        h.observe(Duration::from_secs(1000), 1); // +Inf
        let buckets: Vec<(f64, u64)> = h.cumulative().collect();
        assert_eq!(buckets.len(), LAG_BUCKETS.len() + 1);
        assert_eq!(buckets[0], (0.001, 2));
        assert_eq!(buckets[1], (0.0025, 2));
        assert_eq!(buckets[2], (0.005, 4));
        assert_eq!(buckets[LAG_BUCKETS.len() - 1], (300.0, 4));
        assert_eq!(buckets[LAG_BUCKETS.len()], (f64::INFINITY, 5));
        assert_eq!(h.count(), 5);
        assert_eq!(h.sum(), MS / 2 + MS + 6 * MS + Duration::from_secs(1000));
    }

    #[test]
    fn quantiles_are_bucket_upper_bounds() {
        let mut h = LagHistogram::default();
        assert_eq!(h.quantile(0.5), None);
        h.observe(2 * MS, 98);
        h.observe(Duration::from_millis(200), 2);
        assert_eq!(h.quantile(0.5), Some(0.0025));
        assert_eq!(h.quantile(0.98), Some(0.0025));
        assert_eq!(h.quantile(0.99), Some(0.25));
        assert_eq!(h.quantile(1.0), Some(0.25));
        h.observe(Duration::from_secs(3600), 100);
        assert_eq!(h.quantile(0.99), Some(f64::INFINITY));
    }

    #[test]
    fn the_recent_window_forgets_old_transactions() {
        let mut s = LagStats::default();
        let at = |secs: u64| Duration::from_secs(secs);
        s.observe(Duration::from_secs(5), 10, at(0));
        s.observe(MS, 1, at(30));
        assert_eq!(s.recent().count(), 11);
        // A minute later the old window is still part of "recent"...
        s.observe(MS, 1, at(70));
        assert_eq!(s.recent().count(), 12);
        // ...two minutes later it is gone, the totals keep everything.
        s.observe(MS, 1, at(135));
        assert_eq!(s.recent().count(), 2);
        assert_eq!(s.recent().quantile(1.0), Some(0.001));
        assert_eq!(s.total.count(), 13);
        // Idle for long: nothing recent.
        s.roll(at(1000));
        assert_eq!(s.recent().count(), 0);
        assert_eq!(s.total.quantile(0.5), Some(5.0));
    }

    #[test]
    fn retained_wal_is_restart_lsn_to_current() {
        use super::super::Lsn;
        assert_eq!(retained_wal(Lsn(0x2000), Lsn(0x1800)), 0x800);
        assert_eq!(retained_wal(Lsn(0x1000), Lsn(0x1800)), 0);
    }
}
