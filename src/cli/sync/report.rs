//! What the daemon tells its operator: progress bars (or log lines) during
//! the initial copy, a status line while streaming, the status file, and the
//! Prometheus endpoint.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use pglite_cache::replication::{Phase, ReplicationConfig, Status, TableState};
use tokio::sync::watch;

use super::Plan;
use super::preflight::Remote;
use crate::cli::status_file::{self, StatusReport, phase_name};

/// How often the reporter and the exit watch look at the replication phase.
pub const PHASE_POLL: Duration = Duration::from_millis(50);

/// Running totals the status does not carry (applied transactions and
/// changes are in the status: counting them here from the change feed made
/// the apply describe every change for nobody).
#[derive(Debug, Default)]
pub struct Counters {
    /// Times the connection was lost and retried.
    pub reconnects: AtomicU64,
    /// Halts since start, by kind of error (needs operator or fatal: the
    /// status does not say which, so one counter).
    pub halts: AtomicU64,
    /// The engine's maintenance (VACUUM, ANALYZE), when it runs.
    pub maintenance: Option<Arc<pglite_cache::maintenance::Stats>>,
}

impl Counters {
    /// Fresh counters.
    pub fn start(maintenance: Option<Arc<pglite_cache::maintenance::Stats>>) -> Arc<Counters> {
        Arc::new(Counters { maintenance, ..Counters::default() })
    }
}

/// The reporting task's state.
pub struct Reporter {
    data: std::path::PathBuf,
    config: ReplicationConfig,
    estimates: HashMap<String, u64>,
    counters: Arc<Counters>,
    metrics: Option<std::net::SocketAddr>,
    status_interval: Duration,
}

impl Reporter {
    pub(super) fn new(plan: &Plan, remote: &Remote, counters: Arc<Counters>) -> Reporter {
        Reporter {
            data: plan.data.clone(),
            config: plan.config.clone(),
            estimates: remote.estimates.clone(),
            counters,
            metrics: plan.metrics,
            status_interval: plan.status_interval,
        }
    }

    /// Reports until `stop` turns true.
    pub async fn run(self, mut status: watch::Receiver<Status>, mut stop: watch::Receiver<bool>) {
        let this = Arc::new(self);
        if let Some(addr) = this.metrics {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => {
                    eprintln!("metrics at http://{addr}/metrics");
                    let (page, status, counters) = (super::metrics::declare(), status.clone(), this.counters.clone());
                    let render = move || {
                        page.render(&super::metrics::Snapshot {
                            status: status.borrow().clone(),
                            counters: counters.clone(),
                        })
                    };
                    let mut stopped = stop.clone();
                    tokio::spawn(crate::cli::metrics::serve(listener, render, async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    }));
                }
                Err(e) => tracing::error!(%addr, error = %e, "cannot serve metrics"),
            }
        }
        let mut bars = Bars::new(std::io::stderr().is_terminal());
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut phase_tick = tokio::time::interval(PHASE_POLL);
        let mut last_line = Instant::now();
        let mut last_txns = 0;
        let mut last_phase = String::new();
        loop {
            let ticked = tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = tick.tick() => true,
                // The phase is looked at now and then, not on every change:
                // the status changes with every applied transaction, and a
                // wake-up per transaction cost measurable CPU.
                _ = phase_tick.tick() => if status.has_changed().is_err() { break } else { false },
            };
            // Between ticks only a phase change is reported at once: under
            // load the status changes with every applied transaction, and
            // rewriting the status file each time cost more CPU than the
            // apply itself.
            if !ticked && phase_name(&status.borrow().phase).0 == last_phase {
                continue;
            }
            let s = status.borrow_and_update().clone();
            let (phase, error) = phase_name(&s.phase);
            if phase != last_phase {
                bars.finish();
                if phase == "reconnecting" {
                    this.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                if phase == "halted" {
                    this.counters.halts.fetch_add(1, Ordering::Relaxed);
                }
                match &error {
                    Some(e) => tracing::warn!(phase, error = %e, "replication phase changed"),
                    None => tracing::info!(phase, "replication phase changed"),
                }
                last_phase = phase.to_string();
            }
            // Written on a blocking thread: a write and rename on a busy
            // disk took up to 270 ms (measured), during which the runtime
            // thread, which also runs the apply and the wire server, stood
            // still.
            let (data, report) = (this.data.clone(), StatusReport::from_status(&s, &this.config, true));
            let _ = tokio::task::spawn_blocking(move || status_file::write(&data, &report)).await;
            if s.phase == Phase::Copying {
                bars.show(&s, &this.estimates);
            } else if s.phase == Phase::Streaming && last_line.elapsed() >= this.status_interval {
                let txns = s.applied_transactions;
                let rate = (txns - last_txns) as f64 / last_line.elapsed().as_secs_f64();
                tracing::info!(
                    "streaming: applied {} ({}), lag {} B / {:.1} ms, {:.1} txn/s, {} reconnects",
                    s.applied_lsn,
                    s.applied_commit_time.map(status_file::rfc3339).unwrap_or_else(|| "no commit yet".into()),
                    s.lag_bytes,
                    s.lag.as_secs_f64() * 1e3,
                    rate,
                    this.counters.reconnects.load(Ordering::Relaxed),
                );
                last_line = Instant::now();
                last_txns = txns;
            }
        }
        bars.finish();
    }
}

