//! Crash points for the crash tests: with `LUO_CRASH_AT=POINT:N` in its
//! environment the daemon kills itself with SIGKILL the N-th time it passes
//! `POINT`, so that a test can stop it at a moment a random kill rarely hits.
//!
//! Points: `received` (a trapped call received, nothing saved yet),
//! `decided` (its outcome saved, the reply not yet sent), `ioctl-received`
//! and `ioctl-saved` (the same for an ioctl on the FUSE mount or the CUSE
//! device, counted per batch of requests), `stashed` (a file
//! stashed in kmod-shim while preparing a kexec) and `restored` (a file
//! rebuilt from its stash after one).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static PLAN: OnceLock<Option<(String, u64)>> = OnceLock::new();
static PASSED: AtomicU64 = AtomicU64::new(0);

fn plan() -> &'static Option<(String, u64)> {
    PLAN.get_or_init(|| {
        let spec = std::env::var("LUO_CRASH_AT").ok()?;
        let (point, n) = spec.split_once(':')?;
        Some((point.to_owned(), n.parse().ok()?))
    })
}

/// Dies here if the plan says so.
pub fn pass(point: &str) {
    let Some((at, n)) = plan() else { return };
    if at == point && PASSED.fetch_add(1, Ordering::Relaxed) + 1 == *n {
        crate::sys::kill(crate::sys::getpid(), libc::SIGKILL);
    }
}
