//! The entry points of the fuzz targets (`fuzz/`, `cargo fuzz`): one per
//! parser of bytes that come from outside the daemon. Each must return for
//! any input without panicking, and checks what it can of the result (a
//! round trip where a writer exists). `tests/fuzz_corpus.rs` replays every
//! seed and every input the fuzzers kept through the same functions on
//! stable Rust, so the targets keep building and their findings stay fixed.

use std::cell::RefCell;
use std::path::Path;

use luo_store::{Direction, Errno, Result};

use crate::uapi::CallerMem;

/// A FUSE or CUSE request as read from `/dev/fuse` or `/dev/cuse`.
pub fn fuse_request(data: &[u8]) {
    if let Ok(req) = crate::wire::fuse::parse(data) {
        let _ = crate::wire::fuse::is_noreply(&req.op);
    }
}

/// Caller memory made of fuzz bytes at [`BASE`]; anything else faults.
struct Bytes(RefCell<Vec<u8>>);

/// Where [`Bytes`] maps its memory.
const BASE: u64 = 0x10000;

impl CallerMem for Bytes {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let mem = self.0.borrow();
        let start = addr.checked_sub(BASE).ok_or(Errno::EFAULT)?;
        let start = usize::try_from(start).map_err(|_| Errno::EFAULT)?;
        let end = start.checked_add(buf.len()).ok_or(Errno::EFAULT)?;
        buf.copy_from_slice(mem.get(start..end).ok_or(Errno::EFAULT)?);
        Ok(())
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<()> {
        let mut mem = self.0.borrow_mut();
        let start = addr.checked_sub(BASE).ok_or(Errno::EFAULT)?;
        let start = usize::try_from(start).map_err(|_| Errno::EFAULT)?;
        let end = start.checked_add(buf.len()).ok_or(Errno::EFAULT)?;
        mem.get_mut(start..end)
            .ok_or(Errno::EFAULT)?
            .copy_from_slice(buf);
        Ok(())
    }
}

/// A LUO ioctl: `cmd` (4 bytes), which file it reaches (1 byte: the device,
/// or a session of each kind), where the struct starts (2 bytes, from
/// 0x10000), then the caller's memory. A decoded struct is as large as its
/// op's, its size field within bounds, and a session name taken from it is
/// one the kernel would take.
pub fn uapi_decode(data: &[u8]) {
    let Some((head, mem)) = data.split_at_checked(7) else {
        return;
    };
    let cmd = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
    let session = match head[4] % 5 {
        0 => None,
        1 => Some((Direction::Outgoing, false)),
        2 => Some((Direction::Outgoing, true)),
        3 => Some((Direction::Incoming, false)),
        _ => Some((Direction::Incoming, true)),
    };
    let arg = BASE + u64::from(u16::from_le_bytes([head[5], head[6]]));
    let caller = Bytes(RefCell::new(mem.to_vec()));
    let Ok(d) = crate::uapi::decode(cmd, arg, &caller, session) else {
        return;
    };
    assert_eq!(d.buf.len(), d.op.size, "the struct is the op's size");
    assert!(d.respond_len() <= d.buf.len(), "the reply fits the struct");
    if session.is_none() {
        let args: crate::uapi::SessionArgs = d.get();
        if let Ok(name) = luo_store::SessionName::from_field(&args.name) {
            assert_eq!(
                luo_store::SessionName::from_field(&name.to_field()),
                Ok(name),
                "a session name survives its round trip"
            );
        }
    }
}

/// Bytes arriving on the control socket: framing, then the request. A
/// request that parses is written and parsed back to the same request.
pub fn control_request(data: &[u8]) {
    let end = match crate::control::server::line_end(data) {
        Some(Ok(end)) => end,
        Some(Err(_)) | None => return,
    };
    let Ok(req) = crate::control::server::parse_request(&data[..end]) else {
        return;
    };
    let line = serde_json::to_vec(&req).expect("a request serializes");
    let again = crate::control::server::parse_request(&line).expect("a written request parses");
    assert_eq!(format!("{req:?}"), format!("{again:?}"), "round trip");
}

/// The state journal as found on disk (first byte even), or (first byte
/// odd) records separated by `\n\n`, framed here with valid checksums so
/// that the fuzzer reaches the replay of what they say. One that loads is
/// written again as a single snapshot, which must load to the same state.
pub fn journal(data: &[u8]) {
    let path = Path::new("fuzz.img");
    let framed;
    let bytes = match data.split_first() {
        Some((mode, rest)) if mode & 1 == 1 => {
            let mut b = luo_store::journal_header();
            for payload in rest.split(|&c| c == b'\n').filter(|p| !p.is_empty()) {
                match luo_store::journal_record(payload) {
                    Ok(rec) => b.extend(rec),
                    Err(_) => return,
                }
            }
            framed = b;
            &framed[..]
        }
        Some((_, rest)) => rest,
        None => return,
    };
    let Ok(loaded) = crate::persist::parse(bytes, path) else {
        return;
    };
    let record = crate::persist::Record {
        full: true,
        header: loaded.header.clone(),
        sessions: loaded.sessions.values().cloned().collect(),
        deltas: Vec::new(),
        removed: Vec::new(),
        replies: loaded.replies.clone(),
        inflight: loaded.inflight,
    };
    let payload = serde_json::to_vec(&record).expect("a record serializes");
    let Ok(rec) = luo_store::journal_record(&payload) else {
        return; // over MAX_RECORD: the daemon refuses to write it too
    };
    let mut bytes = luo_store::journal_header();
    bytes.extend(rec);
    let again = crate::persist::parse(&bytes, path).expect("a written journal loads");
    let state = |l: &crate::persist::Loaded| serde_json::to_value(l.store_image()).ok();
    assert_eq!(state(&loaded), state(&again), "round trip");
}

/// The blob the previous kernel's daemon left in kmod-shim (what the next
/// kernel's daemon reads first). One that parses becomes the incoming
/// store without a panic and survives a round trip.
pub fn kexec_blob(data: &[u8]) {
    let Ok(image) = serde_json::from_slice::<luo_kexec_helper::handover::KexecImage>(data) else {
        return;
    };
    let bytes = serde_json::to_vec(&image).expect("an image serializes");
    let again: luo_kexec_helper::handover::KexecImage =
        serde_json::from_slice(&bytes).expect("a written image parses");
    assert_eq!(
        serde_json::to_value(&image).ok(),
        serde_json::to_value(&again).ok(),
        "round trip"
    );
    let mut keys = image.files.iter().map(|f| (f.session, f.token));
    let lost: Vec<((u64, u64), i32)> = keys.by_ref().take(1).map(|k| (k, libc::EIO)).collect();
    let waiting: Vec<(u64, u64)> = keys.take(1).collect();
    let carried = |k| !waiting.contains(&k);
    let _ = luo_kexec_helper::handover::incoming_image(image.store, &lost, &carried);
}

/// One fuzz target.
pub type Target = fn(&[u8]);

/// The targets by name, for the corpus replay.
pub const TARGETS: &[(&str, Target)] = &[
    ("fuse_request", fuse_request),
    ("uapi_decode", uapi_decode),
    ("control_request", control_request),
    ("journal", journal),
    ("kexec_blob", kexec_blob),
];
