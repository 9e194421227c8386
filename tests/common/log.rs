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
