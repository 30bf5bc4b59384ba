//! Routing `NOTIFY` to the connections that `LISTEN`.
//!
//! The engine is one backend, so it listens on behalf of every client and
//! hands each notification to whichever client's batch happened to be
//! running (a `NotificationResponse` inside that batch's reply). The server
//! takes notifications out of every reply and delivers them to the
//! connections that listen on the channel (as PostgreSQL does: between
//! transactions, never inside another reply). The engine keeps listening on
//! every channel some connection listens on: a client's `UNLISTEN` is
//! followed by a `LISTEN` for the channels others still want.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::mpsc;

/// Who listens on which channel.
#[derive(Debug, Default)]
pub(crate) struct Hub {
    channels: Mutex<HashMap<String, HashMap<u32, mpsc::UnboundedSender<Bytes>>>>,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<u32, mpsc::UnboundedSender<Bytes>>>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn listen(&self, channel: &str, id: u32, tx: &mpsc::UnboundedSender<Bytes>) {
        self.lock().entry(channel.to_owned()).or_default().insert(id, tx.clone());
    }

    pub fn unlisten(&self, channel: &str, id: u32) {
        let mut channels = self.lock();
        if let Some(listeners) = channels.get_mut(channel) {
            listeners.remove(&id);
            if listeners.is_empty() {
                channels.remove(channel);
            }
        }
    }

    /// Forgets every channel of `id`; returns those nobody listens on any more.
    pub fn unlisten_all(&self, id: u32) -> Vec<String> {
        let mut channels = self.lock();
        let mut abandoned = Vec::new();
        channels.retain(|channel, listeners| {
            let was = listeners.remove(&id).is_some();
            let keep = !listeners.is_empty();
            if was && !keep {
                abandoned.push(channel.clone());
            }
            keep
        });
        abandoned
    }

    /// Channels somebody listens on.
    pub fn channels(&self) -> HashSet<String> {
        self.lock().keys().cloned().collect()
    }

    /// Sends a `NotificationResponse` to every listener of `channel` except
    /// `except`; returns whether `except` listens too.
    pub fn dispatch(&self, channel: &str, message: &[u8], except: u32) -> bool {
        let channels = self.lock();
        let Some(listeners) = channels.get(channel) else {
            return false;
        };
        let message = Bytes::copy_from_slice(message);
        for (id, tx) in listeners {
            if *id != except {
                let _ = tx.send(message.clone());
            }
        }
        listeners.contains_key(&except)
    }
}

/// The channel of a `NotificationResponse` (`A`, length, pid, channel, payload).
pub(crate) fn channel_of(message: &[u8]) -> Option<&str> {
    let body = message.get(9..)?;
    let end = body.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&body[..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivers_to_listeners_only() {
        let hub = Hub::default();
        let (a, mut a_rx) = mpsc::unbounded_channel();
        let (b, mut b_rx) = mpsc::unbounded_channel();
        hub.listen("orders", 1, &a);
        hub.listen("orders", 2, &b);
        hub.listen("other", 2, &b);
        let mut message = vec![b'A', 0, 0, 0, 19, 0, 0, 0, 7];
        message.extend_from_slice(b"orders\0hi\0");
        assert_eq!(channel_of(&message), Some("orders"));
        assert!(hub.dispatch("orders", &message, 2), "the sender listens too");
        assert_eq!(a_rx.try_recv().unwrap(), &message[..]);
        assert!(b_rx.try_recv().is_err(), "the sender gets it inline, not twice");
        hub.unlisten_all(1);
        assert!(!hub.dispatch("orders", &message, 3));
        assert_eq!(b_rx.try_recv().unwrap(), &message[..]);
        hub.unlisten("orders", 2);
        assert_eq!(hub.channels(), HashSet::from(["other".to_owned()]));
    }
}
