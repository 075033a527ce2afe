//! memfd handler tests against real memfds, tmpfs files and hugetlbfs.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use luo_store::{Errno, SessionName, Store};

use crate::register_all;

fn memfd(name: &str, flags: u32) -> std::io::Result<File> {
    let name = CString::new(name).unwrap();
    // SAFETY: name is a valid C string; memfd_create takes no other pointers.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a fresh descriptor that we own.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn store() -> Store {
    let mut s = Store::new();
    register_all(&mut s).unwrap();
    s
}

fn dup(f: &File) -> luo_store::Result<OwnedFd> {
    Ok(f.as_fd().try_clone_to_owned()?)
}

fn seals(f: &File) -> i32 {
    // SAFETY: F_GET_SEALS takes no pointer.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) }
}

fn update(s: &mut Store) {
    s.freeze().unwrap();
    s.flip_epoch().unwrap();
}

fn name(n: &str) -> SessionName {
    SessionName::new(n.as_bytes()).unwrap()
}

#[test]
fn memfd_round_trip_keeps_contents_size_position_and_seals() {
    let mut s = store();
    let id = s.create_session(name("vm")).unwrap();
    let mut f = memfd("guest-ram", libc::MFD_ALLOW_SEALING).unwrap();
    let data: Vec<u8> = (0..3 * 4096 + 17).map(|i| (i % 251) as u8).collect();
    f.write_all(&data).unwrap();
    let wanted = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    // SAFETY: F_ADD_SEALS takes an integer argument.
    let added = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, wanted) };
    assert_eq!(added, 0);
    s.preserve_fd(id, 7, dup(&f)).unwrap();
    // The position moves after preserve; freeze records the new one.
    f.seek(SeekFrom::Start(100)).unwrap();
    update(&mut s);
    drop(f);

    let inc = s.retrieve_session(&name("vm")).unwrap();
    let got = File::from(s.retrieve_fd(inc, 7).unwrap().try_clone_to_owned().unwrap());
    let mut g = got.try_clone().unwrap();
    assert_eq!(g.stream_position().unwrap(), 100);
    assert_eq!(g.metadata().unwrap().len(), data.len() as u64);
    assert_eq!(seals(&got), libc::F_SEAL_SHRINK | libc::F_SEAL_GROW);
    let mut back = Vec::new();
    g.seek(SeekFrom::Start(0)).unwrap();
    g.read_to_end(&mut back).unwrap();
    assert_eq!(back, data);
    // Read-write, and a new open file description.
    // SAFETY: F_GETFL takes no pointer.
    let fl = unsafe { libc::fcntl(got.as_raw_fd(), libc::F_GETFL) };
    assert_eq!(fl & libc::O_ACCMODE, libc::O_RDWR);
}

#[test]
fn memfd_without_allow_sealing_keeps_seal_seal() {
    let mut s = store();
    let id = s.create_session(name("s")).unwrap();
    let f = memfd("x", 0).unwrap();
    s.preserve_fd(id, 1, dup(&f)).unwrap();
    update(&mut s);
    let inc = s.retrieve_session(&name("s")).unwrap();
    let got = File::from(s.retrieve_fd(inc, 1).unwrap().try_clone_to_owned().unwrap());
    assert_eq!(seals(&got), libc::F_SEAL_SEAL);
}

#[test]
fn same_inode_through_another_open_is_ebusy() {
    let mut s = store();
    let id = s.create_session(name("s")).unwrap();
    let f = memfd("x", 0).unwrap();
    s.preserve_fd(id, 1, dup(&f)).unwrap();
    let reopened = File::options()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .unwrap();
    assert_eq!(s.preserve_fd(id, 2, Ok(reopened.into())), Err(Errno::EBUSY));
}

#[test]
fn size_change_after_preserve_refuses_the_freeze() {
    let mut s = store();
    let id = s.create_session(name("s")).unwrap();
    let f = memfd("x", 0).unwrap();
    f.set_len(4096).unwrap();
    s.preserve_fd(id, 0x42, dup(&f)).unwrap();
    f.set_len(8192).unwrap();
    let err = s.freeze().unwrap_err();
    assert_eq!(
        (err.errno, err.token, err.compatible),
        (Errno::EPERM, 0x42, "memfd-v1")
    );
    f.set_len(4096).unwrap();
    s.freeze().unwrap();
}

