//! Unit tests of every errno path and state transition of the object model.
//!
//! Files are pipes (each has its own pipefs inode), served by a recording test
//! handler that can be told to fail any callback.

use std::cell::RefCell;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use crate::*;

#[derive(Default)]
struct Script {
    log: Vec<String>,
    fail_preserve: Option<Errno>,
    fail_freeze_token: Option<u64>,
    fail_retrieve: Option<Errno>,
    refuse_finish: bool,
    flb_fail_preserve: bool,
    flb_fail_retrieve: bool,
}

type Shared = Arc<Mutex<Script>>;

struct PipeHandler {
    script: Shared,
    flbs: Vec<FlbId>,
}

fn token_of(data: &[u8]) -> u64 {
    u64::from_le_bytes(data[..8].try_into().unwrap())
}

fn fstat(fd: BorrowedFd<'_>) -> libc::stat {
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is a valid open descriptor and st is writable.
    assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
    st
}

impl FileHandler for PipeHandler {
    fn compatible(&self) -> &'static str {
        "pipe-test-v1"
    }
    fn can_preserve(&self, file: BorrowedFd<'_>) -> bool {
        fstat(file).st_mode & libc::S_IFMT == libc::S_IFIFO
    }
    fn get_id(&self, file: BorrowedFd<'_>) -> Result<FileId> {
        let st = fstat(file);
        Ok(FileId {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }
    fn preserve(&self, file: BorrowedFd<'_>) -> Result<Preserved> {
        let mut s = self.script.lock().unwrap();
        s.log.push(format!("preserve {}", fstat(file).st_ino));
        if let Some(e) = s.fail_preserve {
            return Err(e);
        }
        Ok(Preserved {
            data: fstat(file).st_ino.to_le_bytes().to_vec(),
        })
    }
    fn unpreserve(&self, state: &FileState<'_>) {
        self.script
            .lock()
            .unwrap()
            .log
            .push(format!("unpreserve {}", token_of(state.data)));
    }
    fn freeze(&self, state: &FileState<'_>, data: &mut Vec<u8>) -> Result<()> {
        let mut s = self.script.lock().unwrap();
        let ino = token_of(state.data);
        s.log.push(format!("freeze {ino}"));
        if s.fail_freeze_token == Some(ino) {
            return Err(Errno::EAGAIN);
        }
        data.push(0xf);
        Ok(())
    }
    fn unfreeze(&self, state: &FileState<'_>) {
        self.script
            .lock()
            .unwrap()
            .log
            .push(format!("unfreeze {}", token_of(state.data)));
    }
    fn retrieve(&self, state: &FileState<'_>) -> Result<OwnedFd> {
        let mut s = self.script.lock().unwrap();
        s.log.push(format!("retrieve {}", token_of(state.data)));
        assert_eq!(
            state.data.last(),
            Some(&0xf),
            "freeze's data reaches retrieve"
        );
        if let Some(e) = s.fail_retrieve {
            return Err(e);
        }
        Ok(state
            .carried
            .expect("carried fd")
            .try_clone_to_owned()
            .unwrap())
    }
    fn can_finish(&self, _state: &FileState<'_>) -> bool {
        !self.script.lock().unwrap().refuse_finish
    }
    fn finish(&self, state: &FileState<'_>) {
        let retrieved = state.retrieve_status == RetrieveStatus::Retrieved;
        let line = format!("finish {} retrieved={retrieved}", token_of(state.data));
        self.script.lock().unwrap().log.push(line);
    }
    fn flbs(&self) -> Vec<FlbId> {
        self.flbs.clone()
    }
}

struct TestFlb(Shared);

impl Flb for TestFlb {
    fn compatible(&self) -> &'static str {
        "test-flb-v1"
    }
    fn preserve(&mut self) -> Result<Vec<u8>> {
        let mut s = self.0.lock().unwrap();
        s.log.push("flb preserve".into());
        if s.flb_fail_preserve {
            return Err(Errno::ENOMEM);
        }
        Ok(b"flb".to_vec())
    }
    fn unpreserve(&mut self, data: &[u8]) {
        assert_eq!(data, b"flb");
        self.0.lock().unwrap().log.push("flb unpreserve".into());
    }
    fn retrieve(&mut self, data: &[u8]) -> Result<()> {
        assert_eq!(data, b"flb");
        let mut s = self.0.lock().unwrap();
        s.log.push("flb retrieve".into());
        if s.flb_fail_retrieve {
            return Err(Errno::ENODEV);
        }
        Ok(())
    }
    fn finish(&mut self, _data: &[u8]) {
        self.0.lock().unwrap().log.push("flb finish".into());
    }
}

struct Fixture {
    store: Store,
    script: Shared,
    pipes: Rc<RefCell<Vec<OwnedFd>>>,
}

fn fixture() -> Fixture {
    let script = Shared::default();
    let mut store = Store::new();
    let flb = store
        .flbs
        .register(Box::new(TestFlb(script.clone())))
        .unwrap();
    let handler = PipeHandler {
        script: script.clone(),
        flbs: vec![flb],
    };
    store.register_handler(Box::new(handler)).unwrap();
    Fixture {
        store,
        script,
        pipes: Rc::default(),
    }
}

impl Fixture {
    /// A fresh pipe read end; the write end is kept open by the fixture.
    fn pipe(&self) -> OwnedFd {
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors pipe() writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: pipe() returned two fresh descriptors we now own.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        self.pipes.borrow_mut().push(w);
        r
    }
    fn ino(fd: &OwnedFd) -> u64 {
        fstat(fd.as_fd()).st_ino
    }
    fn log(&self) -> Vec<String> {
        std::mem::take(&mut self.script.lock().unwrap().log)
    }
    fn create(&mut self, name: &str) -> SessionId {
        self.store
            .create_session(SessionName::new(name.as_bytes()).unwrap())
            .unwrap()
    }
    fn preserve(&mut self, id: SessionId, token: u64, fd: &OwnedFd) -> Result<()> {
        self.store
            .preserve_fd(id, token, Ok(fd.try_clone().unwrap()))
    }
    fn update(&mut self) {
        self.store.freeze().unwrap();
        self.store.flip_epoch().unwrap();
    }
}

