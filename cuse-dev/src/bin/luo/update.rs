//! `luo update` (a simulated live update) and `luo shutdown` (stop for
//! good, releasing everything).

use std::path::Path;
use std::process::ExitCode;

use luo_cuse_dev::control::Request;

use crate::ask;

/// `luo update`.
pub fn update(socket: &Path) -> ExitCode {
    match ask(socket, &Request::Update) {
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

/// `luo shutdown`: says what was released once the daemon has let go of
/// the device.
pub fn shutdown(socket: &Path) -> ExitCode {
    match ask(socket, &Request::Shutdown) {
        Ok(r) if r.ok => {
            for _ in 0..500 {
                if !socket.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            println!("{}", r.message.unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(r) => {
            eprintln!("luo: {}", r.error.unwrap_or_default());
            ExitCode::FAILURE
        }
        Err(code) => code,
    }
}
