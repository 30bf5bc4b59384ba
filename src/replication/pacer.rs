//! When the apply loop does its bookkeeping beside the stream: recording
//! the server's position while idle, and syncing the data directory before
//! confirming.
//!
//! The walsender sends a keepalive every time it has sent everything and
//! waits while our confirmed position is behind its own, i.e. after nearly
//! every commit under a steady load. Acting on each one (a local
//! transaction storing the position, then a `syncfs` to confirm it) made a
//! second engine transaction per remote transaction and a `syncfs` storm
//! (~200 per second, measured: each one forces an ext4 journal commit, which
//! stalled the engine's writes, the publisher's fsyncs and everything else
//! on the disk). So a keepalive only schedules the bookkeeping, at most
//! [`IDLE_DELAY`] later, and a sync starts at most every [`SYNC_SPACING`].
//! Pure: the caller passes the time and acts on the answers.

use std::time::Duration;

use tokio::time::Instant;

/// A keepalive's bookkeeping runs this long after it (not pushed back by the
/// next ones): what a `wait_for_lsn` of a write outside the publication
/// waits at most beyond the keepalive that carries its position.
pub(super) const IDLE_DELAY: Duration = Duration::from_millis(100);

/// Background syncs of the data directory start at least this far apart:
/// under load the remote hears a confirmation about once a second (native
/// subscribers confirm what their WAL writer flushed, every 200 ms, or
/// every 10 s with `wal_receiver_status_interval`).
pub(super) const SYNC_SPACING: Duration = Duration::from_secs(1);

/// The schedule of the bookkeeping.
#[derive(Debug)]
pub(super) struct Pacer {
    /// The next sync may start at this time.
    next_sync: Instant,
    /// Bookkeeping is due at this time.
    due: Option<Instant>,
}

impl Pacer {
    pub(super) fn new(now: Instant) -> Pacer {
        Pacer { next_sync: now, due: None }
    }

    /// A keepalive without a reply request arrived.
    pub(super) fn keepalive(&mut self, now: Instant) {
        self.schedule(now + IDLE_DELAY);
    }

    /// When the bookkeeping is due, if it is.
    pub(super) fn due(&self) -> Option<Instant> {
        self.due
    }

    /// The bookkeeping is being done.
    pub(super) fn fired(&mut self) {
        self.due = None;
    }

    /// May a sync start now? If not, the bookkeeping is scheduled for when
    /// it may.
    pub(super) fn may_sync(&mut self, now: Instant) -> bool {
        if now >= self.next_sync {
            self.next_sync = now + SYNC_SPACING;
            true
        } else {
            self.schedule(self.next_sync);
            false
        }
    }

    /// The next sync may start at once (the last confirmation before
    /// stopping).
    pub(super) fn unpace(&mut self, now: Instant) {
        self.next_sync = now;
    }

    fn schedule(&mut self, at: Instant) {
        self.due = Some(self.due.map_or(at, |due| due.min(at)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalives_schedule_once_and_are_not_pushed_back() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        assert_eq!(p.due(), None);
        p.keepalive(t0);
        p.keepalive(t0 + Duration::from_millis(50));
        assert_eq!(p.due(), Some(t0 + IDLE_DELAY));
        p.fired();
        assert_eq!(p.due(), None);
        p.keepalive(t0 + Duration::from_millis(150));
        assert_eq!(p.due(), Some(t0 + Duration::from_millis(150) + IDLE_DELAY));
    }

    #[test]
    fn syncs_are_spaced_and_a_refused_one_is_scheduled() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        assert!(p.may_sync(t0));
        assert_eq!(p.due(), None);
        let soon = t0 + Duration::from_millis(10);
        assert!(!p.may_sync(soon));
        assert_eq!(p.due(), Some(t0 + SYNC_SPACING));
        // An earlier keepalive's bookkeeping keeps its earlier time.
        p.fired();
        p.keepalive(soon);
        assert!(!p.may_sync(soon));
        assert_eq!(p.due(), Some(soon + IDLE_DELAY));
        assert!(p.may_sync(t0 + SYNC_SPACING));
        assert!(!p.may_sync(t0 + SYNC_SPACING + Duration::from_millis(1)));
    }
}
