//! Log lines on stderr that do not tear progress bars: each line is written
//! while the bars are hidden (`MultiProgress::suspend`), then they are drawn
//! again below it. With no bars on screen this is a plain write to stderr.

use std::io::Write;
use std::sync::OnceLock;

use indicatif::MultiProgress;
use tracing_subscriber::fmt::MakeWriter;

/// The process's progress bars: one set, shared by the logger and the
/// commands that draw bars.
pub fn progress() -> &'static MultiProgress {
    static PROGRESS: OnceLock<MultiProgress> = OnceLock::new();
    PROGRESS.get_or_init(MultiProgress::new)
}

/// A `tracing` writer that buffers one event and writes it around the bars.
#[derive(Debug, Default, Clone, Copy)]
pub struct BarSafeStderr;

/// One event's bytes, written on drop.
pub struct Line(Vec<u8>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            progress().suspend(|| {
                let _ = std::io::stderr().lock().write_all(&self.0);
            });
        }
    }
}

impl<'a> MakeWriter<'a> for BarSafeStderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line(Vec::with_capacity(256))
    }
}