#[test]
fn unlinked_tmpfs_file_is_accepted_linked_one_is_not() {
    let mut s = store();
    let id = s.create_session(name("s")).unwrap();
    let dir = std::env::temp_dir();
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() { shm } else { dir.as_path() };
    let path = base.join(format!("luo-handler-test-{}", std::process::id()));
    let f = File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let linked = s.preserve_fd(id, 1, dup(&f));
    std::fs::remove_file(&path).unwrap();
    if base == shm {
        assert_eq!(
            linked,
            Err(Errno::ENOENT),
            "a tmpfs file with a link is refused"
        );
        s.preserve_fd(id, 1, dup(&f)).unwrap();
    } else {
        eprintln!("SKIPPED: /dev/shm is not available to test tmpfs files");
    }
}

#[test]
fn other_files_have_no_handler() {
    let mut s = store();
    let id = s.create_session(name("s")).unwrap();
    let null = File::open("/dev/null").unwrap();
    assert_eq!(s.preserve_fd(id, 1, Ok(null.into())), Err(Errno::ENOENT));
    let tmp = File::open(std::env::current_exe().unwrap()).unwrap();
    assert_eq!(s.preserve_fd(id, 2, Ok(tmp.into())), Err(Errno::ENOENT));
}

#[test]
fn hugetlb_memfd_is_preserved_when_huge_pages_exist() {
    let f = match memfd("huge", libc::MFD_HUGETLB) {
        Ok(f) => f,
        Err(e) => return eprintln!("SKIPPED: no hugetlbfs for memfd_create(MFD_HUGETLB): {e}"),
    };
    if f.set_len(2 << 20).is_err() {
        return eprintln!("SKIPPED: no free 2 MiB huge page (set /proc/sys/vm/nr_hugepages)");
    }
    let mut s = store();
    let id = s.create_session(name("s")).unwrap();
    s.preserve_fd(id, 1, dup(&f)).unwrap();
    assert_eq!(
        s.session(id).unwrap().files[0].handler,
        1,
        "hugetlb handler took it"
    );
    update(&mut s);
    let inc = s.retrieve_session(&name("s")).unwrap();
    let got = File::from(s.retrieve_fd(inc, 1).unwrap().try_clone_to_owned().unwrap());
    assert_eq!(got.metadata().unwrap().len(), 2 << 20);
}

#[test]
fn state_encoding_round_trips_and_rejects_garbage() {
    let st = crate::MemfdState {
        pos: 5,
        size: 1 << 40,
        seals: 3,
        access: libc::O_RDONLY,
    };
    assert_eq!(crate::MemfdState::decode(&st.encode()), Ok(st));
    assert_eq!(crate::MemfdState::decode(&[1, 2, 3]), Err(Errno::EINVAL));
    let mut bad = st.encode();
    bad[0] = 9;
    assert_eq!(crate::MemfdState::decode(&bad), Err(Errno::EINVAL));
    let mut bad_mode = st.encode();
    bad_mode[24] = 3;
    assert_eq!(crate::MemfdState::decode(&bad_mode), Err(Errno::EINVAL));
    // Version 1, written by earlier daemons, had no access mode: read-write.
    let mut v1 = st.encode();
    v1.truncate(24);
    v1[..4].copy_from_slice(&1u32.to_le_bytes());
    let old = crate::MemfdState::decode(&v1).unwrap();
    assert_eq!((old.size, old.access), (st.size, libc::O_RDWR));
}

