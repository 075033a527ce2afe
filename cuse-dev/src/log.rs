//! Minimal leveled logging to stderr for the daemon.

use std::fmt::Arguments;
use std::sync::atomic::{AtomicBool, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);

/// Turns debug messages on or off.
pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

fn emit(level: &str, args: Arguments<'_>) {
    eprintln!("luo[{}] {level}: {args}", std::process::id());
}

/// An informational message.
pub fn info(args: Arguments<'_>) {
    emit("info", args);
}

/// Something went wrong and the daemon cannot carry on.
pub fn error(args: Arguments<'_>) {
    emit("error", args);
}

/// Something went wrong but the daemon carries on.
pub fn warn(args: Arguments<'_>) {
    emit("warn", args);
}

/// Verbose tracing, off by default (`LUO_DEBUG=1`).
pub fn debug(args: Arguments<'_>) {
    if DEBUG.load(Ordering::Relaxed) {
        emit("debug", args);
    }
}

/// An error and its sources, `: `-separated, as every message names them.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}
