//! Session names: 1 to 63 bytes, NUL-terminated inside a 64-byte field.

use std::fmt;

use crate::errno::{Errno, Result};

/// Size of the name field in the uAPI structs, including the terminating NUL.
pub const SESSION_NAME_LENGTH: usize = 64;

/// A validated session name (no NUL inside, 1..=63 bytes).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionName(Vec<u8>);

impl SessionName {
    /// Parses the name field of a CREATE/RETRIEVE_SESSION struct the way
    /// `luo_session_create` does: the name ends at the first NUL, and a field
    /// with no NUL or an empty name is `EINVAL`.
    ///
    /// # Errors
    /// `EINVAL` for an empty name or one without a NUL in its 64 bytes.
    pub fn from_field(field: &[u8; SESSION_NAME_LENGTH]) -> Result<SessionName> {
        let len = field.iter().position(|&b| b == 0).ok_or(Errno::EINVAL)?;
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        Ok(SessionName(field[..len].to_vec()))
    }

    /// Builds a name from bytes (used by tests and the state image).
    ///
    /// # Errors
    /// `EINVAL` if the bytes are empty, too long or contain a NUL.
    pub fn new(bytes: &[u8]) -> Result<SessionName> {
        if bytes.is_empty() || bytes.len() >= SESSION_NAME_LENGTH || bytes.contains(&0) {
            return Err(Errno::EINVAL);
        }
        Ok(SessionName(bytes.to_vec()))
    }

    /// The name's bytes, without the NUL.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The name as a NUL-padded 64-byte field, as GET_NAME returns it.
    pub fn to_field(&self) -> [u8; SESSION_NAME_LENGTH] {
        let mut field = [0u8; SESSION_NAME_LENGTH];
        field[..self.0.len()].copy_from_slice(&self.0);
        field
    }
}

impl fmt::Display for SessionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.escape_ascii())
    }
}

impl fmt::Debug for SessionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(s: &[u8]) -> [u8; SESSION_NAME_LENGTH] {
        let mut f = [0u8; SESSION_NAME_LENGTH];
        f[..s.len()].copy_from_slice(s);
        f
    }

    #[test]
    fn empty_name_is_einval() {
        assert_eq!(SessionName::from_field(&field(b"")), Err(Errno::EINVAL));
    }

    #[test]
    fn name_without_nul_is_einval() {
        assert_eq!(SessionName::from_field(&[b'X'; 64]), Err(Errno::EINVAL));
    }

    #[test]
    fn max_length_name_round_trips() {
        let long = [b'A'; 63];
        let name = SessionName::from_field(&field(&long)).unwrap();
        assert_eq!(name.as_bytes(), &long);
        assert_eq!(&name.to_field()[..63], &long);
        assert_eq!(name.to_field()[63], 0);
    }

    #[test]
    fn bytes_after_the_nul_are_ignored() {
        let mut f = field(b"abc");
        f[10] = b'z';
        assert_eq!(SessionName::from_field(&f).unwrap().as_bytes(), b"abc");
    }

    #[test]
    fn new_rejects_bad_names() {
        assert!(SessionName::new(b"").is_err());
        assert!(SessionName::new(&[b'a'; 64]).is_err());
        assert!(SessionName::new(b"a\0b").is_err());
        assert!(SessionName::new(b"ok").is_ok());
    }
}