#[test]
fn a_file_preserved_read_only_comes_back_read_only() {
    let mut s = store();
    let id = s.create_session(name("ro")).unwrap();
    let mut f = memfd("ro", 0).unwrap();
    f.write_all(b"root's data").unwrap();
    let path = format!("/proc/self/fd/{}", f.as_raw_fd());
    let ro = File::open(&path).unwrap();
    s.preserve_fd(id, 1, dup(&ro)).unwrap();
    update(&mut s);
    let inc = s.retrieve_session(&name("ro")).unwrap();
    let got = File::from(s.retrieve_fd(inc, 1).unwrap().try_clone_to_owned().unwrap());
    // SAFETY: F_GETFL takes no pointer.
    let fl = unsafe { libc::fcntl(got.as_raw_fd(), libc::F_GETFL) };
    assert_eq!(fl & libc::O_ACCMODE, libc::O_RDONLY);
    let err = (&got).write(b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    let mut back = String::new();
    (&got).read_to_string(&mut back).unwrap();
    assert_eq!(back, "root's data");
}

/// Records what the handler asks of its size lock, by inode. The lock's
/// effect (the kernel's `shmem_freeze` through kmod-shim) needs the module,
/// which only the guest rig has; its scenarios test that part.
#[derive(Debug, Default)]
struct Recorder(std::sync::Mutex<Vec<(u64, bool)>>);

impl crate::SizeLock for Recorder {
    fn set(&self, file: std::os::fd::BorrowedFd<'_>, frozen: bool) -> luo_store::Result<()> {
        let ino = crate::sys::fstat(file)?.st_ino;
        self.0.lock().unwrap().push((ino, frozen));
        Ok(())
    }
}

fn ino(f: &File) -> u64 {
    f.metadata()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap()
}

#[test]
fn a_size_lock_fixes_shmem_from_preserve_to_unpreserve_retrieve_or_finish() {
    let lock = std::sync::Arc::new(Recorder::default());
    let mut s = Store::new();
    crate::register_all_with(&mut s, lock.clone(), crate::vfio::DmaTable::default()).unwrap();
    let taken = |lock: &Recorder| std::mem::take(&mut *lock.0.lock().unwrap());
    let (a, b, c) = (
        memfd("a", 0).unwrap(),
        memfd("b", 0).unwrap(),
        memfd("c", 0).unwrap(),
    );
    let hugetlb = memfd("h", libc::MFD_HUGETLB).ok();
    let id = s.create_session(name("vm")).unwrap();
    let gone = s.create_session(name("gone")).unwrap();
    for (token, f) in [(1, &a), (2, &b)] {
        s.preserve_fd(id, token, dup(f)).unwrap();
    }
    s.preserve_fd(gone, 3, dup(&c)).unwrap();
    if let Some(h) = &hugetlb {
        // The kernel does not preserve hugetlb; nothing fixes its size.
        s.preserve_fd(id, 4, dup(h)).unwrap();
    }
    assert_eq!(
        taken(&lock),
        [(ino(&a), true), (ino(&b), true), (ino(&c), true)]
    );
    s.release_session(gone).unwrap();
    assert_eq!(taken(&lock), [(ino(&c), false)]);
    update(&mut s);
    assert!(
        taken(&lock).is_empty(),
        "sizes stay fixed across the update"
    );
    let id = s.sessions().next().unwrap().id;
    s.retrieve_fd(id, 1).unwrap();
    assert_eq!(taken(&lock), [(ino(&a), false)]);
    s.finish(id).unwrap_or_else(|e| panic!("finish: {e}"));
    let freed = taken(&lock);
    assert!(freed.contains(&(ino(&b), false)), "{freed:?}");
}

#[test]
fn vfio_handlers_take_only_their_own_character_devices() {
    use luo_store::FileHandler;

    use crate::vfio::{DmaTable, VfioHandler};
    let device = VfioHandler::device(DmaTable::default(), luo_store::FlbId(0));
    let iommufd = VfioHandler::iommufd(DmaTable::default(), luo_store::FlbId(0));
    // Another character device (DEVNAME=null), a regular file, a memfd.
    let null = File::open("/dev/null").unwrap();
    let m = memfd("not-a-device", 0).unwrap();
    let tmp = tempfile_in_tmp();
    for f in [&null, &m, &tmp] {
        assert!(!device.can_preserve(f.as_fd()), "{f:?}");
        assert!(!iommufd.can_preserve(f.as_fd()), "{f:?}");
    }
}

fn tempfile_in_tmp() -> File {
    let path = std::env::temp_dir().join(format!("luo-vfio-test-{}", std::process::id()));
    let f = File::create(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    f
}
