//! Replays the fuzz targets' inputs through `luo_cuse_dev::fuzzing` on
//! stable Rust: the seeds made here from real objects (a FUSE request the
//! kernel would send, LUO structs, control requests, a journal and a kexec
//! blob written by the daemon's own code), every input the fuzzers kept in
//! `fuzz/corpus/<target>/` and every crash they found, kept in
//! `fuzz/regressions/<target>/`. `LUO_WRITE_SEEDS=1` also writes the seeds
//! into `fuzz/corpus/` for `cargo fuzz` to start from.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use luo_cuse_dev::fuzzing::TARGETS;
use luo_store::{SessionName, Store};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn fuse_request(opcode: u32, body: &[u8]) -> Vec<u8> {
    let len = 40 + body.len() as u32;
    let mut v = Vec::new();
    for x in [len, opcode] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.extend_from_slice(&7u64.to_le_bytes()); // unique
    v.extend_from_slice(&1u64.to_le_bytes()); // nodeid
    for x in [0u32, 0, 1234] {
        v.extend_from_slice(&x.to_le_bytes()); // uid gid pid
    }
    v.extend_from_slice(&[0; 4]);
    v.extend_from_slice(body);
    v
}

fn luo_call(cmd: u32, reach: u8, strukt: &[u8]) -> Vec<u8> {
    let mut v = cmd.to_le_bytes().to_vec();
    v.push(reach);
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(strukt);
    v
}

