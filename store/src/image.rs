//! The store's serialized image: what a restarted daemon needs to rebuild
//! every session, plus the codec of the state file that carries it.
//!
//! File layout (little-endian):
//!
//! ```text
//! "LUOSTATE" | version u32 | reserved u32 | payload length u64 | FNV-1a-64 of payload | payload
//! ```
//!
//! The payload of version 1 is JSON. A file with another magic, version,
//! length or checksum is refused whole; nothing is half-loaded.

use std::os::fd::{AsFd, OwnedFd};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::flb::FlbHandover;
use crate::handler::RetrieveStatus;
use crate::name::SessionName;
use crate::session::{Direction, LuoFile, Session, SessionId};
use crate::store::Store;
use crate::Errno;

const MAGIC: &[u8; 8] = b"LUOSTATE";
/// The image version this build writes and reads.
pub const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 8 + 8;

/// Why a state file was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ImageError {
    /// Not a state file at all.
    #[error("it is not a luo state image (bad magic)")]
    BadMagic,
    /// Written by an incompatible version.
    #[error("it has image version {found}, this luo reads version {VERSION}")]
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
    /// The payload does not match its checksum.
    #[error("its checksum does not match (corrupted)")]
    Checksum,
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

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Wraps a payload in the versioned, checksummed file format.
pub fn encode_file(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&fnv1a(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks a state file and returns its payload.
///
/// # Errors
/// Bad magic, unknown version, truncation or a checksum mismatch.
pub fn decode_file(bytes: &[u8]) -> Result<&[u8], ImageError> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(ImageError::BadMagic);
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    let version = u32_at(8);
    if version != VERSION {
        return Err(ImageError::UnknownVersion { found: version });
    }
    let len = u64_at(16) as usize;
    let want = HEADER.saturating_add(len);
    if bytes.len() != want {
        return Err(ImageError::Truncated {
            have: bytes.len(),
            want,
        });
    }
    let payload = &bytes[HEADER..];
    if fnv1a(payload) != u64_at(24) {
        return Err(ImageError::Checksum);
    }
    Ok(payload)
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

impl Store {
    /// The image of the store, and the fds that go with it, by key.
    pub fn to_image(&self) -> (StoreImage, Vec<(String, std::os::fd::BorrowedFd<'_>)>) {
        let mut fds = Vec::new();
        let sessions = self
            .sessions()
            .map(|s| SessionImage {
                id: s.id.0,
                name: s.name.as_bytes().to_vec(),
                incoming: s.direction == Direction::Incoming,
                retrieved: s.retrieved,
                files: s
                    .files
                    .iter()
                    .map(|f| {
                        if let Some(file) = &f.file {
                            fds.push((FileImage::file_key(s.id.0, f.token), file.as_fd()));
                        }
                        if let Some(c) = &f.carried {
                            fds.push((FileImage::carried_key(s.id.0, f.token), c.as_fd()));
                        }
                        FileImage {
                            handler: self.handler_compatible(f.handler).to_owned(),
                            token: f.token,
                            data: f.data.clone(),
                            has_file: f.file.is_some(),
                            has_carried: f.carried.is_some(),
                            retrieve_status: status_code(f.retrieve_status),
                        }
                    })
                    .collect(),
            })
            .collect();
        let image = StoreImage {
            epoch: self.epoch(),
            next_id: self.next_id(),
            sessions,
            flb_outgoing: self.flbs.handover(),
            flb_incoming: self.flbs.incoming_handover(),
        };
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