fn name(s: &str) -> SessionName {
    SessionName::new(s.as_bytes()).unwrap()
}

#[test]
fn duplicate_outgoing_name_is_eexist() {
    let mut f = fixture();
    f.create("a");
    assert_eq!(f.store.create_session(name("a")), Err(Errno::EEXIST));
}

#[test]
fn released_name_can_be_created_again() {
    let mut f = fixture();
    let id = f.create("a");
    f.store.release_session(id).unwrap();
    assert!(f.store.create_session(name("a")).is_ok());
}

#[test]
fn same_name_may_be_outgoing_and_incoming() {
    let mut f = fixture();
    f.create("a");
    f.update();
    let out = f.create("a");
    let inc = f.store.retrieve_session(&name("a")).unwrap();
    assert_ne!(out, inc);
    assert_eq!(f.store.direction(out).unwrap().0, Direction::Outgoing);
    assert_eq!(f.store.direction(inc).unwrap().0, Direction::Incoming);
}

#[test]
fn retrieve_unknown_is_enoent_and_twice_is_einval() {
    let mut f = fixture();
    assert_eq!(f.store.retrieve_session(&name("a")), Err(Errno::ENOENT));
    f.create("a");
    assert_eq!(
        f.store.retrieve_session(&name("a")),
        Err(Errno::ENOENT),
        "outgoing is not incoming"
    );
    f.update();
    f.store.retrieve_session(&name("a")).unwrap();
    assert_eq!(f.store.retrieve_session(&name("a")), Err(Errno::EINVAL));
}

#[test]
fn preserve_errno_order() {
    let mut f = fixture();
    let id = f.create("s");
    let p = f.pipe();
    f.preserve(id, 1, &p).unwrap();
    // Token check comes before the fd check.
    assert_eq!(
        f.store.preserve_fd(id, 1, Err(Errno::EBADF)),
        Err(Errno::EEXIST)
    );
    assert_eq!(
        f.store.preserve_fd(id, 2, Err(Errno::EBADF)),
        Err(Errno::EBADF)
    );
    // No handler for a regular file.
    let null = std::fs::File::open("/dev/null").unwrap();
    assert_eq!(
        f.store.preserve_fd(id, 3, Ok(null.into())),
        Err(Errno::ENOENT)
    );
    // Same object, other token or other session: EBUSY.
    assert_eq!(f.preserve(id, 4, &p), Err(Errno::EBUSY));
    let other = f.create("t");
    assert_eq!(f.preserve(other, 5, &p), Err(Errno::EBUSY));
}

#[test]
fn handler_preserve_failure_leaves_nothing_behind() {
    let mut f = fixture();
    let id = f.create("s");
    let p = f.pipe();
    f.script.lock().unwrap().fail_preserve = Some(Errno::ENOSPC);
    assert_eq!(f.preserve(id, 1, &p), Err(Errno::ENOSPC));
    assert_eq!(
        f.log(),
        [
            "flb preserve",
            &format!("preserve {}", Fixture::ino(&p)),
            "flb unpreserve"
        ]
    );
    f.script.lock().unwrap().fail_preserve = None;
    f.preserve(id, 1, &p).unwrap();
    assert_eq!(f.store.session(id).unwrap().files.len(), 1);
}

#[test]
fn flb_preserve_failure_fails_the_file() {
    let mut f = fixture();
    let id = f.create("s");
    f.script.lock().unwrap().flb_fail_preserve = true;
    assert_eq!(f.preserve(id, 1, &f.pipe()), Err(Errno::ENOMEM));
    assert!(f.store.session(id).unwrap().files.is_empty());
}

#[test]
fn release_outgoing_unpreserves_lifo_and_flb_last() {
    let mut f = fixture();
    let id = f.create("s");
    let (a, b) = (f.pipe(), f.pipe());
    f.preserve(id, 1, &a).unwrap();
    f.preserve(id, 2, &b).unwrap();
    f.log();
    f.store.release_session(id).unwrap();
    let (ia, ib) = (Fixture::ino(&a), Fixture::ino(&b));
    assert_eq!(
        f.log(),
        [
            format!("unpreserve {ib}"),
            format!("unpreserve {ia}"),
            "flb unpreserve".into()
        ]
    );
    assert!(f.store.session(id).is_none());
    // The files are free to be preserved again.
    let id = f.create("s");
    f.preserve(id, 1, &a).unwrap();
}

#[test]
fn flb_is_shared_across_sessions() {
    let mut f = fixture();
    let (s1, s2) = (f.create("1"), f.create("2"));
    f.preserve(s1, 1, &f.pipe()).unwrap();
    f.preserve(s2, 1, &f.pipe()).unwrap();
    assert_eq!(f.store.flbs.outgoing_count(FlbId(0)), 2);
    assert_eq!(f.log().iter().filter(|l| *l == "flb preserve").count(), 1);
    f.store.release_session(s1).unwrap();
    assert!(!f.log().contains(&"flb unpreserve".to_string()));
    f.store.release_session(s2).unwrap();
    assert!(f.log().contains(&"flb unpreserve".to_string()));
}

