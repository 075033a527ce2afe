//! Where the daemon's time goes, per ioctl.
//!
//! The daemon's thread is always in exactly one [`Phase`]; [`enter`]
//! switches to another until its [`Span`] drops (spans nest, and each
//! moment counts once, for the innermost). A call is timed from the moment
//! the daemon starts reading it ([`arrived`], then [`received`]) until its
//! reply has left ([`done`]); [`call`] says which ioctl it was, and calls that are not
//! ioctls (opens, releases, statfs) are not kept. Only one call at a time
//! is attributed: with several in one batch the batch's shared work
//! (one journal record for all) goes to the last. A switch costs one
//! `clock_gettime` (tens of nanoseconds); nothing is allocated per call.
//!
//! `luo bench` reads the means ([`take`], over the control socket) beside
//! what the caller measured: the difference is the transport's own time.

use std::cell::RefCell;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// What the daemon is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Reading the request (`/dev/fuse` read, `SECCOMP_IOCTL_NOTIF_RECV`).
    Receive,
    /// Checking the caller and reading or writing its memory.
    Caller,
    /// Decoding and the sessions' own work: everything not named here.
    Store,
    /// Encoding and writing the journal record.
    Journal,
    /// Handing new fds to the keeper (and dropping those it no longer needs).
    Keeper,
    /// Giving the caller a file: a session file from the opener, or
    /// `SECCOMP_IOCTL_NOTIF_ADDFD`.
    Install,
    /// Writing the reply.
    Reply,
}

impl Phase {
    const ALL: [Phase; 7] = [
        Phase::Receive,
        Phase::Caller,
        Phase::Store,
        Phase::Journal,
        Phase::Keeper,
        Phase::Install,
        Phase::Reply,
    ];

    /// Its name in a report.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Receive => "receive",
            Phase::Caller => "caller",
            Phase::Store => "decode+store",
            Phase::Journal => "journal",
            Phase::Keeper => "keeper",
            Phase::Install => "install",
            Phase::Reply => "reply",
        }
    }
}

/// How a call reached the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A FUSE request (FUSE-file device, CUSE device, session files).
    Fuse,
    /// A seccomp notification from a `luo run` tree.
    Trap,
}

const PHASES: usize = Phase::ALL.len();
/// `LIVEUPDATE_IOCTL_TYPE` (this module sits below `uapi`).
const IOCTL_TYPE: u32 = 0xBA;
/// Where trapped calls on files that are not LUO files are kept (no uAPI
/// ioctl has this number): `luo run` traps the fd-returning commands on
/// every fd, and the daemon lets the kernel run the others.
pub const NOT_OURS: u8 = 0x47;
/// Ioctl numbers kept: the uAPI's are 0x00–0x43.
const NRS: usize = 0x48;

/// Each ioctl's total time in each phase, from either source.
struct Profile {
    /// The phase the thread is in, and since when.
    active: Phase,
    since: Instant,
    /// The call being timed: its ioctl number and source, once known.
    call: Option<(usize, Source)>,
    /// The call's time so far, by phase.
    now: [u64; PHASES],
    /// Completed calls, by ioctl number and source: count and ns by phase.
    done: [[(u64, [u64; PHASES]); 2]; NRS],
}

thread_local! {
    static PROFILE: RefCell<Profile> = RefCell::new(Profile {
        active: Phase::Store,
        since: Instant::now(),
        call: None,
        now: [0; PHASES],
        done: [[(0, [0; PHASES]); 2]; NRS],
    });
}

impl Profile {
    /// Switches to `phase`; returns the one left.
    fn switch(&mut self, phase: Phase) -> Phase {
        let t = Instant::now();
        self.now[self.active as usize] += (t - self.since).as_nanos() as u64;
        self.since = t;
        std::mem::replace(&mut self.active, phase)
    }
}

/// The daemon starts reading a request: unless a call is already being
/// timed, timing starts afresh.
pub fn arrived() {
    PROFILE.with_borrow_mut(|p| {
        if p.call.is_none() {
            p.now = [0; PHASES];
            p.since = Instant::now();
        }
        p.active = Phase::Receive;
    });
}

/// The request has been read: what follows is the daemon's own work.
pub fn received() {
    PROFILE.with_borrow_mut(|p| {
        p.switch(Phase::Store);
    });
}

/// The request being served is ioctl `cmd`, from `source`.
pub fn call(cmd: u32, source: Source) {
    let nr = (cmd & 0xff) as usize;
    if cmd >> 8 != IOCTL_TYPE || nr >= NRS {
        return;
    }
    PROFILE.with_borrow_mut(|p| {
        p.call.get_or_insert((nr, source));
    });
}

