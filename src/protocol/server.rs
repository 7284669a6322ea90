//! Hub → client frames and their encoder.
//!
//! A `message` is encoded exactly once, when its offset is assigned; the
//! resulting JSON ([`EncodedMessage`]) is what the store keeps, what history
//! replays and what every recipient receives, so no message is ever
//! serialized once per recipient or once per replay.

use super::codes::ErrorCode;
use super::names::{RoomName, UserId};
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;
use std::sync::Arc;

/// The fields of a `message` frame, borrowed for a single encoding.
#[derive(Debug, Serialize)]
pub struct Message<'a> {
    #[serde(rename = "type")]
    pub kind: MessageTag,
    pub room: &'a RoomName,
    pub offset: u64,
    pub id: &'a str,
    pub user: &'a UserId,
    pub data: &'a RawValue,
    pub ts: u64,
}

/// Serializes as the constant `"message"`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MessageTag;

impl Serialize for MessageTag {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("message")
    }
}

impl Message<'_> {
    pub fn encode(&self) -> EncodedMessage {
        EncodedMessage {
            offset: self.offset,
            ts: self.ts,
            json: Arc::from(to_raw(self)),
        }
    }
}

/// A `message` frame already encoded as JSON, with the two fields the hub
/// needs to order and expire it. Cloning it is a reference-count increment.
#[derive(Debug, Clone)]
pub struct EncodedMessage {
    pub offset: u64,
    pub ts: u64,
    pub json: Arc<RawValue>,
}

impl EncodedMessage {
    /// Rebuilds the envelope from stored JSON, reading back `offset` and `ts`.
    pub fn from_json(json: Box<RawValue>) -> Result<Self, serde_json::Error> {
        #[derive(serde::Deserialize)]
        struct Head {
            offset: u64,
            ts: u64,
        }
        let head: Head = serde_json::from_str(json.get())?;
        Ok(Self {
            offset: head.offset,
            ts: head.ts,
            json: Arc::from(json),
        })
    }

    pub fn as_str(&self) -> &str {
        self.json.get()
    }
}

impl Serialize for EncodedMessage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.json.serialize(s)
    }
}

/// One user's entry in a presence list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PresenceEntry {
    pub user: UserId,
    pub sessions: u32,
}

/// Every frame the hub sends apart from `message` (see [`Message`]).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Welcome {
        session: &'a str,
        user: &'a UserId,
        node: &'a str,
        heartbeat_ms: u64,
        protocol: u32,
    },
    Joined {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        room: &'a RoomName,
        epoch: u64,
        offset: u64,
        history: &'a [EncodedMessage],
        recovered: bool,
        presence: &'a [PresenceEntry],
    },
    Ack {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
    },
    UserJoined {
        room: &'a RoomName,
        user: &'a UserId,
    },
    UserLeft {
        room: &'a RoomName,
        user: &'a UserId,
    },
    Typing {
        room: &'a RoomName,
        user: &'a UserId,
        active: bool,
    },
    Presence {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        room: &'a RoomName,
        users: &'a [PresenceEntry],
    },
    History {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        room: &'a RoomName,
        messages: &'a [EncodedMessage],
    },
    Direct {
        from: &'a UserId,
        data: &'a RawValue,
        ts: u64,
    },
    Pong {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    Error {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
        /// An addition to the protocol: the room an unprompted error is about
        /// (a room that restarted and must be joined again).
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a RoomName>,
    },
    Shutdown {
        reason: &'a str,
        reconnect: bool,
    },
}

/// Encodes a frame as the text of one WebSocket message.
pub fn encode(frame: &ServerFrame<'_>) -> String {
    // Every field is a string, number, bool or pre-validated raw JSON, and all
    // maps have string keys, so serialization cannot fail.
    serde_json::to_string(frame).expect("server frames always serialize")
}

fn to_raw<T: Serialize>(value: &T) -> Box<RawValue> {
    // As in `encode`: plain fields and pre-validated raw JSON cannot fail.
    serde_json::value::to_raw_value(value).expect("messages always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_encodes_once_and_reads_back() {
        let room = RoomName::parse("r").unwrap();
        let user = UserId::parse("u").unwrap();
        let data = RawValue::from_string(r#"{"text":"<b>hi</b>"}"#.into()).unwrap();
        let m = Message {
            kind: MessageTag,
            room: &room,
            offset: 7,
            id: "abc",
            user: &user,
            data: &data,
            ts: 1700000000000,
        }
        .encode();
        assert_eq!(
            m.as_str(),
            r#"{"type":"message","room":"r","offset":7,"id":"abc","user":"u","data":{"text":"<b>hi</b>"},"ts":1700000000000}"#
        );
        let back =
            EncodedMessage::from_json(RawValue::from_string(m.as_str().into()).unwrap()).unwrap();
        assert_eq!((back.offset, back.ts), (7, 1700000000000));
    }

    #[test]
    fn frames_echo_ref_only_when_given() {
        let room = RoomName::parse("r").unwrap();
        let history = [];
        let joined = encode(&ServerFrame::Joined {
            reference: None,
            room: &room,
            epoch: 1,
            offset: 0,
            history: &history,
            recovered: false,
            presence: &[],
        });
        assert_eq!(
            joined,
            r#"{"type":"joined","room":"r","epoch":1,"offset":0,"history":[],"recovered":false,"presence":[]}"#
        );
        let err = encode(&ServerFrame::Error {
            reference: Some("x"),
            code: ErrorCode::NotJoined,
            message: "join first",
            retry_after_ms: None,
            room: None,
        });
        assert_eq!(
            err,
            r#"{"type":"error","ref":"x","code":"not_joined","message":"join first"}"#
        );
    }
}