#[test]
fn session_kind_rules() {
    let mut f = fixture();
    let out = f.create("o");
    assert_eq!(
        f.store.finish(out),
        Ok(()),
        "finish on an empty set is a no-op in the store"
    );
    f.preserve(out, 1, &f.pipe()).unwrap();
    f.update();
    let inc = f.store.retrieve_session(&name("o")).unwrap();
    let p = f.pipe();
    assert_eq!(f.store.preserve_fd(inc, 9, Ok(p)), Err(Errno::EINVAL));
}

#[test]
fn freeze_failure_unfreezes_what_was_frozen_and_changes_nothing() {
    let mut f = fixture();
    let (s1, s2) = (f.create("1"), f.create("2"));
    let (a, b, c) = (f.pipe(), f.pipe(), f.pipe());
    f.preserve(s1, 1, &a).unwrap();
    f.preserve(s2, 1, &b).unwrap();
    f.preserve(s2, 2, &c).unwrap();
    f.log();
    f.script.lock().unwrap().fail_freeze_token = Some(Fixture::ino(&c));
    let err = f.store.freeze().unwrap_err();
    assert_eq!(err.errno, Errno::EAGAIN);
    assert_eq!(err.token, 2);
    let (ia, ib, ic) = (Fixture::ino(&a), Fixture::ino(&b), Fixture::ino(&c));
    assert_eq!(
        f.log(),
        [
            format!("freeze {ia}"),
            format!("freeze {ib}"),
            format!("freeze {ic}"),
            format!("unfreeze {ia}"),
            format!("unfreeze {ib}")
        ]
    );
    assert!(!f.store.is_frozen());
    assert_eq!(f.store.flip_epoch(), Err(Errno::EINVAL));
    // Still outgoing and still usable.
    f.preserve(s1, 7, &f.pipe()).unwrap();
}

#[test]
fn frozen_store_refuses_new_work_until_unfrozen() {
    let mut f = fixture();
    let id = f.create("s");
    f.store.freeze().unwrap();
    assert_eq!(f.store.create_session(name("t")), Err(Errno::EBUSY));
    assert_eq!(f.preserve(id, 1, &f.pipe()), Err(Errno::EBUSY));
    f.store.unfreeze();
    f.preserve(id, 1, &f.pipe()).unwrap();
}

#[test]
fn retrieve_fd_semantics() {
    let mut f = fixture();
    let id = f.create("s");
    let (a, b) = (f.pipe(), f.pipe());
    f.preserve(id, 10, &a).unwrap();
    f.preserve(id, 20, &b).unwrap();
    f.update();
    f.log();
    let inc = f.store.retrieve_session(&name("s")).unwrap();
    assert_eq!(f.store.retrieve_fd(inc, 99).err(), Some(Errno::ENOENT));
    // Any order; the same file twice.
    let first = fstat(f.store.retrieve_fd(inc, 20).unwrap()).st_ino;
    let again = fstat(f.store.retrieve_fd(inc, 20).unwrap()).st_ino;
    assert_eq!(first, Fixture::ino(&b));
    assert_eq!(first, again);
    assert_eq!(
        f.log(),
        [
            "flb retrieve".into(),
            format!("retrieve {}", Fixture::ino(&b))
        ],
        "retrieve runs once, after its FLB's"
    );
}

#[test]
fn failed_retrieve_fails_the_same_way_forever() {
    let mut f = fixture();
    let id = f.create("s");
    f.preserve(id, 1, &f.pipe()).unwrap();
    f.update();
    let inc = f.store.retrieve_session(&name("s")).unwrap();
    f.script.lock().unwrap().fail_retrieve = Some(Errno::ENOMEM);
    assert_eq!(f.store.retrieve_fd(inc, 1).err(), Some(Errno::ENOMEM));
    f.script.lock().unwrap().fail_retrieve = None;
    assert_eq!(f.store.retrieve_fd(inc, 1).err(), Some(Errno::ENOMEM));
}

#[test]
fn finish_is_atomic_and_covers_unretrieved_files() {
    let mut f = fixture();
    let id = f.create("s");
    let (a, b) = (f.pipe(), f.pipe());
    f.preserve(id, 1, &a).unwrap();
    f.preserve(id, 2, &b).unwrap();
    f.update();
    let inc = f.store.retrieve_session(&name("s")).unwrap();
    f.store.retrieve_fd(inc, 1).unwrap();
    f.store.flbs.get_incoming(FlbId(0)).unwrap();
    f.log();
    f.script.lock().unwrap().refuse_finish = true;
    assert_eq!(f.store.finish(inc), Err(Errno::EBUSY));
    assert!(f.log().is_empty(), "nothing finished");
    assert_eq!(f.store.session(inc).unwrap().files.len(), 2);
    f.script.lock().unwrap().refuse_finish = false;
    f.store.finish(inc).unwrap();
    let (ia, ib) = (Fixture::ino(&a), Fixture::ino(&b));
    assert_eq!(
        f.log(),
        [
            format!("finish {ib} retrieved=false"),
            format!("finish {ia} retrieved=true"),
            "flb finish".into()
        ]
    );
    // The session stays until its fd is closed.
    assert!(f.store.session(inc).is_some());
    f.store.release_session(inc).unwrap();
    assert!(f.store.session(inc).is_none());
}

#[test]
fn releasing_an_unfinishable_incoming_session_leaks_it() {
    let mut f = fixture();
    let id = f.create("s");
    f.preserve(id, 1, &f.pipe()).unwrap();
    f.update();
    let inc = f.store.retrieve_session(&name("s")).unwrap();
    f.script.lock().unwrap().refuse_finish = true;
    assert_eq!(f.store.release_session(inc), Err(Errno::EBUSY));
    assert!(f.store.session(inc).is_some());
    // It cannot be retrieved again, and the next update drops it.
    assert_eq!(f.store.retrieve_session(&name("s")), Err(Errno::EINVAL));
    f.update();
    assert_eq!(f.store.retrieve_session(&name("s")), Err(Errno::ENOENT));
}

