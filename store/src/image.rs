//! The store's serialized image: what a restarted daemon needs to rebuild
//! every session, plus the codec of the state file that carries it.
//!
//! The state file is a journal (little-endian). This build writes version 2:
//!
//! ```text
//! "LUOSTATE" | version u32 = 2 | reserved u32 = 0 | record*
//! record = length u32 | crc32c(payload) u32 | crc32c(length, payload crc) u32 | payload
//! ```
//!
//! CRC-32C is Castagnoli's CRC (iSCSI, ext4, btrfs): it catches every burst
//! of errors up to 32 bits long, so every single flipped bit, and misses other
//! damage with odds of 2⁻³². Each record header carries its own checksum, so a
//! damaged length is caught before it is believed. A payload is at most
//! [`MAX_RECORD`] bytes (1 GiB); a longer length is refused as damage.
//!
//! Records are appended; the reader applies them in order. The only damage a
//! daemon killed in the middle of an append leaves is a *torn tail*: the file
//! ends inside the last record's header, or after a last header that checks
//! but before the payload length it announces. That last record is dropped.
//! Anything else refuses the whole file, nothing is half-loaded: a wrong magic,
//! another version, non-zero reserved bytes, a record header whose checksum
//! fails or whose length is over the limit, a complete record whose payload
//! checksum fails (the last one too: a torn write leaves a prefix, never a
//! full-length record with wrong bytes), or a file that ends before its first
//! record is complete (the first record is a full snapshot, written aside in
//! one piece and renamed into place). A file cut at a record boundary cannot be
//! told from a journal that had fewer records (nothing counts them; an append
//! that never started leaves the same file): it loads those.
//!
//! The checksums catch damage, not forgery: whoever can write the file can
//! write any journal (it lives in the daemon's state dir, root's).
//!
//! Version 1, written by earlier builds, is still read (the daemon rewrites the
//! journal as a version-2 snapshot right after it resumes):
//!
//! ```text
//! "LUOSTATE" | version u32 = 1 | reserved u32 | record*
//! record = payload length u64 | FNV-1a-64 of payload | payload
//! ```
//!
//! Its length is not checksummed, so version 1 cannot tell a damaged length
//! from a torn tail: a length damaged upwards makes the records from there on
//! look torn and they are dropped, and so is a last record whose payload fails
//! its checksum. It is read with those rules, as earlier builds read it; a
//! record that fails its checksum with data after it is refused.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::flb::FlbHandover;
use crate::handler::RetrieveStatus;
use crate::limits::Owner;
use crate::name::SessionName;
use crate::session::{Direction, LuoFile, Session, SessionId};
use crate::store::Store;
use crate::Errno;

const MAGIC: &[u8; 8] = b"LUOSTATE";
/// The journal version this build writes (it also reads version 1).
pub const VERSION: u32 = 2;
const HEADER: usize = 8 + 4 + 4;
/// Length, payload checksum, header checksum.
const RECORD_HEADER: usize = 4 + 4 + 4;
const RECORD_HEADER_V1: usize = 8 + 8;
/// The largest payload of a journal record (1 GiB).
pub const MAX_RECORD: usize = 1 << 30;

/// Why a state file was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ImageError {
    /// Not a state file at all.
    #[error("it is not a luo state image (bad magic)")]
    BadMagic,
    /// Written by an incompatible version.
    #[error("it has image version {found}, this luo reads versions 1 to {VERSION}")]
    UnknownVersion {
        /// The version in the file.
        found: u32,
    },
    /// Shorter than its header says.
    #[error("it is truncated ({have} of {want} bytes)")]
    Truncated {
        /// Bytes present.
        have: usize,
        /// Bytes the header promises.
        want: usize,
    },
    /// The payload does not match its checksum (a version-1 journal).
    #[error("its checksum does not match (corrupted)")]
    Checksum,
    /// The file header's reserved bytes are not zero (version 2 on).
    #[error("its header is corrupted (reserved bytes {0:#010x}, not zero)")]
    BadHeader(u32),
    /// A record is damaged in a way no interrupted write leaves.
    #[error("record {record} (at byte {offset}) is corrupted: {what}")]
    Corrupted {
        /// Its number, from 1.
        record: usize,
        /// Where its header starts in the file.
        offset: usize,
        /// What is wrong.
        what: &'static str,
    },
    /// The payload does not decode.
    #[error("its contents do not decode: {0}")]
    Payload(String),
    /// A file it names has no fd to go with it.
    #[error("the fd for {0} is missing")]
    MissingFd(String),
    /// A file it names has no registered handler.
    #[error("no handler {0} is registered")]
    UnknownHandler(String),
}

