//! `luo fdstore`: what systemd 262 does with a service's fd store across a
//! live update, for running systemd's own LUO client, `test-luo`, unmodified
//! on a machine where systemd is not PID 1.
//!
//! * `hold --unit U -- CMD…` plays PID 1 while the service runs: CMD gets a
//!   `NOTIFY_SOCKET`, and every `FDSTORE=1` (with `FDNAME=`),
//!   `FDSTOREREMOVE=1` and `BARRIER=1` it sends is served as PID 1 serves
//!   it. When CMD has exited it plays PID 1's serialization and
//!   `systemd-shutdown` right before the kexec (`luo_preserve_fd_stores`):
//!   a stored LUO session whose name infringes systemd's namespace is
//!   skipped, session "systemd" is created, every stored fd that is not a
//!   session is preserved in it at tokens 1, 2, …, every stored session is
//!   named, and the mapping — `{"version": 1, "state": {"kexecsCount": K},
//!   "units": {"U":
//!   {"fdstore": [{"type": "fd", "name": N, "token": T}, {"type":
//!   "luo_session", "name": N, "sessionName": S}]}}}` — is preserved as a
//!   sealed memfd at token 0. Everything is then held by a child until the
//!   update (`luo update` ends it; a kexec ends everything). K is PID 1's
//!   count of kexecs so far: `$LUO_KEXECS_COUNT`, else 0.
//! * `restore --unit U -- CMD…` plays PID 1 after the update
//!   (`manager_luo_restore_fd_stores`): it retrieves session "systemd", its
//!   mapping and every fd in it, retrieves each named session, finishes
//!   "systemd", and executes CMD with U's fds passed as systemd passes a fd
//!   store (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`, fds from 3), and
//!   with `LUO_KEXECS_COUNT` set to the mapping's count plus one, as PID 1
//!   sets its `KexecsCount` (so a `hold` under it carries the count on).
//!
//! Both must run under `luo run` on our device (they create and retrieve
//! sessions); so does CMD, which `hold` starts as its child.

use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::client::ioctl as lu;
use crate::sys;

/// systemd's own session (`LUO_SESSION_NAME`).
pub const SESSION: &str = "systemd";
/// The token of the mapping memfd (`LUO_MAPPING_INDEX`).
const MAPPING_TOKEN: u64 = 0;
/// The mapping's version (`LUO_PROTOCOL_VERSION`).
const MAPPING_VERSION: u64 = 1;
/// Where PID 1's kexec count is kept for and handed to the commands run.
pub const KEXECS_COUNT_ENV: &str = "LUO_KEXECS_COUNT";
/// `ANON_INODE_FS_MAGIC`: what a session fd's `fstatfs` reports.
const ANON_INODE_FS_MAGIC: i64 = 0x0904_1934;

/// One entry of a service's fd store.
struct Stored {
    /// Its `FDNAME=`.
    name: String,
    fd: OwnedFd,
    /// The session's name, for a LUO session fd.
    session: Option<String>,
}

/// The name of the LUO session `fd` is, or None for any other file: as
/// systemd's `fd_get_luo_session_name` tells them apart, by the anon-inode
/// filesystem, then `LIVEUPDATE_SESSION_GET_NAME`.
fn luo_session_name(fd: BorrowedFd<'_>) -> Option<String> {
    // SAFETY: all-zero is a valid statfs to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and an out pointer of the right type.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } != 0 || st.f_type != ANON_INODE_FS_MAGIC {
        return None;
    }
    lu::get_name(fd).ok()
}

/// A service's fd store, as PID 1 keeps it.
#[derive(Default)]
struct FdStore {
    unit: String,
    entries: Vec<Stored>,
}