/// A store with one session holding a real memfd.
fn store() -> (Store, OwnedFd) {
    let mut s = Store::new();
    luo_handlers::register_all(&mut s).unwrap();
    let id = s.create_session(SessionName::new(b"vm").unwrap()).unwrap();
    // SAFETY: the name is a valid C string.
    let fd = unsafe { libc::memfd_create(c"ram".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: fresh fd we own.
    let m = unsafe { OwnedFd::from_raw_fd(fd) };
    s.preserve_fd(id, 0x77, m.try_clone().map_err(Into::into))
        .unwrap();
    (s, m)
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    // FUSE: INIT, LOOKUP, IOCTL (CREATE_SESSION), RELEASE.
    let mut init = Vec::new();
    for x in [7u32, 41, 0, 0] {
        init.extend_from_slice(&x.to_le_bytes());
    }
    out.push(("fuse_request", fuse_request(26, &init)));
    out.push(("fuse_request", fuse_request(1, b"liveupdate\0")));
    let mut ioctl = 3u64.to_le_bytes().to_vec();
    for x in [0u32, 0xBA00] {
        ioctl.extend_from_slice(&x.to_le_bytes());
    }
    ioctl.extend_from_slice(&0x7fff_0000u64.to_le_bytes());
    for x in [72u32, 72] {
        ioctl.extend_from_slice(&x.to_le_bytes());
    }
    out.push(("fuse_request", fuse_request(39, &ioctl)));
    out.push(("fuse_request", fuse_request(18, &[0; 24])));
    // LUO structs: CREATE_SESSION, PRESERVE_FD, RETRIEVE_FD, FINISH, GET_NAME.
    let mut create = 72u32.to_le_bytes().to_vec();
    create.extend_from_slice(&(-1i32).to_le_bytes());
    create.extend_from_slice(b"vm\0");
    create.resize(72, 0);
    out.push(("uapi_decode", luo_call(0xBA00, 0, &create)));
    let mut fd_args = 16u32.to_le_bytes().to_vec();
    fd_args.extend_from_slice(&3i32.to_le_bytes());
    fd_args.extend_from_slice(&0x77u64.to_le_bytes());
    out.push(("uapi_decode", luo_call(0xBA40, 1, &fd_args)));
    out.push(("uapi_decode", luo_call(0xBA41, 3, &fd_args)));
    out.push((
        "uapi_decode",
        luo_call(0xBA42, 3, &[8, 0, 0, 0, 0, 0, 0, 0]),
    ));
    let mut name = 72u32.to_le_bytes().to_vec();
    name.resize(72, 0);
    out.push(("uapi_decode", luo_call(0xBA43, 1, &name)));
    // Control requests.
    for op in ["status", "register", "update", "shutdown", "kexec-prepare"] {
        out.push((
            "control_request",
            format!("{{\"op\":\"{op}\"}}\n").into_bytes(),
        ));
    }
    // A journal: a snapshot of a real store, then an append.
    let (s, _m) = store();
    let (image, _fds) = s.to_image();
    let mut record = luo_cuse_dev::persist::Record {
        full: true,
        ..Default::default()
    };
    record.sessions = image
        .sessions
        .iter()
        .cloned()
        .map(|session| luo_cuse_dev::persist::SessionRecord {
            session,
            slot: Some(2),
        })
        .collect();
    let mut journal = luo_store::journal_header();
    journal.extend(luo_store::journal_record(&serde_json::to_vec(&record).unwrap()).unwrap());
    let append = luo_cuse_dev::persist::Record {
        removed: vec![image.sessions[0].id],
        ..Default::default()
    };
    journal.extend(luo_store::journal_record(&serde_json::to_vec(&append).unwrap()).unwrap());
    // As the file (mode byte 0), and as its records to be framed (mode 1).
    let mut framed = vec![1u8];
    for r in [&record, &append] {
        framed.extend(serde_json::to_vec(r).unwrap());
        framed.push(b'\n');
    }
    out.push(("journal", [&[0u8][..], &journal].concat()));
    out.push(("journal", framed));
    // A kexec blob of the same store.
    let blob = luo_kexec_helper::handover::KexecImage {
        version: luo_kexec_helper::handover::IMAGE_VERSION,
        store: image,
        files: vec![luo_kexec_helper::handover::StashedFile {
            session: 1,
            token: 0x77,
            shim_token: 1,
            kind: 1,
            size: 4096,
            pos: 0,
            seals: 0,
        }],
    };
    out.push(("kexec_blob", serde_json::to_vec(&blob).unwrap()));
    out
}

/// Every file under `dir` (none if it does not exist).
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

#[test]
fn every_seed_corpus_input_and_past_crash_runs_clean() {
    let seeds = seeds();
    for (name, _) in &seeds {
        assert!(TARGETS.iter().any(|(t, _)| t == name), "no target {name}");
    }
    let write = std::env::var_os("LUO_WRITE_SEEDS").is_some();
    let mut replayed = 0;
    for (target, run) in TARGETS {
        assert!(
            seeds.iter().any(|(t, _)| t == target),
            "no seed for {target}"
        );
        for (i, (_, bytes)) in seeds.iter().filter(|(t, _)| t == target).enumerate() {
            run(bytes);
            replayed += 1;
            if write {
                let dir = fuzz_dir().join("corpus").join(target);
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join(format!("seed-{i}")), bytes).unwrap();
            }
        }
        for kind in ["corpus", "regressions"] {
            for file in inputs(&fuzz_dir().join(kind).join(target))
                .into_iter()
                .filter(|f| f.is_file())
            {
                run(&std::fs::read(&file).unwrap());
                replayed += 1;
            }
        }
    }
    eprintln!(
        "replayed {replayed} inputs through {} targets",
        TARGETS.len()
    );
}

#[test]
fn the_seeds_reach_past_the_parsers() {
    // The seeds are valid inputs, so the targets check them all the way:
    // each parses.
    for (target, bytes) in seeds() {
        let ok = match target {
            "fuse_request" => luo_cuse_dev::wire::fuse::parse(&bytes).is_ok(),
            "control_request" => {
                luo_cuse_dev::control::server::parse_request(bytes.strip_suffix(b"\n").unwrap())
                    .is_ok()
            }
            "journal" if bytes[0] == 0 => {
                luo_cuse_dev::persist::parse(&bytes[1..], Path::new("seed")).is_ok()
            }
            "kexec_blob" => {
                serde_json::from_slice::<luo_kexec_helper::handover::KexecImage>(&bytes).is_ok()
            }
            _ => true,
        };
        assert!(ok, "a {target} seed does not parse");
    }
}