/// CRC-32C (Castagnoli; reflected polynomial 0x82F63B78, initial value and
/// final xor all ones), one table lookup a byte.
pub(crate) fn crc32c(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 == 1 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !bytes.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn le_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"))
}

/// The bytes a new journal starts with.
pub fn journal_header() -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out
}

/// One journal record around `payload`.
///
/// # Errors
/// `InvalidInput` if `payload` is over [`MAX_RECORD`] bytes.
pub fn journal_record(payload: &[u8]) -> std::io::Result<Vec<u8>> {
    if payload.len() > MAX_RECORD {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "a state journal record of {} bytes is over the limit of {MAX_RECORD}",
                payload.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(RECORD_HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c(payload).to_le_bytes());
    let header_sum = crc32c(&out);
    out.extend_from_slice(&header_sum.to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Checks a journal and returns its complete records' payloads, in order
/// (version 2, or version 1 with its weaker rules: see the module doc).
///
/// # Errors
/// Bad magic, unknown version, a damaged header or record, or no complete
/// first record.
pub fn read_journal(bytes: &[u8]) -> Result<Vec<&[u8]>, ImageError> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(ImageError::BadMagic);
    }
    match le_u32(&bytes[8..]) {
        1 => read_v1(bytes),
        VERSION => read_v2(bytes),
        found => Err(ImageError::UnknownVersion { found }),
    }
}

fn read_v2(bytes: &[u8]) -> Result<Vec<&[u8]>, ImageError> {
    let reserved = le_u32(&bytes[12..]);
    if reserved != 0 {
        return Err(ImageError::BadHeader(reserved));
    }
    let mut records: Vec<&[u8]> = Vec::new();
    let mut at = HEADER;
    // What the first record promises, for the error if it is incomplete.
    let mut want = HEADER + RECORD_HEADER;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < RECORD_HEADER {
            break; // the file ends inside a record header: a torn append
        }
        let corrupted = |what| ImageError::Corrupted {
            record: records.len() + 1,
            offset: at,
            what,
        };
        if crc32c(&rest[..8]) != le_u32(&rest[8..]) {
            return Err(corrupted("its header checksum does not match"));
        }
        let len = le_u32(rest) as usize;
        if len > MAX_RECORD {
            return Err(corrupted("its length is over the 1 GiB limit"));
        }
        let end = RECORD_HEADER + len;
        if records.is_empty() {
            want = at + end;
        }
        if rest.len() < end {
            break; // a valid header, the payload cut short: a torn append
        }
        let payload = &rest[RECORD_HEADER..end];
        if crc32c(payload) != le_u32(&rest[4..]) {
            return Err(corrupted("its payload checksum does not match"));
        }
        records.push(payload);
        at += end;
    }
    if records.is_empty() {
        // A journal starts with a full snapshot written in one piece.
        return Err(ImageError::Truncated {
            have: bytes.len(),
            want,
        });
    }
    Ok(records)
}

/// Version 1, read with the rules it was written with: a record cut short or
/// failing its checksum at the very end is taken for a torn tail.
fn read_v1(bytes: &[u8]) -> Result<Vec<&[u8]>, ImageError> {
    let mut records: Vec<&[u8]> = Vec::new();
    let mut at = HEADER;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < RECORD_HEADER_V1 {
            break; // a record header cut short: the last write never completed
        }
        let len = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")) as usize;
        let sum = u64::from_le_bytes(rest[8..16].try_into().expect("8 bytes"));
        let end = RECORD_HEADER_V1.saturating_add(len);
        if rest.len() < end {
            break; // cut short at the end of the file (or a damaged length)
        }
        let payload = &rest[RECORD_HEADER_V1..end];
        if fnv1a(payload) != sum {
            if rest.len() == end && !records.is_empty() {
                break; // the last record, torn
            }
            return Err(ImageError::Checksum);
        }
        records.push(payload);
        at += end;
    }
    if records.is_empty() {
        return Err(ImageError::Truncated {
            have: bytes.len(),
            want: HEADER + RECORD_HEADER_V1,
        });
    }
    Ok(records)
}

/// A preserved file in the image; its fds travel separately, by key.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FileImage {
    /// Handler compatible string.
    pub handler: String,
    /// Token.
    pub token: u64,
    /// Handler state.
    pub data: Vec<u8>,
    /// Whether a live file goes with it (key [`FileImage::file_key`]).
    pub has_file: bool,
    /// Whether a carried fd goes with it (key [`FileImage::carried_key`]).
    pub has_carried: bool,
    /// 0 not attempted, 1 retrieved, negative: failed with that errno.
    pub retrieve_status: i32,
}

