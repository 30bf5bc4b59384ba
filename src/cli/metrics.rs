//! Prometheus metrics for the daemons: each metric is declared once, with
//! how to read it from a snapshot taken at scrape time; the `prometheus`
//! crate keeps the registry (with the standard `process_*` metrics) and
//! writes the text format; hyper serves `GET /metrics`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus::{Counter, CounterVec, Gauge, GaugeVec, Histogram, HistogramOpts, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;

/// Labelled values: one `(label values, value)` per series.
pub type Series = Vec<(Vec<String>, f64)>;

type Refresh<S> = Box<dyn Fn(&S) + Send + Sync>;

/// A metric registry whose values are read from a snapshot `S` at each scrape.
pub struct Metrics<S> {
    registry: Registry,
    refresh: Vec<Refresh<S>>,
    /// One scrape at a time: refreshing resets labelled families.
    scrape: Mutex<()>,
}

impl<S> Metrics<S> {
    /// An empty registry with the process metrics (`process_cpu_seconds_total`,
    /// `process_resident_memory_bytes`, `process_open_fds`, ...).
    pub fn new() -> Metrics<S> {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        register(&registry, prometheus::process_collector::ProcessCollector::for_self());
        Metrics { registry, refresh: Vec::new(), scrape: Mutex::new(()) }
    }

    /// A gauge read from the snapshot.
    pub fn gauge(&mut self, name: &str, help: &str, read: impl Fn(&S) -> f64 + Send + Sync + 'static) -> &mut Self {
        let gauge = Gauge::with_opts(Opts::new(name, help)).expect("valid metric name");
        register(&self.registry, gauge.clone());
        self.refresh.push(Box::new(move |s| gauge.set(read(s))));
        self
    }

    /// A counter whose running total is read from the snapshot.
    pub fn counter(&mut self, name: &str, help: &str, read: impl Fn(&S) -> f64 + Send + Sync + 'static) -> &mut Self {
        let counter = Counter::with_opts(Opts::new(name, help)).expect("valid metric name");
        register(&self.registry, counter.clone());
        self.refresh.push(Box::new(move |s| {
            counter.reset();
            counter.inc_by(read(s));
        }));
        self
    }

    /// A labelled gauge family read from the snapshot.
    pub fn gauges(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        read: impl Fn(&S) -> Series + Send + Sync + 'static,
    ) -> &mut Self {
        let family = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric name");
        register(&self.registry, family.clone());
        self.refresh.push(Box::new(move |s| {
            family.reset();
            for (values, value) in read(s) {
                let values: Vec<&str> = values.iter().map(String::as_str).collect();
                family.with_label_values(&values).set(value);
            }
        }));
        self
    }

    /// A labelled counter family whose running totals are read from the snapshot.
    pub fn counters(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        read: impl Fn(&S) -> Series + Send + Sync + 'static,
    ) -> &mut Self {
        let family = CounterVec::new(Opts::new(name, help), labels).expect("valid metric name");
        register(&self.registry, family.clone());
        self.refresh.push(Box::new(move |s| {
            family.reset();
            for (values, value) in read(s) {
                let values: Vec<&str> = values.iter().map(String::as_str).collect();
                family.with_label_values(&values).inc_by(value);
            }
        }));
        self
    }

    /// A histogram observed by its owner as events happen (the handle is
    /// cheap to clone).
    #[allow(dead_code, reason = "for event metrics, e.g. a commit-to-local-commit histogram")]
    pub fn histogram(&mut self, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
        let histogram = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric");
        register(&self.registry, histogram.clone());
        histogram
    }

    /// A histogram whose cumulative buckets are read from the snapshot: the
    /// replication keeps its own (pure, unit-tested) histogram, and the
    /// crate's `Histogram` can only be observed event by event.
    pub fn histogram_from(
        &mut self,
        name: &str,
        help: &str,
        read: impl Fn(&S) -> HistogramData + Send + Sync + 'static,
    ) -> &mut Self {
        let collector = SnapshotHistogram {
            desc: prometheus::core::Desc::new(name.into(), help.into(), Vec::new(), Default::default())
                .expect("valid metric name"),
            value: Arc::new(Mutex::new(HistogramData::default())),
        };
        let value = collector.value.clone();
        register(&self.registry, collector);
        self.refresh.push(Box::new(move |s| *value.lock().unwrap_or_else(|e| e.into_inner()) = read(s)));
        self
    }

