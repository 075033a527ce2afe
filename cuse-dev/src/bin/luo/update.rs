//! `luo update` (a simulated live update) and `luo shutdown` (stop for
//! good, releasing everything).

use std::path::Path;
use std::process::ExitCode;

use luo_cuse_dev::control::{self, Request};

use crate::ask;

/// `luo update`.
pub fn update(state_dir: &Path) -> ExitCode {
    match ask(state_dir, &Request::Update) {
        Ok(r) if r.ok => {
            let incoming = r
                .sessions
                .iter()
                .filter(|s| s.direction == "incoming")
                .count();
            println!(
                "{}; {incoming} incoming sessions",
                r.message.unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Ok(r) => {
            eprintln!("luo: {}", r.error.unwrap_or_default());
            ExitCode::FAILURE
        }
        Err(code) => code,
    }
}

/// `luo shutdown`.
pub fn shutdown(state_dir: &Path) -> ExitCode {
    match ask(state_dir, &Request::Shutdown) {
        Ok(r) if r.ok => {
            // Wait until the daemon has let go of the device.
            let socket = control::socket_in(state_dir);
            for _ in 0..500 {
                if !socket.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            ExitCode::SUCCESS
        }
        Ok(r) => {
            eprintln!("luo: {}", r.error.unwrap_or_default());
            ExitCode::FAILURE
        }
        Err(code) => code,
    }
}
