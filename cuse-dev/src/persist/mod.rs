//! What a daemon leaves for the next one: the state image on disk and the
//! fds in the keeper.
//!
//! The image is written before any reply that reports a change leaves the
//! daemon (replies are grouped per batch of requests and the batch's replies
//! are part of the image), so a daemon killed at any point is followed by one
//! that knows every change a caller was told about. FUSE requests the killed
//! daemon had read but not answered are asked for again with
//! `FUSE_NOTIFY_RESEND`; replies it had decided but maybe not delivered are
//! sent again from the image (a reply to an already answered request is
//! ignored by the kernel).

pub mod keeper;
pub mod opener;
pub(crate) mod paths;
pub(crate) mod recover;

mod format;
mod journal;

pub use format::{
    listener_key, parse, read, DeltaRecord, Header, Inflight, LoadError, Loaded, Outcome, Record,
    SessionRecord, CUSE_KEY, FUSE_KEY, RING_KEY,
};
pub use journal::{Journal, KeptFds, RESERVE};

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use luo_store::{journal_header, journal_record, ImageError, SessionImage};

    use super::*;

    fn session(id: u64) -> SessionRecord {
        SessionRecord {
            session: SessionImage {
                id,
                name: format!("vm{id}").into_bytes(),
                incoming: false,
                retrieved: false,
                files: Vec::new(),
                owner: None,
            },
            slot: Some(id + 100),
        }
    }

    /// A snapshot with session 1, then one record for each of sessions 2 and 3.
    fn records() -> [Record; 3] {
        [1, 2, 3].map(|id| Record {
            full: id == 1,
            sessions: vec![session(id)],
            ..Record::default()
        })
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("luo-persist-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("state.img")
    }

    fn ids(loaded: &Loaded) -> Vec<u64> {
        loaded.sessions.keys().copied().collect()
    }

    #[test]
    fn a_damaged_record_anywhere_refuses_the_journal_never_fewer_sessions() {
        let path = scratch("damaged");
        let [snapshot, two, three] = records();
        let mut journal = Journal::create(&path, &snapshot).unwrap();
        let second = std::fs::metadata(&path).unwrap().len() as usize;
        journal.append(&two).unwrap();
        let third = std::fs::metadata(&path).unwrap().len() as usize;
        journal.append(&three).unwrap();
        drop(journal);
        let good = std::fs::read(&path).unwrap();
        assert_eq!(ids(&read(&path).unwrap()), [1, 2, 3]);

        // Any bit of the middle record's length (the attacker's finding: one
        // flip made the rest look torn and 3 sessions came back as 1), or a
        // byte of the last record's payload.
        let spots = (second * 8..(second + 4) * 8)
            .map(|bit| (bit / 8, 1u8 << (bit % 8)))
            .chain([(good.len() - 2, 0x20)]);
        for (at, mask) in spots {
            let mut bad = good.clone();
            bad[at] ^= mask;
            std::fs::write(&path, &bad).unwrap();
            match read(&path) {
                Err(LoadError::Refused {
                    reason: ImageError::Corrupted { record, .. },
                    ..
                }) => assert_eq!(record, if at < third { 2 } else { 3 }),
                other => panic!("byte {at} ^ {mask:#x}: {other:?}"),
            }
        }
        // A torn last append is dropped; the rest is there.
        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert_eq!(ids(&read(&path).unwrap()), [1, 2]);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_link_left_at_the_temporary_name_is_replaced_never_written_through() {
        let path = scratch("planted");
        let dir = path.parent().unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "secret").unwrap();
        let _ = std::fs::remove_file(dir.join("state.tmp"));
        std::os::unix::fs::symlink(&victim, dir.join("state.tmp")).unwrap();
        let [snapshot, two, _] = records();
        let mut journal = Journal::create(&path, &snapshot).unwrap();
        journal.append(&two).unwrap();
        drop(journal);
        assert!(
            std::fs::read(&victim).unwrap() == b"secret",
            "written through"
        );
        assert!(!dir.join("state.tmp").exists());
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(ids(&read(&path).unwrap()), [1, 2]);
        // Nor is the journal read through a link.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        assert!(matches!(read(&path), Err(LoadError::Read { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_record_written_before_owners_were_kept_loads_with_none() {
        let mut record = serde_json::to_value(Record {
            full: true,
            sessions: vec![session(1)],
            ..Record::default()
        })
        .unwrap();
        record["header"].as_object_mut().unwrap().remove("trees");
        record["sessions"][0]["session"]
            .as_object_mut()
            .unwrap()
            .remove("owner");
        let path = scratch("owners");
        let mut bytes = journal_header();
        bytes.extend(journal_record(&serde_json::to_vec(&record).unwrap()).unwrap());
        std::fs::write(&path, bytes).unwrap();
        let loaded = read(&path).unwrap();
        assert!(loaded.header.trees.is_empty());
        assert_eq!(loaded.sessions[&1].session.owner, None);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_version_1_journal_is_resumed_and_rewritten_as_version_2() {
        fn fnv1a(bytes: &[u8]) -> u64 {
            bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            })
        }
        // What the previous build wrote.
        let mut v1 = b"LUOSTATE".to_vec();
        v1.extend(1u32.to_le_bytes());
        v1.extend(0u32.to_le_bytes());
        for r in records() {
            let payload = serde_json::to_vec(&r).unwrap();
            v1.extend((payload.len() as u64).to_le_bytes());
            v1.extend(fnv1a(&payload).to_le_bytes());
            v1.extend(payload);
        }
        let path = scratch("v1");
        std::fs::write(&path, &v1).unwrap();
        let loaded = read(&path).unwrap();
        assert_eq!(ids(&loaded), [1, 2, 3]);
        assert_eq!(loaded.sessions[&3].slot, Some(103));

        // The resumed daemon's snapshot replaces it with version 2.
        let snapshot = Record {
            full: true,
            sessions: loaded.sessions.values().cloned().collect(),
            ..Record::default()
        };
        drop(Journal::create(&path, &snapshot).unwrap());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes[8..12], 2u32.to_le_bytes(), "journal version 2");
        assert_eq!(ids(&read(&path).unwrap()), [1, 2, 3]);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
