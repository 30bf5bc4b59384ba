//! The receive deadline of the replication stream, kept as PostgreSQL's
//! walreceiver keeps `wal_receiver_timeout`: a remote that stays silent for
//! half of it is asked for a reply; one silent for all of it is given up
//! (a half-open connection, a stopped walsender).

use std::time::Duration;

use tokio::time::Instant;

/// What to do when the receive deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DeadlineAction {
    /// Half the timeout without a message: ask the remote for a reply.
    Ping,
    /// The whole timeout: the connection is dead.
    Reconnect,
}

/// The receive deadline, as PostgreSQL's walreceiver keeps it: after half
/// of `timeout` in silence, ask for a reply; after all of it, give up.
#[derive(Debug)]
pub(super) struct ReceiveDeadline {
    timeout: Duration,
    last: Instant,
    pinged: bool,
}

impl ReceiveDeadline {
    pub(super) fn new(timeout: Duration) -> ReceiveDeadline {
        ReceiveDeadline { timeout, last: Instant::now(), pinged: false }
    }

    pub(super) fn received(&mut self) {
        self.received_at(Instant::now());
    }

    fn received_at(&mut self, now: Instant) {
        self.last = now;
        self.pinged = false;
    }

    pub(super) fn next(&self) -> Instant {
        self.last + if self.pinged { self.timeout } else { self.timeout / 2 }
    }

    pub(super) fn expired(&mut self) -> DeadlineAction {
        if self.pinged {
            DeadlineAction::Reconnect
        } else {
            self.pinged = true;
            DeadlineAction::Ping
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receive_deadline_pings_then_gives_up() {
        let mut d = ReceiveDeadline::new(Duration::from_secs(60));
        let start = d.last;
        assert_eq!(d.next(), start + Duration::from_secs(30));
        assert_eq!(d.expired(), DeadlineAction::Ping);
        assert_eq!(d.next(), start + Duration::from_secs(60));
        d.received_at(start + Duration::from_secs(40)); // the reply
        assert_eq!(d.next(), start + Duration::from_secs(70));
        assert_eq!(d.expired(), DeadlineAction::Ping);
        assert_eq!(d.expired(), DeadlineAction::Reconnect);
    }
}