    /// The text exposition of every metric, read from `snapshot`.
    pub fn render(&self, snapshot: &S) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        for refresh in &self.refresh {
            refresh(snapshot);
        }
        TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_else(|e| format!("# {e}\n"))
    }
}

/// A histogram's state at one scrape.
#[derive(Debug, Clone, Default)]
pub struct HistogramData {
    /// `(upper bound, cumulative count)` of each finite bucket, in order
    /// (the `+Inf` bucket is `count`).
    pub buckets: Vec<(f64, u64)>,
    /// Sum of the observations, in the metric's unit.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

struct SnapshotHistogram {
    desc: prometheus::core::Desc,
    value: Arc<Mutex<HistogramData>>,
}

impl prometheus::core::Collector for SnapshotHistogram {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        use prometheus::proto;
        let data = self.value.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut histogram = proto::Histogram::default();
        histogram.set_sample_count(data.count);
        histogram.set_sample_sum(data.sum);
        histogram.set_bucket(
            data.buckets
                .iter()
                .map(|&(le, n)| {
                    let mut bucket = proto::Bucket::default();
                    bucket.set_upper_bound(le);
                    bucket.set_cumulative_count(n);
                    bucket
                })
                .collect(),
        );
        let mut metric = proto::Metric::default();
        metric.set_histogram(histogram);
        let mut family = proto::MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(proto::MetricType::HISTOGRAM);
        family.set_metric(vec![metric]);
        vec![family]
    }
}

/// Registers a collector; a name used twice is a programming error caught
/// by the tests at the first scrape.
fn register(registry: &Registry, collector: impl prometheus::core::Collector + 'static) {
    registry.register(Box::new(collector)).expect("metric names are unique");
}

/// Longest wait for a request's head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `render()` at `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve<F>(listener: TcpListener, render: F, shutdown: impl Future<Output = ()>)
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let render = Arc::new(render);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let render = render.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            let render = render.clone();
                            async move { Ok::<_, Infallible>(answer(&request, &*render)) }
                        });
                        let served = hyper::server::conn::http1::Builder::new()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(READ_TIMEOUT)
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                        if let Err(e) = served {
                            tracing::debug!(error = %e, "metrics request failed");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

fn answer<B>(request: &Request<B>, render: &(dyn Fn() -> String + Send + Sync)) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, prometheus::TEXT_FORMAT, render()),
        (&Method::GET, _) => (StatusCode::NOT_FOUND, "text/plain", "try /metrics\n".into()),
        _ => (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n".into()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_metrics_render_as_prometheus_text() {
        let mut m: Metrics<(f64, Vec<&'static str>)> = Metrics::new();
        m.gauge("up", "Whether it runs.", |s| s.0).counter("events_total", "Events.", |s| s.0 * 2.0).gauges(
            "phase",
            "Current phase.",
            &["phase"],
            |s| s.1.iter().map(|p| (vec![p.to_string()], 1.0)).collect(),
        );
        let latency = m.histogram("latency_seconds", "Latency.", vec![0.1, 1.0]);
        latency.observe(0.5);
        let first = m.render(&(1.0, vec!["a\"b"]));
        assert!(first.contains("phase{phase=\"a\\\"b\"} 1"), "{first}");
        let page = m.render(&(3.0, vec!["c"]));
        let parsed = prometheus_parse::Scrape::parse(page.lines().map(|l| Ok(l.to_owned()))).unwrap();
        let value = |name: &str| parsed.samples.iter().find(|s| s.metric == name).map(|s| s.value.clone());
        assert_eq!(value("up"), Some(prometheus_parse::Value::Gauge(3.0)), "{page}");
        assert_eq!(value("events_total"), Some(prometheus_parse::Value::Counter(6.0)), "{page}");
        let phases: Vec<_> = parsed.samples.iter().filter(|s| s.metric == "phase").collect();
        assert_eq!(phases.len(), 1, "a refresh replaces the label sets: {page}");
        assert_eq!(phases[0].labels.get("phase"), Some("c"));
        assert!(page.contains("latency_seconds_bucket{le=\"1\"} 1"), "{page}");
        #[cfg(target_os = "linux")]
        assert!(value("process_resident_memory_bytes").is_some(), "{page}");
    }
}
