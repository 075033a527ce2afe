//! Unit tests of the daemon's decisions that need no mount: a request's
//! fields in, an [`Answer`] or a state change out.

use luo_store::Errno;
use zerocopy::{FromBytes, IntoBytes};

use super::event_loop::TOKEN_LISTENER_BASE;
use super::fuse_ops::{changes_state, cuse_init_answer, init_answer, listxattr, xattr_value};
use super::node::{slot_number, DeviceNode, DEVICE_INO, ROOT_INO};
use super::pool::SLOT_BASE;
use super::trap::Runs;
use crate::caller::owners::TreeRoot;
use crate::control::SOCKET_XATTR;
use crate::persist::Header;
use crate::wire::abi::{
    CuseInitIn, CuseInitOut, GetxattrOut, InitIn, InitOut, SetattrIn, FATTR_GID, FATTR_MODE,
    FATTR_UID, KERNEL_MINOR_VERSION, KERNEL_VERSION,
};
use crate::wire::fuse::{Answer, Op};

fn body(answer: Answer) -> Vec<u8> {
    match answer {
        Answer::Ok(body) => body,
        Answer::Err(e) => panic!("expected success, got {e}"),
    }
}

fn node() -> DeviceNode {
    DeviceNode::from_header(&Header {
        next_fh: 5,
        device_mode: 0o600,
        ..Header::default()
    })
}

#[test]
fn the_device_opens_once_at_a_time() {
    let mut n = node();
    assert_eq!(n.open(), Some(5));
    assert_eq!(n.open(), None, "a second open while the first is held");
    n.release(4);
    assert_eq!(n.open(), None, "releasing another handle frees nothing");
    n.release(5);
    assert_eq!(n.open(), Some(6), "handles are never reused");
}

#[test]
fn chmod_and_chown_change_only_what_they_name() {
    let mut n = node();
    let mut s = SetattrIn {
        valid: FATTR_MODE,
        mode: 0o100_666 | 0o4000,
        uid: 7,
        ..Default::default()
    };
    n.set(&s);
    let attr = n.attr(DEVICE_INO, false).expect("the device");
    assert_eq!(attr.mode, libc::S_IFREG | 0o4666, "type bits dropped");
    assert_eq!((attr.uid, attr.gid), (0, 0), "uid not valid, not taken");
    s.valid = FATTR_UID | FATTR_GID;
    s.gid = 8;
    n.set(&s);
    let attr = n.attr(DEVICE_INO, false).expect("the device");
    assert_eq!((attr.uid, attr.gid, attr.mode & 0o7777), (7, 8, 0o4666));
}

#[test]
fn inodes_are_the_root_the_device_and_session_files() {
    let n = node();
    let root = n.attr(ROOT_INO, false).expect("root");
    assert_eq!(root.mode, libc::S_IFDIR | 0o755);
    let slot = n.attr(SLOT_BASE + 3, true).expect("a session file");
    assert_eq!((slot.mode, slot.uid), (libc::S_IFREG | 0o600, 0));
    assert!(n.attr(SLOT_BASE + 4, false).is_none(), "not a session file");
}

#[test]
fn session_files_are_named_s_and_a_number() {
    assert_eq!(slot_number(b"s0"), Some(0));
    assert_eq!(slot_number(b"s17"), Some(17));
    for bad in [&b"s"[..], b"x1", b"s-1", b"s1x", b"liveupdate", b"\xff"] {
        assert_eq!(slot_number(bad), None, "{bad:?}");
    }
    let at_base = format!("s{SLOT_BASE}");
    assert_eq!(slot_number(at_base.as_bytes()), None, "past the slot range");
}

#[test]
fn the_device_node_survives_the_journal_header() {
    let mut n = node();
    n.set(&SetattrIn {
        valid: FATTR_MODE | FATTR_UID,
        mode: 0o660,
        uid: 3,
        ..Default::default()
    });
    n.created_device = true;
    let fh = n.open().expect("free");
    let mut header = Header::default();
    n.save_into(&mut header);
    assert_eq!(header.device_holder, Some(fh));
    let back = DeviceNode::from_header(&header);
    assert_eq!(
        back.attr(DEVICE_INO, false).map(|a| a.mode),
        Some(libc::S_IFREG | 0o660)
    );
    assert_eq!(back.device_owner, (3, 0));
    assert!(back.created_device);
    assert_eq!(back.next_fh, fh + 1, "handles go on where they stopped");
}

