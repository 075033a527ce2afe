//! `luo status`: the running daemon's sessions and files.

use std::path::Path;
use std::process::ExitCode;

use luo_cuse_dev::control::Request;

use crate::ask;

pub fn status(socket: &Path, json: bool) -> ExitCode {
    let resp = match ask(socket, &Request::Status) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if !resp.ok {
        eprintln!("luo: {}", resp.error.unwrap_or_default());
        return ExitCode::FAILURE;
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&resp).expect("status serializes")
        );
        return ExitCode::SUCCESS;
    }
    let uring = resp.fuse_transport.as_deref() == Some("io_uring");
    println!(
        "device {}  epoch {}  sessions {}{}",
        resp.device.unwrap_or_default(),
        resp.epoch,
        resp.sessions.len(),
        if uring { "  (FUSE over io_uring)" } else { "" }
    );
    for s in &resp.sessions {
        let retrieved = if s.retrieved { " (retrieved)" } else { "" };
        println!(
            "  {} {}{}: {} files",
            s.direction,
            s.name,
            retrieved,
            s.files.len()
        );
        for f in &s.files {
            let waiting = f.waiting.as_deref().map(|w| format!(" ({w})"));
            let object = f.object.as_deref().map(|o| format!(" {o}"));
            println!(
                "    token {:#x} {}{}{}{}",
                f.token,
                f.handler,
                object.unwrap_or_default(),
                if f.retrieved { " retrieved" } else { "" },
                waiting.unwrap_or_default()
            );
        }
    }
    for f in resp.flbs.iter().filter(|f| f.outgoing + f.incoming > 0) {
        let retrieved = if f.retrieved { " retrieved" } else { "" };
        let detail = f.detail.as_deref().map(|d| format!(": {d}"));
        println!(
            "  flb {}: {} outgoing, {} incoming{retrieved}{}",
            f.compatible,
            f.outgoing,
            f.incoming,
            detail.unwrap_or_default()
        );
    }
    ExitCode::SUCCESS
}
