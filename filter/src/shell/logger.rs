//! The `log` facade over `proxy_log`, so that the engine logs the same way
//! natively (where tests may install any logger) and in Envoy, whose own
//! log level then filters what it prints.

use super::hostcalls::{self, LOG_DEBUG, LOG_ERROR, LOG_INFO, LOG_TRACE, LOG_WARN};
use log::{Level, LevelFilter, Log, Metadata, Record};
use std::fmt::Write as _;

/// A log line longer than this is cut (at a character boundary): a line is
/// built from config and host names the operator chose, but a bound keeps a
/// hostile or mistaken one from costing more than a line.
const MAX_LINE_BYTES: usize = 4_096;

struct ProxyLogger;

static LOGGER: ProxyLogger = ProxyLogger;

/// Installs the logger once per VM. The engine logs only state changes and
/// refusals (at most a few lines a second), so everything from `Info` up
/// reaches Envoy, which applies its own `wasm` log level.
pub fn install() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(LevelFilter::Info);
    }
}

impl Log for ProxyLogger {
    fn enabled(&self, _metadata: &Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &Record<'_>) {
        let level = match record.level() {
            Level::Error => LOG_ERROR,
            Level::Warn => LOG_WARN,
            Level::Info => LOG_INFO,
            Level::Debug => LOG_DEBUG,
            Level::Trace => LOG_TRACE,
        };
        let mut line = String::new();
        let _ = write!(line, "{}", record.args());
        if line.len() > MAX_LINE_BYTES {
            let mut end = MAX_LINE_BYTES;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }
        hostcalls::log(level, &line);
    }

    fn flush(&self) {}
}