/// A session in the image.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SessionImage {
    /// Id.
    pub id: u64,
    /// Name bytes.
    pub name: Vec<u8>,
    /// Incoming (true) or outgoing.
    pub incoming: bool,
    /// Retrieved (incoming only).
    pub retrieved: bool,
    /// Files in preservation order.
    pub files: Vec<FileImage>,
    /// Who created it (absent in images written before owners were recorded).
    #[serde(default)]
    pub owner: Option<Owner>,
}

/// Everything the store needs to come back.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct StoreImage {
    /// Epoch.
    pub epoch: u64,
    /// Last session id handed out.
    pub next_id: u64,
    /// Sessions in creation order.
    pub sessions: Vec<SessionImage>,
    /// FLBs used by outgoing files.
    pub flb_outgoing: Vec<FlbHandover>,
    /// FLBs used by incoming files.
    pub flb_incoming: Vec<FlbHandover>,
}

impl FileImage {
    /// Key of the live file's fd.
    pub fn file_key(session: u64, token: u64) -> String {
        format!("s{session}/t{token}/file")
    }

    /// Key of the carried fd.
    pub fn carried_key(session: u64, token: u64) -> String {
        format!("s{session}/t{token}/carried")
    }
}

fn status_code(s: RetrieveStatus) -> i32 {
    match s {
        RetrieveStatus::NotAttempted => 0,
        RetrieveStatus::Retrieved => 1,
        RetrieveStatus::Failed(e) => -e.0,
    }
}

fn status_of(code: i32) -> RetrieveStatus {
    match code {
        0 => RetrieveStatus::NotAttempted,
        c if c > 0 => RetrieveStatus::Retrieved,
        c => RetrieveStatus::Failed(Errno(-c)),
    }
}

/// A session's own fields and some of its files: what a journal record
/// holds when only those changed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SessionDelta {
    /// Id.
    pub id: u64,
    /// Name bytes.
    pub name: Vec<u8>,
    /// Incoming (true) or outgoing.
    pub incoming: bool,
    /// Retrieved (incoming only).
    pub retrieved: bool,
    /// Files added or changed, in preservation order.
    pub files: Vec<FileImage>,
    /// Tokens named as changed that the session no longer holds.
    pub gone: Vec<u64>,
}

impl SessionImage {
    /// Applies a delta of the same session: fields replaced, changed files
    /// replaced in place, new ones appended, gone ones removed.
    pub fn apply(&mut self, delta: SessionDelta) {
        self.name = delta.name;
        self.incoming = delta.incoming;
        self.retrieved = delta.retrieved;
        self.files.retain(|f| !delta.gone.contains(&f.token));
        for file in delta.files {
            match self.files.iter_mut().find(|f| f.token == file.token) {
                Some(old) => *old = file,
                None => self.files.push(file),
            }
        }
    }
}

/// The fds of a file, by key.
type KeyedFds<'a> = Vec<(String, BorrowedFd<'a>)>;

