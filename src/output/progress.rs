//! A one-line progress indicator on stderr for long stages; when stderr is
//! not a terminal, a plain line every few seconds instead of a redrawn bar.

use std::io::{IsTerminal, Write};
use std::time::Instant;

/// Progress of one stage.
pub struct Progress {
    label: String,
    total: usize,
    start: Instant,
    live: bool,
    last_line: std::cell::Cell<Instant>,
}

/// Seconds between plain progress lines when stderr is not a terminal.
const LOG_EVERY_S: f64 = 15.0;

impl Progress {
    /// Starts a stage of `total` steps.
    pub fn new(label: impl Into<String>, total: usize) -> Self {
        let p = Self {
            label: label.into(),
            total,
            start: Instant::now(),
            live: std::io::stderr().is_terminal(),
            last_line: std::cell::Cell::new(Instant::now()),
        };
        p.draw(0, "");
        p
    }

    fn draw(&self, done: usize, note: &str) {
        if !self.live {
            // Logs get a plain line now and then, not a redrawn bar.
            if self.last_line.get().elapsed().as_secs_f64() >= LOG_EVERY_S {
                self.last_line.set(Instant::now());
                eprintln!(
                    "{}: {done}/{} after {:.0} s {note}",
                    self.label,
                    self.total,
                    self.start.elapsed().as_secs_f64()
                );
            }
            return;
        }
        let width = 24;
        let filled = (done * width).checked_div(self.total).unwrap_or(width).min(width);
        let bar: String = "#".repeat(filled) + &"-".repeat(width - filled);
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{} [{bar}] {done}/{} {:.0}s {note}\x1b[K",
            self.label,
            self.total,
            self.start.elapsed().as_secs_f64()
        );
        let _ = err.flush();
    }

    /// Changes the number of steps (when it becomes known after starting).
    pub fn set_total(&mut self, total: usize) {
        self.total = total;
    }

    /// Marks `done` steps complete, with a short note.
    pub fn set(&self, done: usize, note: &str) {
        self.draw(done, note);
    }

    /// Ends the stage; prints its duration and returns it in seconds.
    pub fn finish(self, note: &str) -> f64 {
        let secs = self.start.elapsed().as_secs_f64();
        if self.live {
            eprint!("\r\x1b[K");
        }
        eprintln!("{}: {note} ({secs:.1} s)", self.label);
        secs
    }
}