impl FdStore {
    /// Serves one notification (`KEY=VALUE` lines and the fds sent with it).
    fn on_message(&mut self, text: &str, fds: Vec<OwnedFd>) {
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        };
        if field("BARRIER") == Some("1") {
            // The barrier is answered by closing the fd sent with it.
            drop(fds);
            return;
        }
        let name = field("FDNAME").unwrap_or("stored").to_owned();
        if field("FDSTOREREMOVE") == Some("1") {
            self.entries.retain(|e| e.name != name);
            return;
        }
        if field("FDSTORE") != Some("1") {
            return;
        }
        for fd in fds {
            self.entries.push(Stored {
                name: name.clone(),
                session: luo_session_name(fd.as_fd()),
                fd,
            });
        }
    }

    /// `systemd-shutdown`'s step before the kexec: every stored fd preserved
    /// in session "systemd" or named, and the mapping at token 0. Returns
    /// what must stay open until the update.
    fn preserve(self, device: &Path) -> Result<Vec<OwnedFd>, String> {
        let unit = self.unit;
        let entries: Vec<Stored> = self
            .entries
            .into_iter()
            .filter(|e| match &e.session {
                Some(name) if name.starts_with(SESSION) => {
                    eprintln!(
                        "luo fdstore: skipping fd '{}' of unit '{unit}', as the session name \
                         '{name}' infringes systemd's namespace",
                        e.name
                    );
                    false
                }
                _ => true,
            })
            .collect();
        if entries.is_empty() {
            println!("luo fdstore: {unit}: nothing to preserve");
            return Ok(Vec::new());
        }
        let dev = open_device(device)?;
        let session = lu::create_session(dev.as_fd(), SESSION)
            .map_err(|e| format!("cannot create LUO session '{SESSION}': {e}"))?;
        let mut fdstore = Vec::new();
        let mut token = MAPPING_TOKEN + 1;
        let mut keep = Vec::new();
        for e in entries {
            match e.session {
                Some(session_name) => fdstore.push(json!({
                    "type": "luo_session", "name": e.name, "sessionName": session_name,
                })),
                None => {
                    lu::preserve_fd(session.as_fd(), e.fd.as_fd(), token).map_err(|err| {
                        format!("cannot preserve fd '{}' at token {token}: {err}", e.name)
                    })?;
                    fdstore.push(json!({"type": "fd", "name": e.name, "token": token}));
                    token += 1;
                }
            }
            keep.push(e.fd);
        }
        let text = json!({
            "version": MAPPING_VERSION,
            "state": { "kexecsCount": kexecs_count()? },
            "units": { unit.as_str(): { "fdstore": fdstore } },
        })
        .to_string();
        let memfd = sealed_memfd("luo-mapping", text.as_bytes())?;
        lu::preserve_fd(session.as_fd(), memfd.as_fd(), MAPPING_TOKEN)
            .map_err(|e| format!("cannot preserve the mapping memfd: {e}"))?;
        println!(
            "luo fdstore: {unit}: {} fd(s) preserved in LUO session '{SESSION}', {} session(s) \
             named; mapping {text}",
            token - 1,
            keep.len() as u64 + 1 - token,
        );
        keep.extend([session, memfd]);
        Ok(keep)
    }
}

fn open_device(device: &Path) -> Result<OwnedFd, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map(OwnedFd::from)
        .map_err(|e| format!("cannot open {}: {e}", device.display()))
}

/// A memfd holding `bytes`, sealed against every change
/// (`memfd_new_and_seal_string`).
fn sealed_memfd(name: &str, bytes: &[u8]) -> Result<OwnedFd, String> {
    let fd = luo_handlers::mem::create(name, luo_handlers::Backing::Shmem, 0)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)
        .map_err(|e| format!("cannot write the {name} memfd: {e}"))?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: F_ADD_SEALS takes an int.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(format!(
            "cannot seal the {name} memfd: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(file.into())
}

/// `luo fdstore hold`: runs `argv` as unit `unit` with an fd store, then
/// preserves the store and leaves it held by a child until the update.
///
/// # Errors
/// A sentence: the command failed, or a step of the preserve did.
pub fn hold(device: &Path, unit: &str, argv: &[String]) -> Result<(), String> {
    let address = format!("luo-fdstore/{}/{unit}", std::process::id());
    let socket = {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(address.as_bytes())
            .map_err(|e| e.to_string())?;
        UnixDatagram::bind_addr(&addr).map_err(|e| format!("cannot bind @{address}: {e}"))?
    };
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .env("NOTIFY_SOCKET", format!("@{address}"))
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
    let mut store = FdStore {
        unit: unit.to_owned(),
        entries: Vec::new(),
    };
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    let status = loop {
        receive(&socket, &mut store);
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            // What it sent just before it exited.
            socket.set_nonblocking(true).map_err(|e| e.to_string())?;
            receive(&socket, &mut store);
            break status;
        }
    };
    if !status.success() {
        return Err(format!("{} failed ({status})", argv[0]));
    }
    let keep = store.preserve(device)?;
    sys::hold_in_child(keep).map_err(|e| format!("cannot fork the holder: {e}"))
}

/// Receives the notifications waiting on `socket` (until its read timeout).
fn receive(socket: &UnixDatagram, store: &mut FdStore) {
    let mut buf = [0u8; 4096];
    while let Ok((n, fds)) = sys::recv_with_fds(socket.as_fd(), &mut buf, 16) {
        store.on_message(&String::from_utf8_lossy(&buf[..n]), fds);
    }
}

