//! A minimal stderr logger: `skiff: warning: ...`, level from `SKIFF_LOG`
//! (error, warn, info, debug, trace; default warn).

use std::io::Write;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            let level = match record.level() {
                Level::Error => "error",
                Level::Warn => "warning",
                Level::Info => "info",
                Level::Debug => "debug",
                Level::Trace => "trace",
            };
            // A closed or hung-up stderr must not abort skiff (eprintln! panics).
            let _ = writeln!(std::io::stderr(), "skiff: {level}: {}", record.args());
        }
    }

    fn flush(&self) {}
}

pub fn init() {
    let level = match std::env::var("SKIFF_LOG").as_deref() {
        Ok("error") => LevelFilter::Error,
        Ok("info") => LevelFilter::Info,
        Ok("debug") => LevelFilter::Debug,
        Ok("trace") => LevelFilter::Trace,
        Ok("off") => LevelFilter::Off,
        _ => LevelFilter::Warn,
    };
    if log::set_logger(&StderrLogger).is_ok() {
        log::set_max_level(level);
    }
}
