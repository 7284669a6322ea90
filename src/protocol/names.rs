//! Names clients may use: room names and user ids. Both are parsed once at the
//! edge into newtypes, so every other module can rely on them being valid.
//! They are `Arc<str>` inside because rooms clone them into every message.

use serde::{Serialize, Serializer};
use std::fmt;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("room names are 1-128 characters of [A-Za-z0-9._:-]")]
    BadRoom,
    #[error("user ids are 1-64 characters of [A-Za-z0-9._-]")]
    BadUser,
}

fn valid(s: &str, max: usize, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

/// A room name: 1–128 characters of `[A-Za-z0-9._:-]`.
///
/// The character set never contains a NUL byte, which the store relies on
/// to separate a room's name from what follows it in a key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

impl RoomName {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if valid(s, 128, b"._:-") {
            Ok(Self(Arc::from(s)))
        } else {
            Err(NameError::BadRoom)
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A user id: 1–64 characters of `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Arc<str>);

impl UserId {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if valid(s, 64, b"._-") {
            Ok(Self(Arc::from(s)))
        } else {
            Err(NameError::BadUser)
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! str_like {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}
str_like!(RoomName);
str_like!(UserId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names() {
        assert!(RoomName::parse("team-a:general_1.x").is_ok());
        assert!(RoomName::parse("a/b").is_err());
        assert!(RoomName::parse("").is_err());
        assert!(RoomName::parse(&"a".repeat(128)).is_ok());
        assert!(RoomName::parse(&"a".repeat(129)).is_err());
        assert!(RoomName::parse("a b").is_err());
        assert!(RoomName::parse("é").is_err());
    }

    #[test]
    fn user_ids() {
        assert!(UserId::parse("alice_1.x-y").is_ok());
        assert!(UserId::parse("a:b").is_err());
        assert!(UserId::parse(&"u".repeat(64)).is_ok());
        assert!(UserId::parse(&"u".repeat(65)).is_err());
    }
}

/// A session's id: random, shown in `welcome` as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl SessionId {
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}