/// The call being served turned out to be on a file that is not a LUO file.
pub fn not_ours() {
    PROFILE.with_borrow_mut(|p| {
        if let Some((nr, _)) = &mut p.call {
            *nr = usize::from(NOT_OURS);
        }
    });
}

/// The reply to the call from `source` has left: its time is kept.
pub fn done(source: Source) {
    PROFILE.with_borrow_mut(|p| {
        let Some((nr, from)) = p.call.filter(|(_, s)| *s == source) else {
            return;
        };
        let active = p.active;
        p.switch(active);
        let slot = &mut p.done[nr][from as usize];
        slot.0 += 1;
        for (total, t) in slot.1.iter_mut().zip(p.now) {
            *total += t;
        }
        p.call = None;
        p.now = [0; PHASES];
        p.active = Phase::Store;
    });
}

/// Time spent until the span drops counts for `phase`.
pub fn enter(phase: Phase) -> Span {
    Span {
        back: PROFILE.with_borrow_mut(|p| p.switch(phase)),
    }
}

/// A phase being timed; the phase before it resumes when it drops.
pub struct Span {
    back: Phase,
}

impl Drop for Span {
    fn drop(&mut self) {
        PROFILE.with_borrow_mut(|p| p.switch(self.back));
    }
}

/// One ioctl's mean time per phase, from one source.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ProfileRow {
    /// The ioctl number (`_IOC_NR`).
    pub nr: u8,
    /// Trapped (`luo run`'s seccomp filter) rather than through FUSE.
    pub trapped: bool,
    /// Calls timed.
    pub calls: u64,
    /// Mean microseconds in each phase, by [`Phase::name`].
    pub micros: Vec<(String, f64)>,
}

impl ProfileRow {
    /// The mean time the daemon spent on one call, in microseconds.
    pub fn total(&self) -> f64 {
        self.micros.iter().map(|(_, m)| m).sum()
    }
}

/// The means so far, and a fresh start.
pub fn take() -> Vec<ProfileRow> {
    PROFILE.with_borrow_mut(|p| {
        let mut rows = Vec::new();
        for (nr, by_source) in p.done.iter_mut().enumerate() {
            for (trapped, slot) in by_source.iter_mut().enumerate() {
                let (calls, ns) = std::mem::replace(slot, (0, [0; PHASES]));
                if calls == 0 {
                    continue;
                }
                let micros = Phase::ALL
                    .iter()
                    .map(|ph| {
                        (
                            ph.name().to_owned(),
                            ns[*ph as usize] as f64 / calls as f64 / 1e3,
                        )
                    })
                    .collect();
                rows.push(ProfileRow {
                    nr: nr as u8,
                    trapped: trapped == 1,
                    calls,
                    micros,
                });
            }
        }
        rows
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_type_is_the_uapis() {
        assert_eq!(IOCTL_TYPE, crate::uapi::IOCTL_TYPE);
    }

    fn spin(us: u64) {
        let t = Instant::now();
        while t.elapsed().as_micros() < u128::from(us) {}
    }

    /// Nested spans count each moment once, for the innermost; calls that
    /// are not ioctls, or whose reply came from another source, are not kept.
    #[test]
    fn each_moment_counts_once_for_the_innermost_phase() {
        take();
        arrived();
        spin(1000);
        received();
        call(crate::uapi::PRESERVE_FD, Source::Fuse);
        {
            let _j = enter(Phase::Journal);
            spin(2000);
            let _k = enter(Phase::Keeper);
            spin(4000);
        }
        done(Source::Trap);
        done(Source::Fuse);
        arrived();
        done(Source::Fuse);
        let rows = take();
        assert_eq!(rows.len(), 1, "{rows:?}");
        let row = &rows[0];
        assert_eq!((row.nr, row.trapped, row.calls), (0x40, false, 1));
        let m = |name: &str| row.micros.iter().find(|(n, _)| n == name).unwrap().1;
        // Bounds apart by whole spins: a preempted test thread cannot blur them.
        assert!(m("receive") >= 1000.0, "{row:?}");
        assert!((2000.0..6000.0).contains(&m("journal")), "{row:?}");
        assert!(m("keeper") >= 4000.0, "{row:?}");
        assert!(m("decode+store") < 1000.0, "{row:?}");
        assert!(take().is_empty());
    }
}