#[test]
fn flb_retrieve_is_on_demand_and_remembered() {
    let mut f = fixture();
    assert_eq!(f.store.flbs.get_incoming(FlbId(0)), Err(Errno::ENODATA));
    let id = f.create("s");
    f.preserve(id, 1, &f.pipe()).unwrap();
    f.update();
    f.log();
    assert_eq!(f.store.flbs.incoming_count(FlbId(0)), 1);
    f.store.flbs.get_incoming(FlbId(0)).unwrap();
    f.store.flbs.get_incoming(FlbId(0)).unwrap();
    assert_eq!(f.log(), ["flb retrieve"]);
}

#[test]
fn update_moves_outgoing_to_incoming_and_bumps_epoch() {
    let mut f = fixture();
    f.create("a");
    assert_eq!(f.store.epoch(), 0);
    f.update();
    assert_eq!(f.store.epoch(), 1);
    assert!(f
        .store
        .sessions()
        .all(|s| s.direction == Direction::Incoming));
    // A new outgoing session with the same name is fine.
    f.create("a");
}

#[test]
fn duplicate_handler_or_flb_is_eexist() {
    let mut f = fixture();
    let h = PipeHandler {
        script: f.script.clone(),
        flbs: vec![],
    };
    assert_eq!(
        f.store.register_handler(Box::new(h)).err(),
        Some(Errno::EEXIST)
    );
    assert_eq!(
        f.store
            .flbs
            .register(Box::new(TestFlb(f.script.clone())))
            .err(),
        Some(Errno::EEXIST)
    );
}

#[test]
fn errno_formats_with_its_name() {
    assert_eq!(format!("{:?}", Errno::EBUSY), "EBUSY");
    assert!(Errno::EINVAL.to_string().starts_with("EINVAL ("));
    assert_eq!(
        Errno::from(std::io::Error::from_raw_os_error(libc::EBADF)),
        Errno::EBADF
    );
}

#[test]
fn crc32c_matches_the_standard_check_values() {
    use crate::image::crc32c;
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(b""), 0);
    // RFC 3720, B.4.
    assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    let ascending: Vec<u8> = (0..32).collect();
    assert_eq!(crc32c(&ascending), 0x46DD_794E);
}

#[test]
fn journal_refuses_corruption_anywhere_and_other_versions_but_drops_a_torn_tail() {
    let mut file = journal_header();
    assert_eq!(
        file[8..12],
        2u32.to_le_bytes(),
        "this build writes version 2"
    );
    file.extend(journal_record(b"one").unwrap());
    let second = file.len();
    file.extend(journal_record(b"two").unwrap());
    assert_eq!(read_journal(&file), Ok(vec![&b"one"[..], &b"two"[..]]));
    // A torn append: cut inside the last header, or inside its payload.
    assert_eq!(read_journal(&file[..second + 5]), Ok(vec![&b"one"[..]]));
    assert_eq!(read_journal(&file[..file.len() - 1]), Ok(vec![&b"one"[..]]));
    // A damaged last payload is not a torn tail: a torn write leaves a prefix.
    let mut bad = file.clone();
    *bad.last_mut().unwrap() ^= 1;
    assert_eq!(
        read_journal(&bad),
        Err(ImageError::Corrupted {
            record: 2,
            offset: second,
            what: "its payload checksum does not match"
        })
    );
    // A damaged length is caught by the header's own checksum, not believed.
    let mut bad = file.clone();
    bad[second] ^= 0x40;
    assert_eq!(
        read_journal(&bad),
        Err(ImageError::Corrupted {
            record: 2,
            offset: second,
            what: "its header checksum does not match"
        })
    );
    // A length over the limit is refused even with a header that checks.
    let mut huge = journal_header();
    huge.extend(journal_record(b"one").unwrap());
    let len = (MAX_RECORD as u32 + 1).to_le_bytes();
    let sum = crate::image::crc32c(b"x").to_le_bytes();
    let header_sum = crate::image::crc32c(&[len, sum].concat()).to_le_bytes();
    huge.extend([len, sum, header_sum].concat());
    huge.extend(b"x");
    assert_eq!(
        read_journal(&huge),
        Err(ImageError::Corrupted {
            record: 2,
            offset: second,
            what: "its length is over the 1 GiB limit"
        })
    );
    assert!(journal_record(&vec![0; MAX_RECORD + 1]).is_err());
    let mut v3 = file.clone();
    v3[8] = 3;
    assert_eq!(
        read_journal(&v3),
        Err(ImageError::UnknownVersion { found: 3 })
    );
    let mut reserved = file.clone();
    reserved[13] = 1;
    assert_eq!(read_journal(&reserved), Err(ImageError::BadHeader(0x100)));
    assert_eq!(
        read_journal(b"not a state file at all, no"),
        Err(ImageError::BadMagic)
    );
    // The first record (the snapshot) is never taken for a torn tail.
    assert_eq!(
        read_journal(&file[..second - 1]),
        Err(ImageError::Truncated {
            have: second - 1,
            want: second
        })
    );
    assert!(
        read_journal(&journal_header()).is_err(),
        "an empty journal is refused"
    );
    assert!(matches!(decode_image(b"{"), Err(ImageError::Payload(_))));
}

