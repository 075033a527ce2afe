//! The FUSE wire protocol: a parser that turns request bytes into [`Op`]
//! without `unsafe`, and the answers and replies the daemon makes (sent by
//! `dev_fuse::Channel`).

use std::io;

use luo_store::Errno;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::wire::abi::*;

/// One decoded request.
#[derive(Debug)]
pub struct Request {
    /// Its header (unique id, node, caller's pid/uid/gid).
    pub header: InHeader,
    /// The operation.
    pub op: Op,
    /// It came from the CUSE device rather than the FUSE mount.
    pub cuse: bool,
    /// The io_uring entry that holds it, if it came through the ring.
    pub slot: Option<u32>,
}

/// Operations, with their decoded arguments.
#[derive(Debug)]
#[allow(missing_docs)]
pub enum Op {
    /// INIT, with `flags2` (the kernel's flags above bit 31) when it sent them.
    Init(InitIn, u32),
    CuseInit(CuseInitIn),
    Lookup {
        name: Vec<u8>,
    },
    Forget,
    BatchForget,
    Getattr,
    Setattr(SetattrIn),
    Open(OpenIn),
    Opendir,
    Release(ReleaseIn),
    Releasedir,
    Readdir,
    Flush,
    Ioctl(IoctlIn),
    Getxattr {
        size: u32,
        name: Vec<u8>,
    },
    Listxattr {
        size: u32,
    },
    Setxattr,
    Removexattr,
    Statfs,
    Access,
    Read,
    Write,
    Interrupt(InterruptIn),
    Destroy,
    Unknown(u32),
}

fn arg<T: FromBytes>(body: &[u8]) -> io::Result<T> {
    T::read_from_prefix(body)
        .map(|(v, _)| v)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "short FUSE request"))
}

fn cstr(bytes: &[u8]) -> Vec<u8> {
    bytes.split(|&b| b == 0).next().unwrap_or_default().to_vec()
}

/// Decodes one request from the bytes a read of the channel returned.
///
/// # Errors
/// `InvalidData` for a request shorter than its header or its arguments.
pub fn parse(bytes: &[u8]) -> io::Result<Request> {
    let header: InHeader = arg(bytes)?;
    let body = &bytes[std::mem::size_of::<InHeader>()..];
    use opcode::*;
    let op = match header.opcode {
        INIT => Op::Init(
            arg(body)?,
            body.get(16..20)
                .map_or(0, |b| u32::from_ne_bytes(b.try_into().expect("4 bytes"))),
        ),
        CUSE_INIT => Op::CuseInit(arg(body)?),
        LOOKUP => Op::Lookup { name: cstr(body) },
        FORGET => Op::Forget,
        BATCH_FORGET => Op::BatchForget,
        GETATTR => Op::Getattr,
        SETATTR => Op::Setattr(arg(body)?),
        OPEN => Op::Open(arg(body)?),
        OPENDIR => Op::Opendir,
        RELEASE => Op::Release(arg(body)?),
        RELEASEDIR => Op::Releasedir,
        READDIR => Op::Readdir,
        FLUSH => Op::Flush,
        IOCTL => Op::Ioctl(arg(body)?),
        GETXATTR => {
            let g: GetxattrIn = arg(body)?;
            Op::Getxattr {
                size: g.size,
                name: cstr(&body[8..]),
            }
        }
        LISTXATTR => Op::Listxattr {
            size: arg::<GetxattrIn>(body)?.size,
        },
        SETXATTR => Op::Setxattr,
        REMOVEXATTR => Op::Removexattr,
        STATFS => Op::Statfs,
        ACCESS => Op::Access,
        READ => Op::Read,
        WRITE => Op::Write,
        INTERRUPT => Op::Interrupt(arg(body)?),
        DESTROY => Op::Destroy,
        other => Op::Unknown(other),
    };
    Ok(Request {
        header,
        op,
        cuse: false,
        slot: None,
    })
}

/// Whether an opcode expects no reply at all.
pub fn is_noreply(op: &Op) -> bool {
    matches!(op, Op::Forget | Op::BatchForget | Op::Interrupt(_))
}

/// The answer to a FUSE request, as a value: the code that serves a
/// request decides it, and `Channel::answer` alone sends it (fuser's
/// `ll::Response`), so that what a request gets can be checked without a
/// mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Success, with this body (empty for most requests).
    Ok(Vec<u8>),
    /// Failure.
    Err(Errno),
}