#[test]
fn luo_run_trees_survive_the_journal_header() {
    let mut header = Header {
        next_listener: TOKEN_LISTENER_BASE + 9,
        ..Header::default()
    };
    header
        .trees
        .insert(TOKEN_LISTENER_BASE + 2, TreeRoot::of(1));
    let runs = Runs::from_header(&header);
    let mut again = Header::default();
    runs.save_into(&mut again);
    assert_eq!(again.next_listener, header.next_listener);
    assert_eq!(again.trees, header.trees);
    assert!(again.listeners.is_empty(), "listeners come from the keeper");
}

#[test]
fn xattr_values_follow_the_callers_buffer() {
    let value = b"/run/luo/control.sock";
    let size = GetxattrOut::read_from_bytes(&body(xattr_value(0, value))).expect("a size");
    assert_eq!(size.size as usize, value.len());
    assert_eq!(xattr_value(4, value), Answer::Err(Errno::ERANGE));
    assert_eq!(body(xattr_value(4096, value)), value);
    let mut listed = SOCKET_XATTR.as_bytes().to_vec();
    listed.push(0);
    assert_eq!(body(listxattr(DEVICE_INO, 4096)), listed);
    assert_eq!(body(listxattr(ROOT_INO, 4096)), b"");
}

#[test]
fn init_agrees_on_the_older_minor_and_refuses_another_major() {
    let init = InitIn {
        major: KERNEL_VERSION,
        minor: KERNEL_MINOR_VERSION + 5,
        max_readahead: 1 << 16,
        flags: 0,
    };
    let out = InitOut::read_from_bytes(&body(init_answer(init, false))).expect("an init reply");
    assert_eq!(
        (out.major, out.minor),
        (KERNEL_VERSION, KERNEL_MINOR_VERSION)
    );
    assert_eq!(out.max_readahead, 1 << 16);
    let old = InitIn {
        major: KERNEL_VERSION - 1,
        ..init
    };
    assert_eq!(init_answer(old, false), Answer::Err(Errno::EPROTO));
}

#[test]
fn cuse_init_names_the_device() {
    let init = CuseInitIn {
        major: KERNEL_VERSION,
        minor: 31,
        ..Default::default()
    };
    let bytes = body(cuse_init_answer(init, "liveupdate"));
    let (out, info) = CuseInitOut::read_from_prefix(&bytes).expect("a CUSE init reply");
    assert_eq!(out.flags, 1, "CUSE_UNRESTRICTED_IOCTL");
    assert_eq!(info, b"DEVNAME=liveupdate\0");
    let old = CuseInitIn { major: 6, ..init };
    assert_eq!(cuse_init_answer(old, "x"), Answer::Err(Errno::EPROTO));
}

#[test]
fn only_requests_that_change_state_are_saved() {
    assert!(changes_state(&Op::Lookup {
        name: b"s1".to_vec()
    }));
    assert!(changes_state(&Op::Open(Default::default())));
    for op in [Op::Getattr, Op::Statfs, Op::Flush, Op::Readdir] {
        assert!(!changes_state(&op), "{op:?}");
    }
    let ioctl = |cmd| {
        Op::Ioctl(crate::wire::abi::IoctlIn {
            cmd,
            ..Default::default()
        })
    };
    for cmd in [crate::uapi::PRESERVE_FD, crate::uapi::FINISH] {
        assert!(changes_state(&ioctl(cmd)), "{cmd:#x}");
    }
    for cmd in [crate::uapi::GET_NAME, crate::uapi::io(0xBA, 0x3f)] {
        assert!(!changes_state(&ioctl(cmd)), "{cmd:#x}");
    }
    assert_eq!(Answer::of(&42u32), Answer::Ok(42u32.as_bytes().to_vec()));
}