/// A version-1 journal as earlier builds wrote it: records of
/// `length u64 | FNV-1a-64 of payload | payload`.
fn v1_journal(payloads: &[&[u8]]) -> Vec<u8> {
    fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }
    assert_eq!(
        fnv1a(b"a"),
        0xaf63_dc4c_8601_ec8c,
        "the FNV-1a-64 test vector"
    );
    let mut out = b"LUOSTATE".to_vec();
    out.extend(1u32.to_le_bytes());
    out.extend(0u32.to_le_bytes());
    for p in payloads {
        out.extend((p.len() as u64).to_le_bytes());
        out.extend(fnv1a(p).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

#[test]
fn a_version_1_journal_still_loads_with_its_own_rules() {
    let file = v1_journal(&[b"one", b"two", b"three"]);
    let all = vec![&b"one"[..], &b"two"[..], &b"three"[..]];
    assert_eq!(read_journal(&file), Ok(all.clone()));
    // Its rules, unchanged: a torn or garbled last record is dropped...
    assert_eq!(read_journal(&file[..file.len() - 1]), Ok(all[..2].to_vec()));
    let mut torn = file.clone();
    *torn.last_mut().unwrap() ^= 1;
    assert_eq!(read_journal(&torn), Ok(all[..2].to_vec()));
    // ... a garbled payload with data after it is refused...
    let mut bad = file.clone();
    bad[16 + 16] ^= 1;
    assert_eq!(read_journal(&bad), Err(ImageError::Checksum));
    // ... and a garbled length cannot be told from a torn tail: version 1's
    // weakness, the reason for version 2.
    let mut length = file.clone();
    length[16 + 16 + 3 + 1] ^= 1;
    assert_eq!(read_journal(&length), Ok(all[..1].to_vec()));
    let mut only = v1_journal(&[b"snapshot"]);
    *only.last_mut().unwrap() ^= 1;
    assert_eq!(read_journal(&only), Err(ImageError::Checksum));
}

#[test]
fn changes_are_tracked_per_file() {
    let mut f = fixture();
    let a = f.create("a");
    let b = f.create("b");
    let c = f.store.take_changes();
    assert!(c.changed[&a].whole && c.changed[&b].whole);
    let p = f.pipe();
    f.preserve(a, 1, &p).unwrap();
    f.store.release_session(b).unwrap();
    let c = f.store.take_changes();
    assert_eq!(
        c.changed[&a],
        Dirty {
            whole: false,
            files: [1].into()
        }
    );
    assert!(!c.changed.contains_key(&b));
    assert_eq!(c.removed, [b].into());
    assert!(f.store.take_changes().is_empty());
    f.update();
    assert!(f.store.take_changes().changed[&a].whole);
}

#[test]
fn a_delta_brings_an_older_session_image_up_to_date() {
    let mut f = fixture();
    let a = f.create("a");
    let (p1, p2, p3) = (f.pipe(), f.pipe(), f.pipe());
    f.preserve(a, 1, &p1).unwrap();
    let (mut old, _) = f.store.session_image(a).unwrap();
    f.store.take_changes();
    f.preserve(a, 2, &p2).unwrap();
    f.preserve(a, 3, &p3).unwrap();
    assert_eq!(f.preserve(a, 2, &p3), Err(Errno::EEXIST));
    assert_eq!(f.preserve(a, 4, &p3), Err(Errno::EBUSY));
    let c = f.store.take_changes();
    let (delta, fds) = f.store.session_delta(a, &c.changed[&a].files).unwrap();
    assert_eq!(delta.gone, vec![4]);
    assert_eq!(fds.len(), 2);
    old.apply(delta);
    assert_eq!(old, f.store.session_image(a).unwrap().0);

    // Retrieval changes one file in place.
    f.update();
    f.store.take_changes();
    let (mut old, _) = f.store.session_image(a).unwrap();
    f.store
        .retrieve_session(&SessionName::new(b"a").unwrap())
        .unwrap();
    f.store.retrieve_fd(a, 2).unwrap();
    let c = f.store.take_changes();
    let (delta, _) = f.store.session_delta(a, &c.changed[&a].files).unwrap();
    assert_eq!(delta.files.len(), 1);
    old.apply(delta);
    assert_eq!(old, f.store.session_image(a).unwrap().0);
}

#[test]
fn image_round_trips_sessions_files_and_flbs() {
    let mut f = fixture();
    let out = f.create("out");
    let (a, b) = (f.pipe(), f.pipe());
    f.preserve(out, 1, &a).unwrap();
    f.update();
    let inc = f.store.retrieve_session(&name("out")).unwrap();
    f.store.retrieve_fd(inc, 1).unwrap();
    let out2 = f.create("out");
    f.preserve(out2, 2, &b).unwrap();

    let (image, fds) = f.store.to_image();
    let mut kept: std::collections::HashMap<String, OwnedFd> = fds
        .into_iter()
        .map(|(k, fd)| (k, fd.try_clone_to_owned().unwrap()))
        .collect();
    let image = decode_image(&encode_image(&image)).unwrap();

    let mut g = fixture();
    g.store.load_image(&image, &mut |k| kept.remove(k)).unwrap();
    assert!(kept.is_empty(), "every fd was claimed");
    assert_eq!(g.store.epoch(), 1);
    assert_eq!(g.store.flbs.outgoing_count(FlbId(0)), 1);
    assert_eq!(g.store.flbs.incoming_count(FlbId(0)), 1);
    // Same ids, names, directions; the preserved index is rebuilt.
    assert_eq!(g.store.direction(inc).unwrap(), (Direction::Incoming, true));
    assert_eq!(
        g.store.direction(out2).unwrap(),
        (Direction::Outgoing, false)
    );
    assert_eq!(g.preserve(out2, 3, &b), Err(Errno::EBUSY));
    assert_eq!(g.store.create_session(name("out")), Err(Errno::EEXIST));
    assert_eq!(g.store.retrieve_session(&name("out")), Err(Errno::EINVAL));
    let again = fstat(g.store.retrieve_fd(inc, 1).unwrap()).st_ino;
    assert_eq!(again, Fixture::ino(&a));
    // New sessions do not reuse ids.
    let fresh = g.create("fresh");
    assert!(fresh.0 > out2.0);
}

#[test]
fn image_with_a_missing_fd_or_handler_is_refused() {
    let mut f = fixture();
    let id = f.create("s");
    f.preserve(id, 1, &f.pipe()).unwrap();
    let (image, _) = f.store.to_image();
    let mut g = fixture();
    assert!(matches!(
        g.store.load_image(&image, &mut |_| None),
        Err(ImageError::MissingFd(_))
    ));
    assert_eq!(g.store.sessions().count(), 0, "nothing half-loaded");
    let mut bad = image.clone();
    bad.sessions[0].files[0].handler = "nope-v9".into();
    let mut h = fixture();
    assert_eq!(
        h.store.load_image(&bad, &mut |_| None),
        Err(ImageError::UnknownHandler("nope-v9".into()))
    );
}

/// A complete journal of three records, and the payloads.
fn three_record_journal() -> (Vec<u8>, [&'static [u8]; 3]) {
    let payloads: [&'static [u8]; 3] = [b"{\"full\":true,\"sessions\":[1,2,3]}", b"two", b"three!"];
    let mut file = journal_header();
    for p in payloads {
        file.extend(journal_record(p).unwrap());
    }
    (file, payloads)
}

#[test]
fn every_single_bit_flip_in_a_complete_journal_is_refused() {
    let (file, payloads) = three_record_journal();
    assert_eq!(read_journal(&file), Ok(payloads.to_vec()));
    for bit in 0..file.len() * 8 {
        let mut bad = file.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let got = read_journal(&bad);
        assert!(
            got.is_err(),
            "bit {} of byte {} flipped: loaded {} of 3 records instead of refusing",
            bit % 8,
            bit / 8,
            got.map_or(0, |r| r.len())
        );
    }
}

#[test]
fn a_journal_cut_short_loads_its_complete_records_and_never_less_than_the_first() {
    let (file, payloads) = three_record_journal();
    let header = journal_header().len();
    let mut ends = Vec::new();
    let mut at = header;
    for p in payloads {
        at += journal_record(p).unwrap().len();
        ends.push(at);
    }
    assert_eq!(at, file.len());
    for len in 0..=file.len() {
        let got = read_journal(&file[..len]);
        // Complete records before the cut.
        let complete = ends.iter().filter(|&&e| e <= len).count();
        if complete == 0 {
            // In the file header or the first record (the snapshot, written
            // in one piece before the file is renamed into place).
            assert!(got.is_err(), "cut at {len}: {got:?}");
        } else {
            // Inside a later record: what an interrupted append leaves. At a
            // record boundary: whole records gone, indistinguishable from a
            // journal that had fewer.
            assert_eq!(got, Ok(payloads[..complete].to_vec()), "cut at {len}");
        }
    }
}

// ---- Owners and limits ----------------------------------------------------

fn owner(uid: u32, tree: u64) -> Option<Owner> {
    Some(Owner {
        uid,
        tree: Some(Tree {
            token: tree,
            pid: 4200 + tree as i32,
            comm: "vmm".into(),
        }),
    })
}

impl Fixture {
    fn create_as(&mut self, name_: &str, owner: Option<Owner>) -> Result<SessionId> {
        self.store.create_session_as(name(name_), owner)
    }
}

fn limits(sessions_per_uid: usize, sessions_per_tree: usize, files: usize) -> Limits {
    Limits {
        sessions_per_uid,
        files_per_uid: files,
        sessions_per_tree,
        files_per_tree: usize::MAX,
    }
}

#[test]
fn sessions_are_limited_per_uid_and_per_tree_and_root_and_unknown_owners_are_not() {
    let mut f = fixture();
    f.store.set_limits(limits(2, 3, usize::MAX));
    let first = f.create_as("a1", owner(1000, 7)).unwrap();
    f.create_as("a2", owner(1000, 7)).unwrap();
    assert_eq!(f.create_as("a3", owner(1000, 9)), Err(Errno::EMFILE));
    let refusal = f.store.take_refusal().unwrap();
    assert_eq!(refusal.scope, Scope::Uid { limit: 2 });
    assert_eq!(refusal.resource, Resource::Sessions);
    assert_eq!(
        refusal.to_string(),
        "luo run tree of pid 4209 `vmm`, uid 1000 is at its limit of 2 sessions per uid; \
         refused with EMFILE"
    );
    assert_eq!(f.store.sessions().count(), 2, "nothing was created");
    // A name in use is EEXIST first, as without limits.
    assert_eq!(f.create_as("a1", owner(1000, 7)), Err(Errno::EEXIST));
    assert!(f.store.refusal().is_none());

    // Another uid in the same tree: the tree's third session, then its limit.
    f.create_as("b1", owner(1001, 7)).unwrap();
    assert_eq!(f.create_as("b2", owner(1001, 7)), Err(Errno::EMFILE));
    let refusal = f.store.take_refusal().unwrap();
    assert_eq!(refusal.scope, Scope::Tree { limit: 3 });
    assert_eq!(
        refusal.to_string(),
        "luo run tree of pid 4207 `vmm` is at its limit of 3 sessions per tree (uid 1001 \
         asked); refused with EMFILE"
    );
    // In another tree it may.
    f.create_as("b2", owner(1001, 8)).unwrap();
    // Root and sessions of unknown owners are never limited nor counted.
    for i in 0..5 {
        f.create_as(&format!("r{i}"), owner(0, 7)).unwrap();
        f.create_as(&format!("u{i}"), None).unwrap();
    }
    assert_eq!(f.store.charged_to_tree(7).sessions, 3);
    // A released session makes room again.
    f.store.release_session(first).unwrap();
    f.create_as("a3", owner(1000, 7)).unwrap();
}

#[test]
fn a_file_is_charged_to_the_sessions_owner_and_a_refused_one_is_never_taken() {
    let mut f = fixture();
    f.store.set_limits(limits(usize::MAX, usize::MAX, 2));
    let s = f.create_as("s", owner(1000, 7)).unwrap();
    f.preserve(s, 1, &f.pipe()).unwrap();
    f.preserve(s, 2, &f.pipe()).unwrap();
    let mut taken = false;
    let refused = f.store.preserve_fd_with(s, 3, |_| {
        taken = true;
        Err(Errno::EBADF)
    });
    assert_eq!(refused, Err(Errno::ENOSPC));
    assert!(!taken, "the caller's fd is not taken");
    let refusal = f.store.take_refusal().unwrap();
    assert_eq!(
        (refusal.resource, refusal.scope),
        (Resource::Files, Scope::Uid { limit: 2 })
    );
    // The checks before the limit's keep their errno.
    assert_eq!(f.preserve(s, 2, &f.pipe()), Err(Errno::EEXIST));
    assert_eq!(
        f.store.charged_to_uid(1000),
        Count {
            sessions: 1,
            files: 2,
            fds: 2
        }
    );
    assert_eq!(
        f.store.session(s).unwrap().files.len(),
        2,
        "nothing changed"
    );
    // Root's sessions hold any number, whoever preserves into them.
    let r = f.create_as("r", owner(0, 7)).unwrap();
    for token in 0..5 {
        f.preserve(r, token, &f.pipe()).unwrap();
    }
    assert_eq!(f.store.charged_to_tree(7).files, 2);
    assert_eq!(f.store.held_fds(), 7);
}

#[test]
fn files_of_limited_owners_are_budgeted_two_fds_each_against_the_room_left() {
    let mut f = fixture();
    let s = f.create_as("s", owner(1000, 7)).unwrap();
    f.store.set_fd_room(Some(3));
    // Nothing held: the new file may come to need 2.
    f.preserve(s, 1, &f.pipe()).unwrap();
    // One to come (retrieved after an update), 2 for the new one.
    f.preserve(s, 2, &f.pipe()).unwrap();
    // Two to come, 2 for the new one.
    assert_eq!(f.preserve(s, 3, &f.pipe()), Err(Errno::ENOSPC));
    let refusal = f.store.take_refusal().unwrap();
    assert_eq!(refusal.scope, Scope::Fds { room: 3, need: 4 });
    f.store.set_fd_room(Some(4));
    f.preserve(s, 3, &f.pipe()).unwrap();
    // Root is never refused for room.
    let r = f.create_as("r", owner(0, 7)).unwrap();
    f.store.set_fd_room(Some(0));
    f.preserve(r, 1, &f.pipe()).unwrap();
}

#[test]
fn what_an_owner_holds_follows_release_update_retrieve_finish_and_reload() {
    let mut f = fixture();
    let held = |f: &Fixture| f.store.charged_to_uid(1000);
    let count = |sessions, files, fds| Count {
        sessions,
        files,
        fds,
    };
    let s = f.create_as("s", owner(1000, 7)).unwrap();
    f.preserve(s, 1, &f.pipe()).unwrap();
    f.preserve(s, 2, &f.pipe()).unwrap();
    f.store.release_session(s).unwrap();
    assert_eq!(held(&f), count(0, 0, 0));
    assert_eq!(f.store.held_fds(), 0);

    let s = f.create_as("s", owner(1000, 7)).unwrap();
    f.preserve(s, 1, &f.pipe()).unwrap();
    f.preserve(s, 2, &f.pipe()).unwrap();
    f.update();
    // The incoming session keeps its owner and its charge.
    assert_eq!(f.store.session(s).unwrap().owner, owner(1000, 7));
    assert_eq!(held(&f), count(1, 2, 2));
    let inc = f.store.retrieve_session(&name("s")).unwrap();
    assert_eq!(f.store.fds_to_come(), 2, "two files, each may be retrieved");
    f.store.retrieve_fd(inc, 1).unwrap();
    f.store.retrieve_fd(inc, 1).unwrap();
    assert_eq!(held(&f), count(1, 2, 3));
    assert_eq!(f.store.fds_to_come(), 1, "one file not retrieved yet");

    // A reloaded store has the owners and counts them again.
    let (image, fds) = f.store.to_image();
    let mut kept: std::collections::HashMap<String, OwnedFd> = fds
        .into_iter()
        .map(|(k, fd)| (k, fd.try_clone_to_owned().unwrap()))
        .collect();
    let image = decode_image(&encode_image(&image)).unwrap();
    let mut g = fixture();
    g.store.load_image(&image, &mut |k| kept.remove(k)).unwrap();
    assert_eq!(g.store.session(inc).unwrap().owner, owner(1000, 7));
    assert_eq!(g.store.charged_to_uid(1000), count(1, 2, 3));
    assert_eq!(g.store.charged_to_tree(7), count(1, 2, 3));
    assert_eq!(g.store.held_fds(), 3);

    f.store.finish(inc).unwrap();
    assert_eq!(held(&f), count(1, 0, 0));
    f.store.release_session(inc).unwrap();
    assert_eq!(held(&f), count(0, 0, 0));
    assert_eq!(f.store.held_fds(), 0);
}

#[test]
fn a_file_rebuilt_late_is_carried_then_retrieved_as_any_other() {
    let mut f = fixture();
    let s = f.create_as("s", owner(0, 7)).unwrap();
    f.preserve(s, 1, &f.pipe()).unwrap();
    f.preserve(s, 2, &f.pipe()).unwrap();
    f.update();
    // As a kexec leaves a file whose memfd could not be rebuilt yet.
    let (mut image, fds) = f.store.to_image();
    let mut kept: std::collections::HashMap<String, OwnedFd> = fds
        .into_iter()
        .map(|(k, fd)| (k, fd.try_clone_to_owned().unwrap()))
        .collect();
    image.sessions[0].files[1].has_carried = false;
    let mut g = fixture();
    g.store.load_image(&image, &mut |k| kept.remove(k)).unwrap();
    assert_eq!(g.store.held_fds(), 1);
    let inc = g.store.retrieve_session(&name("s")).unwrap();
    assert_eq!(
        g.store.carry(SessionId(999), 2, g.pipe()),
        Err(Errno::EBADF)
    );
    assert_eq!(g.store.carry(inc, 9, g.pipe()), Err(Errno::ENOENT));
    assert_eq!(
        g.store.carry(inc, 1, g.pipe()),
        Err(Errno::EINVAL),
        "it has one"
    );
    g.store.take_changes();
    g.store.carry(inc, 2, g.pipe()).unwrap();
    assert!(
        g.store.take_changes().changed.contains_key(&inc),
        "the new fd is journaled"
    );
    assert_eq!(
        g.store.carry(inc, 2, g.pipe()),
        Err(Errno::EINVAL),
        "only once"
    );
    assert_eq!(g.store.held_fds(), 2);
    g.store.retrieve_fd(inc, 2).unwrap();
    assert_eq!(g.store.held_fds(), 3);
    let out = g.create("out");
    assert_eq!(
        g.store.carry(out, 1, g.pipe()),
        Err(Errno::EINVAL),
        "outgoing"
    );
}

#[test]
fn a_refused_freeze_names_the_sessions_owner() {
    let mut f = fixture();
    let s = f.create_as("vm", owner(65534, 0x77)).unwrap();
    let p = f.pipe();
    f.preserve(s, 0x77, &p).unwrap();
    f.script.lock().unwrap().fail_freeze_token = Some(Fixture::ino(&p));
    let err = f.store.freeze().unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "session vm (luo run tree of pid {} `vmm`, uid 65534) token 0x77 (pipe-test-v1) \
             refused the freeze: EAGAIN (Resource temporarily unavailable (os error 11))",
            4200 + 0x77
        )
    );
    let legacy = f.create("old");
    let q = f.pipe();
    f.preserve(legacy, 1, &q).unwrap();
    f.script.lock().unwrap().fail_freeze_token = Some(Fixture::ino(&q));
    let err = f.store.freeze().unwrap_err();
    assert!(err
        .to_string()
        .starts_with("session old (owner unknown) token 0x1"));
}

#[test]
fn a_session_image_written_before_owners_were_recorded_loads_with_no_owner() {
    let old = br#"{"id":3,"name":[118,109],"incoming":false,"retrieved":false,"files":[]}"#;
    let image: SessionImage = serde_json::from_slice(old).unwrap();
    assert_eq!(image.owner, None);
    let tree_unknown = br#"{"uid":65534}"#;
    let owner: Owner = serde_json::from_slice(tree_unknown).unwrap();
    assert_eq!(owner.to_string(), "uid 65534");
}

#[test]
fn retrieving_a_file_retrieves_its_flb_first_and_once() {
    let mut f = fixture();
    let id = f.create("s");
    let (a, b) = (f.pipe(), f.pipe());
    f.preserve(id, 1, &a).unwrap();
    f.preserve(id, 2, &b).unwrap();
    f.update();
    f.log();
    let inc = f.store.retrieve_session(&name("s")).unwrap();
    f.store.retrieve_fd(inc, 1).unwrap();
    f.store.retrieve_fd(inc, 2).unwrap();
    let log = f.log();
    assert_eq!(log.iter().filter(|l| *l == "flb retrieve").count(), 1);
    assert_eq!(log[0], "flb retrieve", "before any file: {log:?}");
}

#[test]
fn a_failed_flb_retrieve_fails_the_files_that_need_it_for_good() {
    let mut f = fixture();
    let id = f.create("s");
    f.preserve(id, 1, &f.pipe()).unwrap();
    f.update();
    f.script.lock().unwrap().flb_fail_retrieve = true;
    let inc = f.store.retrieve_session(&name("s")).unwrap();
    assert_eq!(f.store.retrieve_fd(inc, 1).err(), Some(Errno::ENODEV));
    f.script.lock().unwrap().flb_fail_retrieve = false;
    assert_eq!(f.store.retrieve_fd(inc, 1).err(), Some(Errno::ENODEV));
}

#[test]
fn a_preserve_can_ask_where_another_file_is_preserved() {
    let mut f = fixture();
    let id = f.create("s");
    let (a, b) = (f.pipe(), f.pipe());
    f.preserve(id, 7, &a).unwrap();
    let st = fstat(a.as_fd());
    let fid = FileId {
        dev: st.st_dev,
        ino: st.st_ino,
    };
    let mut seen = None;
    f.store
        .preserve_fd_with(id, 8, |lookup| {
            seen = lookup.outgoing(fid).map(|(n, t)| (n.to_string(), t));
            assert!(lookup.takes(b.as_fd()));
            Ok(b.try_clone().unwrap())
        })
        .unwrap();
    assert_eq!(seen, Some(("s".to_string(), 7)));
    // Once carried across an update it is no longer outgoing.
    f.update();
    let c = f.pipe();
    let out = f.create("t");
    f.store
        .preserve_fd_with(out, 1, |lookup| {
            seen = lookup.outgoing(fid).map(|(n, t)| (n.to_string(), t));
            Ok(c.try_clone().unwrap())
        })
        .unwrap();
    assert_eq!(seen, None);
}
