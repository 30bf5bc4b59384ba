//! The Prometheus text exposition format (version 0.0.4).

use std::fmt::Write;

/// The type of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (resets on restart).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Cumulative `_bucket{le=...}` samples, `_sum` and `_count`.
    Histogram,
}

/// Builds a metrics page, one family at a time.
#[derive(Debug, Default)]
pub struct MetricsText {
    out: String,
}

impl MetricsText {
    /// An empty page.
    pub fn new() -> MetricsText {
        MetricsText::default()
    }

    /// Starts a metric family with its help text and type.
    pub fn family(&mut self, name: &str, kind: MetricKind, help: &str) -> &mut Self {
        let kind = match kind {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self
    }

    /// Adds a sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let val = val.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                let _ = write!(self.out, "{key}=\"{val}\"");
            }
            self.out.push('}');
        }
        let _ = if value.is_nan() {
            writeln!(self.out, " NaN")
        } else if value.is_infinite() {
            writeln!(self.out, " {}Inf", if value > 0.0 { "+" } else { "-" })
        } else {
            writeln!(self.out, " {value}")
        };
        self
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: MetricKind, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// The finished page.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_labels_and_escapes() {
        let mut m = MetricsText::new();
        m.single("up", MetricKind::Gauge, "Whether it runs.", 1.0);
        m.family("rows_total", MetricKind::Counter, "Rows.\nCopied.")
            .sample("rows_total", &[("table", "public.\"t\"")], 42.0)
            .sample("rows_total", &[("table", "a\\b"), ("x", "y")], 0.5);
        assert_eq!(
            m.finish(),
            "# HELP up Whether it runs.\n# TYPE up gauge\nup 1\n\
             # HELP rows_total Rows.\\nCopied.\n# TYPE rows_total counter\n\
             rows_total{table=\"public.\\\"t\\\"\"} 42\nrows_total{table=\"a\\\\b\",x=\"y\"} 0.5\n"
        );
    }
}
