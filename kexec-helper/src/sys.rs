//! The one syscall of this crate outside `kexec.rs` and `shim.rs`: signals.

/// Sends `signal` to `pid`; whether it was delivered.
pub(crate) fn kill(pid: i32, signal: i32) -> bool {
    // SAFETY: kill takes no pointers.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// This process's pid.
pub(crate) fn getpid() -> i32 {
    std::process::id() as i32
}
