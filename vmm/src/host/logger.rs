//! A minimal stderr logger: `skiff: warning: ...`, level from `SKIFF_LOG`
//! (error, warn, info, debug, trace; default warn).
//!
//! The rust-vmm crates that parse what a guest wrote log their own
//! complaints (virtio-queue: an error on every kick with a bad available
//! index, hundreds of thousands a second); those are limited here as
//! skiff's own guest-triggered lines are (`devices::ratelimit`).

use std::io::Write;

use devices::ratelimit::LogLimit;
use log::{Level, LevelFilter, Log, Metadata, Record};

/// Crates whose log lines a guest can trigger at will.
const GUEST_FACING: &[&str] = &["virtio_queue"];

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        static LIMIT: LogLimit = LogLimit::new();
        if self.enabled(record.metadata()) {
            let mut held = 0;
            if GUEST_FACING.iter().any(|c| record.target().starts_with(c)) {
                match LIMIT.admit() {
                    Some(n) => held = n,
                    None => return,
                }
            }
            let level = match record.level() {
                Level::Error => "error",
                Level::Warn => "warning",
                Level::Info => "info",
                Level::Debug => "debug",
                Level::Trace => "trace",
            };
            // A closed or hung-up stderr must not abort skiff (eprintln! panics).
            let _ = if held > 0 {
                writeln!(
                    std::io::stderr(),
                    "skiff: {level}: {} ({held} more from {} held back)",
                    record.args(),
                    record.target()
                )
            } else {
                writeln!(std::io::stderr(), "skiff: {level}: {}", record.args())
            };
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
