//! How the stream loop waits out the commit delay
//! ([`super::ReplicationConfig::commit_delay`]): received transactions wait
//! for more to join the same local commit. Two things make that wait cheap
//! and exact:
//! - **The socket stays quiet.** With `synchronous_commit = on` on the
//!   remote, each of its transactions arrives alone, and each arrival woke
//!   the thread to read it: ~10 wake-ups per local commit, ~20 µs of CPU per
//!   applied transaction (BENCHMARKS.md, round 7). While the wait lasts, the
//!   socket's receive low-water mark (`SO_RCVLOWAT`) is raised, so the
//!   kernel queues those messages without waking anyone; they are read at
//!   once when the wait ends, or earlier if [`HOLD_BYTES`] pile up.
//! - **The timer is exact.** tokio's timers round up to whole milliseconds,
//!   which would stretch a 250 µs delay to 1-2 ms; this one is a `timerfd`.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use tokio::time::Instant;

use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// While the wait lasts, this many bytes waiting on the socket wake the
/// thread anyway: a merged commit is cut at about this size. (It is also
/// cut at 128 row changes, which may come in fewer bytes: such a batch is
/// read and committed when the delay ends, at most one delay late.) The
/// kernel caps the mark at half the receive buffer.
pub(crate) const HOLD_BYTES: i32 = super::apply::MAX_MERGED_BYTES as i32;

/// A one-shot timer with microsecond precision, pollable by tokio.
#[derive(Debug)]
pub(crate) struct CommitTimer {
    fd: AsyncFd<OwnedFd>,
    at: Option<Instant>,
}

impl CommitTimer {
    #[allow(unsafe_code)]
    pub(crate) fn new() -> io::Result<CommitTimer> {
        let fd =
            rustix::time::timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC)?;
        // SAFETY: the `OwnedFd` is moved into the `AsyncFd` and closed only
        // when it drops, so the descriptor stays open and the same for the
        // registration's lifetime.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok(CommitTimer { fd, at: None })
    }

    /// Rings at `at`, or never. Only a change of time costs a system call.
    pub(crate) fn set(&mut self, at: Option<Instant>) -> io::Result<()> {
        if at == self.at {
            return Ok(());
        }
        self.at = at;
        // A zero value disarms; a time already past rings at once (1 ns).
        let value =
            at.map_or(Duration::ZERO, |at| at.saturating_duration_since(Instant::now()).max(Duration::from_nanos(1)));
        let spec = Itimerspec {
            it_interval: Timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: Timespec { tv_sec: value.as_secs() as _, tv_nsec: value.subsec_nanos() as _ },
        };
        // Setting the timer also forgets expirations not read yet.
        rustix::time::timerfd_settime(self.fd.get_ref(), TimerfdTimerFlags::empty(), &spec)?;
        Ok(())
    }

    pub(crate) fn armed(&self) -> bool {
        self.at.is_some()
    }

    /// Resolves when the time set has come (poll only while armed); the
    /// timer is then unset.
    pub(crate) async fn rings(&mut self) -> io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            let mut count = [0u8; 8];
            match rustix::io::read(self.fd.get_ref(), &mut count) {
                Ok(_) => {
                    self.at = None;
                    return Ok(());
                }
                // A readiness left from an expiry that `set` discarded.
                Err(rustix::io::Errno::AGAIN) => ready.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Sets the socket's receive low-water mark: readiness (and the wake-up of
/// whoever waits for it) comes only once `bytes` are queued, or when the
/// mark is lowered again (Linux signals at once then, if data waits). TCP
/// only; on other sockets Linux ignores it for readiness.
///
/// Neither socket2, rustix nor nix (the socket crates we build with) offers
/// `SO_RCVLOWAT`, hence the one `setsockopt` of our own.
#[allow(unsafe_code)]
pub(crate) fn set_receive_low_water(socket: BorrowedFd<'_>, bytes: i32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value: libc::c_int = bytes.max(1);
    // SAFETY: `socket` is a live descriptor for the duration of the call
    // (borrowed), and the option value is a valid `c_int` whose size is
    // passed with it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[tokio::test]
    async fn rings_at_the_time_set_with_sub_millisecond_precision() {
        let mut timer = CommitTimer::new().unwrap();
        assert!(!timer.armed());
        let start = Instant::now();
        timer.set(Some(start + Duration::from_micros(300))).unwrap();
        assert!(timer.armed());
        timer.rings().await.unwrap();
        let took = start.elapsed();
        assert!(took >= Duration::from_micros(300), "rang early: {took:?}");
        assert!(!timer.armed());
        // Re-armed, then moved later: the first time must not ring.
        let start = Instant::now();
        timer.set(Some(start + Duration::from_micros(100))).unwrap();
        timer.set(Some(start + Duration::from_millis(20))).unwrap();
        timer.rings().await.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(20), "rang at the discarded time");
    }

    /// Whether the socket polls readable within `ms` milliseconds.
    fn readable(socket: &std::net::TcpStream, ms: i64) -> bool {
        use rustix::event::{PollFd, PollFlags, poll};
        let mut fds = [PollFd::new(socket, PollFlags::IN)];
        let timeout = rustix::event::Timespec { tv_sec: 0, tv_nsec: ms * 1_000_000 };
        poll(&mut fds, Some(&timeout)).unwrap() == 1
    }

    #[test]
    fn a_raised_low_water_mark_holds_readiness_until_lowered() {
        use std::io::{Read, Write};
        // Linux signals readiness regardless of the mark while the receive
        // window is under one segment; loopback's 64 KiB segments make that
        // so on a fresh connection, so the segments are made small.
        let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        listener.set_tcp_mss(1000).unwrap();
        listener.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
        listener.listen(1).unwrap();
        let address = listener.local_addr().unwrap().as_socket().unwrap();
        let mut writer = std::net::TcpStream::connect(address).unwrap();
        let reader: std::net::TcpStream = listener.accept().unwrap().0.into();
        set_receive_low_water(reader.as_fd(), 1024).unwrap();
        writer.write_all(b"small").unwrap();
        assert!(!readable(&reader, 100), "5 bytes made a socket with a 1024-byte mark readable");
        set_receive_low_water(reader.as_fd(), 1).unwrap();
        assert!(readable(&reader, 0), "lowering the mark did not signal the data waiting");
        let mut buf = [0u8; 16];
        assert_eq!((&reader).read(&mut buf).unwrap(), 5);
    }
}
