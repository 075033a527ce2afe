//! The error type every LUO operation returns: a kernel errno.
//!
//! LUO's uAPI reports failures as negative errno values, and matching the kernel
//! means choosing exactly the same errno at exactly the same point. The object
//! model therefore returns [`Errno`] directly, as the kernel functions it mirrors
//! return `-EXXX`; the device layer copies it to the caller unchanged.

use std::fmt;
use std::io;

/// A positive errno value (`libc::EINVAL`, …).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

macro_rules! errnos {
    ($($name:ident),* $(,)?) => {
        impl Errno {
            $(#[doc = concat!("`", stringify!($name), "`")]
            pub const $name: Errno = Errno(libc::$name);)*

            /// The symbolic name of this errno (`"EINVAL"`), if it is one we use.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $(libc::$name => Some(stringify!($name)),)*
                    _ => None,
                }
            }
        }
    };
}

errnos!(
    EPERM,
    ENOENT,
    ESRCH,
    EINTR,
    EIO,
    EBADF,
    EAGAIN,
    ENOMEM,
    EACCES,
    EFAULT,
    EBUSY,
    EEXIST,
    ENODEV,
    EINVAL,
    ENFILE,
    EMFILE,
    ENOTTY,
    EFBIG,
    ENOSPC,
    ENOSYS,
    E2BIG,
    ENODATA,
    EOPNOTSUPP,
    ERANGE,
    ENAMETOOLONG,
    ENOTCONN,
    EPROTO,
    ESTALE,
);

impl Errno {
    /// The errno of the last failed libc call on this thread.
    pub fn last() -> Errno {
        Errno::from(io::Error::last_os_error())
    }
}

impl From<io::Error> for Errno {
    fn from(err: io::Error) -> Self {
        Errno(err.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl From<Errno> for io::Error {
    fn from(err: Errno) -> Self {
        io::Error::from_raw_os_error(err.0)
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "Errno({})", self.0),
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = io::Error::from_raw_os_error(self.0);
        match self.name() {
            Some(name) => write!(f, "{name} ({text})"),
            None => write!(f, "{text}"),
        }
    }
}

impl std::error::Error for Errno {}

/// The result type of every LUO operation.
pub type Result<T> = std::result::Result<T, Errno>;
