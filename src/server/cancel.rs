//! `CancelRequest`: which connection a (process id, secret key) pair names.
//!
//! PGlite runs a statement to completion inside one call into WebAssembly,
//! so a statement the engine has started cannot be interrupted. What can be
//! cancelled is a statement still *waiting* for the engine (behind another
//! client's transaction): it is withdrawn and never runs, and the client gets
//! `57014 canceling statement due to user request`, as from PostgreSQL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Live connections by the process id they were given at startup.
#[derive(Debug, Default)]
pub(crate) struct Cancels {
    connections: Mutex<HashMap<i32, (i32, Arc<Notify>)>>,
}

impl Cancels {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, (i32, Arc<Notify>)>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection; its waits on the returned `Notify` end when a
    /// matching cancel request arrives.
    pub fn register(&self, pid: i32, key: i32) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        self.lock().insert(pid, (key, notify.clone()));
        notify
    }

    pub fn unregister(&self, pid: i32) {
        self.lock().remove(&pid);
    }

    /// Signals the connection if the key matches. Only a wait in progress is
    /// interrupted: a cancel that arrives while nothing waits is a no-op, as
    /// in PostgreSQL (it does not cancel a later statement).
    pub fn cancel(&self, pid: i32, key: i32) -> bool {
        match self.lock().get(&pid) {
            Some((k, notify)) if *k == key => {
                notify.notify_waiters();
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_the_right_key() {
        let cancels = Cancels::default();
        cancels.register(7, 42);
        assert!(!cancels.cancel(7, 41));
        assert!(!cancels.cancel(8, 42));
        assert!(cancels.cancel(7, 42));
        cancels.unregister(7);
        assert!(!cancels.cancel(7, 42));
    }
}