/// Per-table progress during the initial copy: bars on a terminal, log
/// lines every few seconds otherwise.
struct Bars {
    terminal: bool,
    multi: &'static MultiProgress,
    /// Each table's bar and when its copy was first seen.
    bars: HashMap<String, (ProgressBar, Instant)>,
    last_log: Option<Instant>,
}

impl Bars {
    fn new(terminal: bool) -> Bars {
        Bars { terminal, multi: crate::cli::logs::progress(), bars: HashMap::new(), last_log: None }
    }

    fn show(&mut self, s: &Status, estimates: &HashMap<String, u64>) {
        if !self.terminal {
            if self.last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                for t in &s.tables {
                    let name = format!("{}.{}", t.schema, t.name);
                    let of = estimates.get(&name).map(|n| format!(" of ~{n}")).unwrap_or_default();
                    tracing::info!(
                        "copying {name}: {:?}, {} rows{of}, {} bytes",
                        t.state,
                        t.rows_copied,
                        t.bytes_copied
                    );
                }
                self.last_log = Some(Instant::now());
            }
            return;
        }
        // Rates are ours (rows since the table's copy was first seen):
        // indicatif's `{per_sec}` prints unrounded fractions for plain counts.
        let style = ProgressStyle::with_template(
            "{prefix:>28} {bar:30} {human_pos:>11}/{human_len:11} rows {msg:>14} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        for t in &s.tables {
            let name = format!("{}.{}", t.schema, t.name);
            if self.bars.is_empty() {
                self.multi.set_draw_target(ProgressDrawTarget::stderr());
            }
            let (bar, started) = self.bars.entry(name.clone()).or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new(estimates.get(&name).copied().unwrap_or(0)));
                bar.set_style(style.clone());
                bar.set_prefix(name.clone());
                (bar, Instant::now())
            });
            if bar.is_finished() {
                continue;
            }
            if bar.length().is_some_and(|len| t.rows_copied > len) {
                bar.set_length(t.rows_copied);
            }
            bar.set_position(t.rows_copied);
            let rate = t.rows_copied as f64 / started.elapsed().as_secs_f64().max(0.001);
            bar.set_message(format!("{rate:.0} rows/s"));
            if t.state == TableState::Ready {
                bar.set_length(t.rows_copied);
                bar.finish();
            }
        }
    }

    /// Leaves the finished bars on screen and stops redrawing them, so later
    /// log lines go below them.
    fn finish(&mut self) {
        if self.bars.is_empty() {
            return;
        }
        for (bar, _) in self.bars.values() {
            if !bar.is_finished() {
                bar.finish();
            }
        }
        self.multi.set_draw_target(ProgressDrawTarget::hidden());
        self.bars.clear();
    }
}
