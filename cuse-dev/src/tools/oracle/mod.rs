//! `luo oracle`: a corpus of ioctl scenarios replayed against any LUO device,
//! the kernel's or ours, printing one line per step. Two runs are compared
//! line by line (the guest rig compares the in-kernel module with the CUSE
//! device in one guest); every line holds what a program can observe: the
//! return value, the errno, the struct written back (fd numbers masked) and
//! what a retrieved file holds. Fd-returning calls on our device need
//! `luo run`.
//!
//! Phase 1 runs on outgoing sessions and leaves sessions for phase 2 held by
//! a detached child (as the two-stage selftests do); phase 2 runs after an
//! update, on the incoming ones.

use std::fmt::Write as _;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use serde::Serialize;

use crate::uapi;

mod holders;
mod syscalls;

pub use holders::{hold_resized, hold_spliced};

const CREATE: u64 = uapi::CREATE_SESSION as u64;
const RETRIEVE: u64 = uapi::RETRIEVE_SESSION as u64;
const PRESERVE: u64 = uapi::PRESERVE_FD as u64;
const RETRIEVE_FD: u64 = uapi::RETRIEVE_FD as u64;
const FINISH: u64 = uapi::FINISH as u64;
const GET_NAME: u64 = uapi::GET_NAME as u64;

/// One observed step.
#[derive(Serialize)]
struct Step<'a> {
    phase: u8,
    step: &'a str,
    ret: i64,
    errno: i32,
    /// The struct after the call, hex, fd fields masked.
    out: String,
    /// Anything else observed (file contents, flags, seals).
    #[serde(skip_serializing_if = "String::is_empty")]
    seen: String,
}

pub(super) struct Oracle {
    label: String,
    phase: u8,
}

/// A struct buffer of `size` bytes (size field set), optionally with `len`
/// bytes in the first field.
fn args(size: usize, declared: u32) -> Vec<u8> {
    let mut v = vec![0u8; size];
    v[..4].copy_from_slice(&declared.to_ne_bytes());
    v
}

fn session_args(name: &[u8], size: usize) -> Vec<u8> {
    let mut a = args(size.max(8), size as u32);
    let end = (8 + name.len()).min(a.len());
    a[8..end].copy_from_slice(&name[..end - 8]);
    a
}

fn fd_args(fd: i32, token: u64) -> Vec<u8> {
    let mut a = args(16, 16);
    a[4..8].copy_from_slice(&fd.to_ne_bytes());
    a[8..16].copy_from_slice(&token.to_ne_bytes());
    a
}

pub(super) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    // Trailing zeros carry nothing a reader could tell apart.
    let trimmed = s.trim_end_matches('0');
    let keep = trimmed.len().div_ceil(2) * 2;
    s.truncate(keep);
    s
}

impl Oracle {
    fn emit(&self, step: &str, (ret, errno): (i64, i32), out: &[u8], seen: String) {
        let line = serde_json::to_string(&Step {
            phase: self.phase,
            step,
            ret: if ret >= 0 { 0 } else { ret },
            errno,
            out: hex(out),
            seen,
        })
        .expect("serializes");
        println!("ORACLE {} {line}", self.label);
    }

    /// An ioctl with a struct; `fd_at` is where an fd number comes back (masked).
    fn call(
        &self,
        step: &str,
        fd: RawFd,
        cmd: u64,
        mut a: Vec<u8>,
        fd_at: Option<usize>,
    ) -> (i64, i32, Option<OwnedFd>) {
        let (r, e) = syscalls::raw_ioctl(fd, cmd, a.as_mut_ptr());
        let mut got = None;
        if let Some(at) = fd_at.filter(|at| r >= 0 && a.len() >= at + 4) {
            let n = i32::from_ne_bytes(a[at..at + 4].try_into().expect("4 bytes"));
            if n >= 0 {
                got = Some(syscalls::returned_fd(n));
            }
            a[at..at + 4].copy_from_slice(&[0xff; 4]);
        }
        self.emit(step, (r, e), &a, String::new());
        (r, e, got)
    }

