//! Tracing output captured for tests that search it: all of a test binary's,
//! at TRACE, by one global subscriber (so that spawned refresh tasks log into
//! it too), or a subscriber's own through a [`Capture`] writer.

use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use tracing::Level;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::FmtSpan;

/// Everything a subscriber's writers wrote.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    /// What was written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Installs, once for this test binary, a global TRACE subscriber writing
/// into a shared buffer (span events included), and returns the buffer.
pub fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .with_ansi(false)
            .with_span_events(FmtSpan::FULL)
            .with_writer(capture.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
        // A callsite first hit on another test's thread while the subscriber
        // was being installed may have cached "never" (no subscriber yet):
        // every callsite is asked again, now that the global one answers.
        tracing::callsite::rebuild_interest_cache();
        capture
    })
}

/// What was logged so far.
pub fn log_text() -> String {
    capture().text()
}

/// One event as [`scoped`] writes it.
#[derive(Clone, Debug)]
pub struct Event {
    /// When it was emitted, on tokio's clock (paused in `start_paused` tests),
    /// since the subscriber was made.
    pub at: std::time::Duration,
    pub level: Level,
    /// The rest of the line: target, message and fields.
    pub text: String,
}

/// Writes the time on tokio's clock since `start`, in milliseconds.
struct Since(tokio::time::Instant);

impl tracing_subscriber::fmt::time::FormatTime for Since {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        write!(w, "{}", self.0.elapsed().as_millis())
    }
}

/// A TRACE subscriber for this thread only, while the guard lives: on a
/// `current_thread` runtime (`#[tokio::test]`'s), the refresh tasks the test
/// spawns log into it too, and other tests' threads do not. Each line starts
/// with the time on tokio's clock, then the level; [`events`] reads them.
pub fn scoped() -> (Capture, tracing::subscriber::DefaultGuard) {
    // With a single dispatcher in the process, tracing asks only the
    // registering thread's default whether a callsite is of interest: a
    // callsite first hit on another test's thread would be cached as
    // "never", here too. A second one, kept for good, makes it ask them all.
    static OTHER: OnceLock<tracing::Dispatch> = OnceLock::new();
    OTHER.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(Level::TRACE)
        .with_ansi(false)
        .with_timer(Since(tokio::time::Instant::now()))
        .with_writer(capture.clone())
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    tracing::callsite::rebuild_interest_cache();
    (capture, guard)
}

/// The events a [`scoped`] subscriber wrote.
pub fn events(capture: &Capture) -> Vec<Event> {
    capture
        .text()
        .lines()
        .map(|line| {
            let mut parts = line.trim_start().splitn(2, ' ');
            let at = parts.next().and_then(|ms| ms.parse().ok());
            let rest = parts.next().unwrap_or_default().trim_start();
            let (level, text) = rest.split_once(' ').unwrap_or((rest, ""));
            Event {
                at: std::time::Duration::from_millis(at.unwrap_or_else(|| panic!("{line}"))),
                level: level.parse().unwrap_or_else(|_| panic!("{line}")),
                text: text.to_owned(),
            }
        })
        .collect()
}
