//! A progress bar on stderr, drawn only when stderr is a terminal.
use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct Progress {
    label: String,
    total: u64,
    done: u64,
    enabled: bool,
    started: Instant,
    last_draw: Option<Instant>,
}

impl Progress {
    pub fn new(label: &str, total: u64) -> Self {
        Progress { label: label.to_string(), total, done: 0, enabled: std::io::stderr().is_terminal(), started: Instant::now(), last_draw: None }
    }

    pub fn advance(&mut self, n: u64) {
        self.done = (self.done + n).min(self.total);
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if self.last_draw.is_some_and(|t| now.duration_since(t).as_millis() < 100) && self.done < self.total {
            return;
        }
        self.last_draw = Some(now);
        let frac = if self.total == 0 { 1.0 } else { self.done as f64 / self.total as f64 };
        let width = 30;
        let filled = (frac * width as f64) as usize;
        let secs = self.started.elapsed().as_secs_f64();
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{} [{}{}] {:5.1}% {}/{} {:.1}s",
            self.label,
            "#".repeat(filled),
            " ".repeat(width - filled),
            frac * 100.0,
            self.done,
            self.total,
            secs
        );
        let _ = err.flush();
    }

    pub fn finish(&mut self) {
        if self.enabled && self.last_draw.is_some() {
            let _ = writeln!(std::io::stderr());
        }
    }
}