impl Store {
    fn file_image<'a>(&self, session: u64, f: &'a LuoFile, fds: &mut KeyedFds<'a>) -> FileImage {
        if let Some(file) = &f.file {
            fds.push((FileImage::file_key(session, f.token), file.as_fd()));
        }
        if let Some(c) = &f.carried {
            fds.push((FileImage::carried_key(session, f.token), c.as_fd()));
        }
        FileImage {
            handler: self.handler_compatible(f.handler).to_owned(),
            token: f.token,
            data: f.data.clone(),
            has_file: f.file.is_some(),
            has_carried: f.carried.is_some(),
            retrieve_status: status_code(f.retrieve_status),
        }
    }

    /// The image of one session, and the fds that go with it, by key.
    pub fn session_image(&self, id: SessionId) -> Option<(SessionImage, KeyedFds<'_>)> {
        let s = self.session(id)?;
        let mut fds = Vec::new();
        let files = s
            .files
            .iter()
            .map(|f| self.file_image(s.id.0, f, &mut fds))
            .collect();
        let image = SessionImage {
            id: s.id.0,
            name: s.name.as_bytes().to_vec(),
            incoming: s.direction == Direction::Incoming,
            retrieved: s.retrieved,
            files,
            owner: s.owner.clone(),
        };
        Some((image, fds))
    }

    /// The session's fields and the files of `tokens`, and their fds.
    pub fn session_delta(
        &self,
        id: SessionId,
        tokens: &BTreeSet<u64>,
    ) -> Option<(SessionDelta, KeyedFds<'_>)> {
        let s = self.session(id)?;
        let mut fds = Vec::new();
        let files = s
            .files
            .iter()
            .filter(|f| tokens.contains(&f.token))
            .map(|f| self.file_image(s.id.0, f, &mut fds))
            .collect();
        let gone = tokens
            .iter()
            .copied()
            .filter(|t| !s.files.iter().any(|f| f.token == *t))
            .collect();
        let delta = SessionDelta {
            id: s.id.0,
            name: s.name.as_bytes().to_vec(),
            incoming: s.direction == Direction::Incoming,
            retrieved: s.retrieved,
            files,
            gone,
        };
        Some((delta, fds))
    }

    /// The image of the store without its sessions.
    pub fn header_image(&self) -> StoreImage {
        StoreImage {
            epoch: self.epoch(),
            next_id: self.next_id(),
            sessions: Vec::new(),
            flb_outgoing: self.flbs.handover(),
            flb_incoming: self.flbs.incoming_handover(),
        }
    }

    /// The image of the whole store, and the fds that go with it, by key.
    pub fn to_image(&self) -> (StoreImage, Vec<(String, BorrowedFd<'_>)>) {
        let mut image = self.header_image();
        let mut fds = Vec::new();
        for s in self.sessions() {
            let (si, f) = self.session_image(s.id).expect("listed session exists");
            image.sessions.push(si);
            fds.extend(f);
        }
        (image, fds)
    }

    /// Rebuilds the sessions of an image into this store (which has its
    /// handlers and FLBs registered and no sessions). `take_fd` hands over
    /// the fd stored under a key.
    ///
    /// # Errors
    /// A handler that is not registered or an fd that is missing; the store
    /// is left empty then.
    pub fn load_image(
        &mut self,
        image: &StoreImage,
        take_fd: &mut dyn FnMut(&str) -> Option<OwnedFd>,
    ) -> Result<(), ImageError> {
        let mut sessions = Vec::with_capacity(image.sessions.len());
        for s in &image.sessions {
            sessions.push(self.session_from_image(s, take_fd)?);
        }
        self.flbs
            .load_outgoing(&image.flb_outgoing)
            .map_err(|_| ImageError::UnknownHandler("an FLB".into()))?;
        self.flbs
            .load_incoming(&image.flb_incoming)
            .map_err(|_| ImageError::UnknownHandler("an FLB".into()))?;
        self.restore(image.epoch, image.next_id, sessions);
        Ok(())
    }

    fn session_from_image(
        &self,
        s: &SessionImage,
        take_fd: &mut dyn FnMut(&str) -> Option<OwnedFd>,
    ) -> Result<Session, ImageError> {
        let name = SessionName::new(&s.name)
            .map_err(|_| ImageError::Payload("a session name is invalid".into()))?;
        let mut files = Vec::with_capacity(s.files.len());
        for f in &s.files {
            let handler = self
                .handler_index(&f.handler)
                .ok_or_else(|| ImageError::UnknownHandler(f.handler.clone()))?;
            let mut fd = |has: bool, key: String| -> Result<Option<OwnedFd>, ImageError> {
                if !has {
                    return Ok(None);
                }
                take_fd(&key).map(Some).ok_or(ImageError::MissingFd(key))
            };
            files.push(LuoFile {
                handler,
                token: f.token,
                file: fd(f.has_file, FileImage::file_key(s.id, f.token))?,
                data: f.data.clone(),
                carried: fd(f.has_carried, FileImage::carried_key(s.id, f.token))?,
                retrieve_status: status_of(f.retrieve_status),
            });
        }
        let direction = if s.incoming {
            Direction::Incoming
        } else {
            Direction::Outgoing
        };
        Ok(Session {
            id: SessionId(s.id),
            name,
            direction,
            retrieved: s.retrieved,
            files,
            owner: s.owner.clone(),
        })
    }
}

/// Encodes an image as the payload of a state file.
pub fn encode_image(image: &StoreImage) -> Vec<u8> {
    serde_json::to_vec(image).expect("the image serializes")
}

/// Decodes the payload of a state file.
///
/// # Errors
/// `Payload` if it is not a valid image.
pub fn decode_image(payload: &[u8]) -> Result<StoreImage, ImageError> {
    serde_json::from_slice(payload).map_err(|e| ImageError::Payload(e.to_string()))
}