impl Answer {
    /// Success with no body.
    pub fn empty() -> Answer {
        Answer::Ok(Vec::new())
    }

    /// Success with `value` as the body.
    pub fn of<T: IntoBytes + Immutable>(value: &T) -> Answer {
        Answer::Ok(value.as_bytes().to_vec())
    }

    /// Success with `parts` one after another as the body.
    pub fn parts(parts: &[&[u8]]) -> Answer {
        Answer::Ok(parts.concat())
    }
}

impl From<Errno> for Answer {
    fn from(e: Errno) -> Answer {
        Answer::Err(e)
    }
}

/// A reply held back in a batch: the whole message (its header names the
/// request) and the device it goes to. The route is kept beside the request
/// id, never in it: every bit of the id is the kernel's (a resent request
/// has `FUSE_UNIQUE_RESEND`, bit 63, set).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(from = "ReplyWire")]
pub struct Reply {
    /// The request came from the CUSE device.
    pub cuse: bool,
    /// The io_uring entry that holds the request, if it came through the ring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    /// Header and body.
    pub msg: Vec<u8>,
}

/// A [`Reply`] as journals hold it: earlier daemons wrote `(id, message)`
/// with bit 63 of the id marking the CUSE device.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum ReplyWire {
    Routed {
        cuse: bool,
        #[serde(default)]
        slot: Option<u32>,
        msg: Vec<u8>,
    },
    Tagged(u64, Vec<u8>),
}

impl From<ReplyWire> for Reply {
    fn from(w: ReplyWire) -> Reply {
        match w {
            ReplyWire::Routed { cuse, slot, msg } => Reply { cuse, slot, msg },
            ReplyWire::Tagged(id, msg) => Reply {
                cuse: id & (1 << 63) != 0,
                slot: None,
                msg,
            },
        }
    }
}

impl Reply {
    /// The request this answers.
    pub fn unique(&self) -> u64 {
        self.msg
            .get(8..16)
            .map_or(0, |b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(opcode: u32, body: &[u8]) -> Vec<u8> {
        let h = InHeader {
            len: (40 + body.len()) as u32,
            opcode,
            unique: 7,
            nodeid: 2,
            pid: 99,
            ..Default::default()
        };
        let mut v = h.as_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn parses_ioctl() {
        let io = IoctlIn {
            fh: 3,
            cmd: 0xba40,
            arg: 0x1000,
            ..Default::default()
        };
        let r = parse(&request(opcode::IOCTL, io.as_bytes())).unwrap();
        assert_eq!(r.header.pid, 99);
        let Op::Ioctl(got) = r.op else {
            panic!("not an ioctl: {:?}", r.op)
        };
        assert_eq!((got.fh, got.cmd, got.arg), (3, 0xba40, 0x1000));
    }

    #[test]
    fn parses_lookup_and_getxattr_names() {
        let r = parse(&request(opcode::LOOKUP, b"liveupdate\0")).unwrap();
        assert!(matches!(r.op, Op::Lookup { ref name } if name == b"liveupdate"));
        let mut body = GetxattrIn {
            size: 64,
            padding: 0,
        }
        .as_bytes()
        .to_vec();
        body.extend_from_slice(b"user.luo.control\0");
        let r = parse(&request(opcode::GETXATTR, &body)).unwrap();
        assert!(matches!(r.op, Op::Getxattr { size: 64, ref name } if name == b"user.luo.control"));
    }

    #[test]
    fn replies_saved_by_earlier_daemons_still_read() {
        let old = serde_json::json!([[(1u64 << 63) | 6, [1, 2]], [4, [3]]]);
        let got: Vec<Reply> = serde_json::from_value(old).unwrap();
        assert_eq!(
            got,
            [
                Reply {
                    cuse: true,
                    slot: None,
                    msg: vec![1, 2]
                },
                Reply {
                    cuse: false,
                    slot: None,
                    msg: vec![3]
                }
            ]
        );
    }

    #[test]
    fn short_requests_are_refused() {
        assert!(parse(&[0u8; 10]).is_err());
        assert!(parse(&request(opcode::IOCTL, &[0u8; 8])).is_err());
        assert!(matches!(
            parse(&request(9999, &[])).unwrap().op,
            Op::Unknown(9999)
        ));
    }
}