/// `luo fdstore restore`: retrieves what `hold` preserved and executes
/// `argv` with unit `unit`'s fds; returns only on failure.
///
/// # Errors
/// A sentence: a retrieve or the exec failed.
pub fn restore(device: &Path, unit: &str, argv: &[String]) -> Result<(), String> {
    let (fds, kexecs) = retrieve(device, unit)?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    if let Some(count) = kexecs {
        cmd.env(KEXECS_COUNT_ENV, count.to_string());
    }
    cmd.env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("LISTEN_PID");
    if !fds.is_empty() {
        let names: Vec<&str> = fds.iter().map(|(n, _)| n.as_str()).collect();
        cmd.env("LISTEN_FDS", fds.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            .env("LISTEN_PID", std::process::id().to_string());
        place_from_3(fds.into_iter().map(|(_, fd)| fd).collect())?;
    }
    Err(format!("cannot execute {}: {}", argv[0], cmd.exec()))
}

/// PID 1's restore: every fd of session "systemd" and every named session,
/// with the names `unit` gave them, and the kexec count now (the mapping's
/// plus one); the session is then finished.
fn retrieve(device: &Path, unit: &str) -> Result<Restored, String> {
    let dev = open_device(device)?;
    let session = match lu::retrieve_session(dev.as_fd(), SESSION) {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            eprintln!("luo fdstore: no LUO session '{SESSION}': no fd store to restore");
            return Ok((Vec::new(), None));
        }
        Err(e) => return Err(format!("cannot retrieve LUO session '{SESSION}': {e}")),
    };
    let mut text = String::new();
    let mut memfd = std::fs::File::from(
        lu::retrieve_fd(session.as_fd(), MAPPING_TOKEN)
            .map_err(|e| format!("cannot retrieve the mapping (token 0): {e}"))?,
    );
    // From the start, whatever position it kept (systemd reopens it).
    memfd
        .seek(std::io::SeekFrom::Start(0))
        .and_then(|_| memfd.read_to_string(&mut text))
        .map_err(|e| format!("cannot read the mapping: {e}"))?;
    let mapping: Value =
        serde_json::from_str(&text).map_err(|e| format!("the mapping is not JSON: {e}"))?;
    if mapping["version"].as_u64() != Some(MAPPING_VERSION) {
        return Err(format!("the mapping has an unsupported version: {text}"));
    }
    // PID 1 takes the state with extensions allowed: other keys are fine.
    let kexecs = mapping["state"]["kexecsCount"].as_u64().map(|n| n + 1);
    let units = mapping["units"]
        .as_object()
        .ok_or("the mapping's 'units' is not an object")?;
    let mut mine = Vec::new();
    for (owner, unit_state) in units {
        for entry in unit_state["fdstore"].as_array().into_iter().flatten() {
            let name = entry["name"].as_str().unwrap_or_default().to_owned();
            let fd = match entry["type"].as_str() {
                Some("fd") => entry["token"]
                    .as_u64()
                    .filter(|t| *t != MAPPING_TOKEN)
                    .map(|t| lu::retrieve_fd(session.as_fd(), t)),
                Some("luo_session") => entry["sessionName"]
                    .as_str()
                    .map(|s| lu::retrieve_session(dev.as_fd(), s)),
                _ => None,
            };
            match fd {
                Some(Ok(fd)) if owner == unit => mine.push((name, fd)),
                Some(Ok(_)) => {}
                Some(Err(e)) => eprintln!("luo fdstore: {owner}: cannot retrieve '{name}': {e}"),
                None => eprintln!("luo fdstore: {owner}: bad mapping entry {entry}"),
            }
        }
    }
    lu::finish(session.as_fd())
        .map_err(|e| format!("cannot finish LUO session '{SESSION}': {e}"))?;
    println!(
        "luo fdstore: {unit}: {} fd(s) restored from LUO session '{SESSION}'; kexecs count {}",
        mine.len(),
        kexecs.map_or_else(|| "unknown".to_owned(), |n| n.to_string()),
    );
    Ok((mine, kexecs))
}

/// What a restore hands a unit: its named fds, and PID 1's kexec count.
type Restored = (Vec<(String, OwnedFd)>, Option<u64>);

/// PID 1's kexec count so far, from [`KEXECS_COUNT_ENV`] (0 when unset).
fn kexecs_count() -> Result<u64, String> {
    match std::env::var(KEXECS_COUNT_ENV) {
        Err(_) => Ok(0),
        Ok(v) => v
            .parse()
            .map_err(|_| format!("{KEXECS_COUNT_ENV}={v:?} is not a count")),
    }
}

/// Puts `fds` at 3, 4, … without `O_CLOEXEC`, as a service receives them.
fn place_from_3(fds: Vec<OwnedFd>) -> Result<(), String> {
    let err = |e: std::io::Error| format!("cannot pass the fds: {e}");
    // First above every target, so that no dup2 closes one still needed.
    let high: Vec<OwnedFd> = fds
        .iter()
        .map(|fd| sys::dup_above(fd.as_fd(), 3 + fds.len() as i32))
        .collect::<std::io::Result<_>>()
        .map_err(err)?;
    drop(fds);
    for (i, fd) in high.iter().enumerate() {
        sys::dup2_inheritable(fd.as_fd(), 3 + i as i32).map_err(err)?;
    }
    Ok(())
}
