//! `luo kexec`: load the next kernel, have the daemon freeze and stash every
//! session through kmod-shim, and reboot into it; or call a prepared kexec
//! off (`--abort`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use luo_cuse_dev::control::{self, Request};
use luo_cuse_dev::log;
use luo_kexec_helper::kexec;

use crate::ask;

/// `luo kexec --abort`.
pub fn abort(socket: &Path) -> ExitCode {
    match ask(socket, &Request::KexecAbort) {
        Ok(r) => {
            println!("{}", r.message.unwrap_or_default());
            kexec::unload();
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// `luo kexec`.
pub fn kexec(
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    reuse_cmdline: bool,
    append: Option<String>,
    socket: &Path,
) -> ExitCode {
    let mut line = match (cmdline, reuse_cmdline) {
        (Some(c), _) => c,
        (None, true) => match kexec::current_cmdline() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("luo: cannot read /proc/cmdline: {e}");
                return ExitCode::FAILURE;
            }
        },
        (None, false) => String::new(),
    };
    if let Some(a) = append {
        line = format!("{line} {a}").trim().to_owned();
    }
    let target = kexec::Target {
        kernel,
        initrd,
        cmdline: line,
    };
    // Checked first: a bad image must not freeze anything.
    if let Err(e) = kexec::load(&target) {
        eprintln!(
            "luo: kexec aborted, nothing changed: {}",
            log::error_chain(&e)
        );
        return ExitCode::FAILURE;
    }
    println!(
        "loaded {}; freezing and stashing every session…",
        target.kernel.display()
    );
    let mut progress = |p: &str| println!("  {p}");
    let resp = match control::call_with_progress(
        socket,
        &Request::KexecPrepare,
        std::time::Duration::from_secs(120),
        &mut progress,
    ) {
        Ok(r) => r,
        Err(e) => {
            // Whatever the daemon got to is undone.
            let _ = control::call(socket, &Request::KexecAbort, None);
            kexec::unload();
            eprintln!(
                "luo: kexec aborted: no answer from the daemon at {}: {e}; nothing is lost: \
                 the next `luo daemon` withdraws whatever it had stashed and unfreezes everything",
                socket.display()
            );
            return ExitCode::FAILURE;
        }
    };
    if !resp.ok {
        kexec::unload();
        eprintln!("luo: {}", resp.error.unwrap_or_default());
        return ExitCode::FAILURE;
    }
    println!("{}", resp.message.unwrap_or_default());
    let e = kexec::reboot();
    eprintln!("luo: {}; calling the kexec off", log::error_chain(&e));
    let _ = ask(socket, &Request::KexecAbort);
    kexec::unload();
    ExitCode::FAILURE
}