    fn create(&self, step: &str, dev: RawFd, name: &[u8]) -> Option<OwnedFd> {
        self.call(step, dev, CREATE, session_args(name, 72), Some(4))
            .2
    }

    /// PRESERVE_FD; the caller's own fd number is masked in the output.
    fn preserve(&self, step: &str, s: RawFd, fd: i32, token: u64) -> i32 {
        let mut a = fd_args(fd, token);
        let (r, e) = syscalls::raw_ioctl(s, PRESERVE, a.as_mut_ptr());
        a[4..8].copy_from_slice(&[0xff; 4]);
        self.emit(step, (r, e), &a, String::new());
        e
    }

    /// A plain syscall's outcome as a step.
    fn syscall(&self, step: &str, r: i64, seen: String) {
        let errno = if r < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        };
        self.emit(step, (r.min(0), errno), &[], seen);
    }

    fn get_name(&self, step: &str, s: RawFd) {
        self.call(step, s, GET_NAME, args(72, 72), None);
    }

    fn open(&self, step: &str, device: &Path) -> std::result::Result<OwnedFd, i32> {
        let opened = syscalls::open_rdwr(device);
        let outcome = match &opened {
            Ok(_) => (0, 0),
            Err(errno) => (-1, *errno),
        };
        self.emit(step, outcome, &[], String::new());
        opened
    }

    fn phase1(&self, device: &Path) -> Result<(), String> {
        let dev = self
            .open("open", device)
            .map_err(|e| cannot_open(device, e))?;
        let d = dev.as_raw_fd();
        let _ = self.open("open-again-is-busy", device);

        // Decoding.
        self.call("nr-out-of-range", d, 0xBA02, args(72, 72), None);
        self.call("nr-far-out-of-range", d, 0xBA7F, args(72, 72), None);
        self.call("other-type", d, 0xBB00, args(72, 72), None);
        self.call("encoded-as-iow", d, 0x4004_BA00, args(72, 72), None);
        self.call(
            "encoded-as-iowr",
            d,
            0xC048_BA00,
            session_args(b"x", 72),
            None,
        );
        self.call("session-cmd-on-device", d, PRESERVE, fd_args(0, 1), None);
        self.emit(
            "null-arg",
            syscalls::raw_ioctl(d, CREATE, std::ptr::null_mut()),
            &[],
            String::new(),
        );
        self.emit(
            "bad-pointer",
            syscalls::raw_ioctl(d, CREATE, 8 as *mut u8),
            &[],
            String::new(),
        );
        for size in [0usize, 4, 8, 71] {
            let step = format!("create-size-{size}");
            self.call(
                &step,
                d,
                CREATE,
                session_args(b"short", size.max(8)),
                Some(4),
            );
        }
        let mut tail = session_args(b"tail-zero", 80);
        tail[76] = 0;
        let s = self
            .call("create-size-80-zero-tail", d, CREATE, tail, Some(4))
            .2;
        drop(s);
        let mut tail = session_args(b"tail-nonzero", 80);
        tail[79] = 1;
        self.call("create-size-80-nonzero-tail", d, CREATE, tail, Some(4));
        self.call(
            "create-size-4096",
            d,
            CREATE,
            session_args(b"page", 4096),
            Some(4),
        );
        self.call(
            "create-size-4097",
            d,
            CREATE,
            session_args(b"page1", 4097),
            Some(4),
        );

        // Names.
        self.create("name-empty", d, b"");
        let n63 = [b'a'; 63];
        let s63 = self.create("name-63", d, &n63);
        if let Some(s) = &s63 {
            self.get_name("name-63-get", s.as_raw_fd());
        }
        self.create("name-64-no-nul", d, &[b'b'; 64]);
        let junk = self.create("name-junk-after-nul", d, b"junk\0after");
        if let Some(s) = &junk {
            self.get_name("name-junk-get", s.as_raw_fd());
        }
        self.create("name-junk-same-prefix", d, b"junk");
        self.create("name-utf8", d, "é-session".as_bytes());
        let (_, errno, a) = self.call(
            "create-a",
            d,
            CREATE,
            session_args(b"oracle-a", 72),
            Some(4),
        );
        if a.is_none() {
            return Err(format!(
                "cannot create sessions on {}: {} (our device needs `luo run`)",
                device.display(),
                std::io::Error::from_raw_os_error(errno)
            ));
        }
        self.create("create-a-again", d, b"oracle-a");
        self.call(
            "retrieve-unknown",
            d,
            RETRIEVE,
            session_args(b"oracle-none", 72),
            Some(4),
        );
        self.call(
            "retrieve-outgoing-name",
            d,
            RETRIEVE,
            session_args(b"oracle-a", 72),
            Some(4),
        );
        let Some(a) = a else { return Ok(()) };
        let sa = a.as_raw_fd();

        // Session ioctls of the wrong kind and decoding on a session.
        self.call(
            "device-cmd-on-session",
            sa,
            CREATE,
            session_args(b"x", 72),
            Some(4),
        );
        self.call(
            "retrieve-fd-on-outgoing",
            sa,
            RETRIEVE_FD,
            fd_args(-1, 1),
            Some(4),
        );
        self.call("finish-on-outgoing", sa, FINISH, args(8, 8), None);
        self.call("session-nr-out-of-range", sa, 0xBA44, args(16, 16), None);
        self.get_name("get-name", sa);
        self.call("get-name-size-8", sa, GET_NAME, args(8, 8), None);
        self.call("get-name-size-71", sa, GET_NAME, args(72, 71), None);
        let mut big = args(80, 80);
        big[78] = 1;
        self.call("get-name-nonzero-tail", sa, GET_NAME, big, None);

        // PRESERVE_FD.
        let m1 = syscalls::memfd("m1", b"first");
        let m2 = syscalls::memfd("m2", b"second");
        self.preserve("preserve", sa, m1.as_raw_fd(), 1);
        self.preserve("preserve-token-used", sa, m2.as_raw_fd(), 1);
        self.preserve("preserve-bad-fd", sa, -1, 2);
        self.preserve("preserve-closed-fd", sa, 999, 2);
        if let Ok((r, _w)) = crate::sys::pipe() {
            self.preserve("preserve-pipe", sa, r.as_raw_fd(), 3);
        }
        self.preserve("preserve-same-file-again", sa, m1.as_raw_fd(), 4);
        let dup = syscalls::dup(m1.as_fd());
        self.preserve("preserve-dup-of-same-file", sa, dup.as_raw_fd(), 5);
        self.preserve("preserve-device-fd", sa, d, 6);
        self.preserve("preserve-session-fd", sa, sa, 7);
        self.call("preserve-size-8", sa, PRESERVE, args(8, 8), None);
        // The session fd as /proc shows it.
        let link = std::fs::read_link(format!("/proc/self/fd/{sa}"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        self.emit("session-fd-link", (0, 0), &[], link);
        let mut a24 = fd_args(m2.as_raw_fd(), 8);
        a24.resize(24, 0);
        a24[..4].copy_from_slice(&24u32.to_ne_bytes());
        a24[4..8].copy_from_slice(&m2.as_raw_fd().to_ne_bytes());
        let (r, e) = syscalls::raw_ioctl(sa, PRESERVE, a24.as_mut_ptr());
        a24[4..8].copy_from_slice(&[0xff; 4]);
        self.emit("preserve-size-24-zero-tail", (r, e), &a24, String::new());
        a24[4..8].copy_from_slice(&m2.as_raw_fd().to_ne_bytes());
        // A preserved memfd's size is frozen in the kernel.
        let r = syscalls::ftruncate(m2.as_fd(), 4096);
        self.syscall("truncate-preserved", r, String::new());
        let r = syscalls::pwrite(m2.as_fd(), b"x", 8192);
        self.syscall("grow-preserved-by-write", r, String::new());
        a24[20] = 1;
        a24[8..16].copy_from_slice(&9u64.to_ne_bytes());
        let (r, e) = syscalls::raw_ioctl(sa, PRESERVE, a24.as_mut_ptr());
        a24[4..8].copy_from_slice(&[0xff; 4]);
        self.emit("preserve-size-24-nonzero-tail", (r, e), &a24, String::new());
        self.preserve(
            "preserve-token-max",
            sa,
            syscalls::memfd("m3", b"x").as_raw_fd(),
            u64::MAX,
        );

        // A file preserved in one session is busy in another; closing the
        // session unpreserves it.
        let b = self.create("create-b", d, b"oracle-b");
        if let Some(b) = &b {
            self.preserve("preserve-busy-elsewhere", b.as_raw_fd(), m1.as_raw_fd(), 1);
        }
        drop(a);
        self.create("create-a-after-close", d, b"oracle-a");
        if let Some(b) = &b {
            self.preserve(
                "preserve-after-unpreserve",
                b.as_raw_fd(),
                m1.as_raw_fd(),
                1,
            );
        }

        // dup'ed and passed session fds keep the session.
        let c = self.create("create-c", d, b"oracle-c");
        if let Some(c) = c {
            let c2 = syscalls::dup(c.as_fd());
            drop(c);
            self.get_name("get-name-through-dup", c2.as_raw_fd());
            self.create("create-c-while-dup-open", d, b"oracle-c");
            let passed = pass_over_socket(c2);
            if let Some(p) = &passed {
                self.get_name("get-name-after-scm-rights", p.as_raw_fd());
            }
            drop(passed);
            self.create("create-c-after-all-closed", d, b"oracle-c");
        }

        // What phase 2 retrieves, held across the update by a child.
        let keep = self.create("create-in", d, b"oracle-in");
        let fin = self.create("create-fin", d, b"oracle-fin");
        let (Some(keep), Some(fin)) = (keep, fin) else {
            return Ok(());
        };
        let files = [
            syscalls::memfd("in1", b"one"),
            syscalls::memfd("in2", &[0xA5; 100]),
            syscalls::memfd("in3", b"sealed"),
            syscalls::memfd("fin1", b"f1"),
            syscalls::memfd("fin2", b"f2"),
        ];
        syscalls::seek(files[1].as_fd(), 7);
        syscalls::add_seals(files[2].as_fd(), libc::F_SEAL_SHRINK | libc::F_SEAL_GROW);
        for (i, f) in files[..3].iter().enumerate() {
            self.preserve(
                &format!("preserve-in-{i}"),
                keep.as_raw_fd(),
                f.as_raw_fd(),
                i as u64 + 1,
            );
        }
        for (i, f) in files[3..].iter().enumerate() {
            self.preserve(
                &format!("preserve-fin-{i}"),
                fin.as_raw_fd(),
                f.as_raw_fd(),
                i as u64 + 1,
            );
        }
        drop(dev);
        crate::sys::hold_in_child(vec![keep, fin]).expect("fork a holder");
        Ok(())
    }

    fn phase2(&self, device: &Path) -> Result<(), String> {
        let dev = self
            .open("open", device)
            .map_err(|e| cannot_open(device, e))?;
        let d = dev.as_raw_fd();
        self.call(
            "retrieve-unknown",
            d,
            RETRIEVE,
            session_args(b"oracle-none", 72),
            Some(4),
        );
        let s = self
            .call(
                "retrieve-in",
                d,
                RETRIEVE,
                session_args(b"oracle-in", 72),
                Some(4),
            )
            .2;
        self.call(
            "retrieve-in-again",
            d,
            RETRIEVE,
            session_args(b"oracle-in", 72),
            Some(4),
        );
        self.create("create-same-name-as-incoming", d, b"oracle-in");
        self.call(
            "retrieve-size-8",
            d,
            RETRIEVE,
            session_args(b"oracle-fin", 8),
            Some(4),
        );
        let Some(s) = s else {
            return Err(format!(
                "cannot retrieve the session oracle-in from {} (did phase 1 run before the \
                 update, and is our device used under `luo run`?)",
                device.display()
            ));
        };
        let si = s.as_raw_fd();
        self.get_name("get-name-incoming", si);
        let m = syscalls::memfd("late", b"late");
        self.preserve("preserve-on-incoming", si, m.as_raw_fd(), 9);
        self.call(
            "retrieve-fd-unknown-token",
            si,
            RETRIEVE_FD,
            fd_args(-1, 77),
            Some(4),
        );
        for token in [2u64, 1, 3, 2] {
            let (r, e, f) = self.call(
                &format!("retrieve-fd-{token}"),
                si,
                RETRIEVE_FD,
                fd_args(-1, token),
                Some(4),
            );
            let seen = f
                .as_ref()
                .map(|f| syscalls::describe(f.as_raw_fd()))
                .unwrap_or_default();
            self.emit(&format!("retrieved-{token}"), (r, e), &[], seen);
        }
        let (_, _, a) = self.call(
            "retrieve-fd-1-again",
            si,
            RETRIEVE_FD,
            fd_args(-1, 1),
            Some(4),
        );
        let (_, _, b) = self.call(
            "retrieve-fd-1-third",
            si,
            RETRIEVE_FD,
            fd_args(-1, 1),
            Some(4),
        );
        if let (Some(a), Some(b)) = (a, b) {
            let same = syscalls::same_file(a.as_raw_fd(), b.as_raw_fd());
            self.emit(
                "retrieve-twice-same-file",
                (0, 0),
                &[],
                format!("same={same}"),
            );
        }
        self.call("finish-size-4", si, FINISH, args(8, 4), None);
        let mut f = args(16, 16);
        f[12] = 1;
        self.call("finish-nonzero-tail", si, FINISH, f, None);
        self.call("finish", si, FINISH, args(8, 8), None);
        self.call(
            "retrieve-fd-after-finish",
            si,
            RETRIEVE_FD,
            fd_args(-1, 1),
            Some(4),
        );
        self.get_name("get-name-after-finish", si);
        self.call("finish-again", si, FINISH, args(8, 8), None);
        drop(s);
        // A session whose files were never retrieved finishes too.
        if let Some(fin) = self
            .call(
                "retrieve-fin",
                d,
                RETRIEVE,
                session_args(b"oracle-fin", 72),
                Some(4),
            )
            .2
        {
            self.call(
                "finish-unretrieved",
                fin.as_raw_fd(),
                FINISH,
                args(8, 8),
                None,
            );
        }
        self.call(
            "retrieve-in-after-finish",
            d,
            RETRIEVE,
            session_args(b"oracle-in", 72),
            Some(4),
        );
        Ok(())
    }
}

/// Sends `fd` to ourselves over a socket pair and returns the received copy
/// (the original is closed).
fn pass_over_socket(fd: OwnedFd) -> Option<OwnedFd> {
    let (a, b) = std::os::unix::net::UnixStream::pair().ok()?;
    crate::sys::send_with_fd(
        std::os::fd::AsFd::as_fd(&a),
        b"x",
        Some(std::os::fd::AsFd::as_fd(&fd)),
    )
    .ok()?;
    drop(fd);
    let mut buf = [0u8; 1];
    crate::sys::recv_with_fd(std::os::fd::AsFd::as_fd(&b), &mut buf)
        .ok()?
        .1
}

fn cannot_open(device: &Path, errno: i32) -> String {
    format!(
        "cannot open {}: {}",
        device.display(),
        std::io::Error::from_raw_os_error(errno)
    )
}

/// Runs phase `phase` (1 or 2) against `device`, labelling lines `label`.
///
/// # Errors
/// A sentence when the device cannot be opened or phase 1 cannot create a
/// session: what the phase observes would then say nothing.
pub fn run(device: &Path, phase: u8, label: &str) -> Result<(), String> {
    let o = Oracle {
        label: label.to_owned(),
        phase,
    };
    match phase {
        1 => o.phase1(device),
        _ => o.phase2(device),
    }
}
