//! Tools built on the library and used by nothing in it: `luo bench`,
//! `luo demo`, `luo oracle`, `luo shim-check` with the kexec rows of the
//! benchmark, and `luo vfio-check`.

pub mod bench;
pub mod demo;
pub mod fdstore;
pub mod oracle;
pub mod shim_check;
pub mod syscall_cost;
pub mod vfio_check;

use std::path::Path;

/// Runs `luo ARGS…` (this executable) under `luo run` on `device` and
/// reads the JSON it prints: the measuring side of the tools whose calls
/// must be trapped. `what` names the run in an error.
///
/// # Errors
/// The run cannot start, fails (`what` exited with …), or prints something
/// that does not parse.
pub(crate) fn under_luo_run<T: serde::de::DeserializeOwned>(
    device: &Path,
    args: &[String],
    what: &str,
) -> std::io::Result<T> {
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(&exe)
        .arg("run")
        .arg("--device")
        .arg(device)
        .arg("--")
        .arg(&exe)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "{what} exited with {}",
            out.status
        )));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
