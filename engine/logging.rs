//! A minimal stderr logger for the `log` facade (level from `--log-level` or `ENGINE_LOG`).
use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &Record) {
        if self.enabled(r.metadata()) {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            eprintln!("[{}.{:03} {:5} {}] {}", t.as_secs(), t.subsec_millis(), r.level(), r.target(), r.args());
        }
    }
    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger; `level` is one of error, warn, info, debug, trace.
pub fn init(level: &str) {
    let filter = level.parse::<LevelFilter>().unwrap_or(LevelFilter::Info);
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(filter);
}
