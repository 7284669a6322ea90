//! What nodes send each other, as JSON. The room log's records carry
//! everything of a message but its offset, which is the record's sequence
//! number in the room's stream: so id, user, data and `ts` are made once, on
//! the node that took the publish, and are the same on every node.

use crate::protocol::{EncodedMessage, Message, RoomName, UserId};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("malformed cluster record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("malformed cluster record: bad user id")]
    User,
}

/// One message in a room's cluster log.
#[derive(Serialize, Deserialize)]
pub struct LogRecord<'a> {
    pub id: &'a str,
    pub user: &'a str,
    #[serde(borrow)]
    pub data: &'a RawValue,
    pub ts: u64,
}

impl LogRecord<'_> {
    /// The message frame every node serves for this record at `offset`.
    pub fn to_message(&self, room: &RoomName, offset: u64) -> Result<EncodedMessage, RecordError> {
        let user = UserId::parse(self.user).map_err(|_| RecordError::User)?;
        Ok(Message {
            kind: crate::protocol::server::MessageTag,
            room,
            offset,
            id: self.id,
            user: &user,
            data: self.data,
            ts: self.ts,
        }
        .encode())
    }

    pub fn decode(payload: &[u8]) -> Result<LogRecord<'_>, RecordError> {
        Ok(serde_json::from_slice(payload)?)
    }
}

/// Presence and typing between the nodes that serve a room (core NATS: lost
/// while a link is down, which the periodic presence refresh repairs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RoomEvent {
    /// A node's whole presence in the room: user → sessions on that node.
    /// Sent on every change, every heartbeat interval, and on `sync`.
    Presence {
        node: String,
        users: BTreeMap<String, u32>,
    },
    /// A node started serving the room: the others send their presence now.
    Sync { node: String },
    Typing {
        node: String,
        user: String,
        active: bool,
    },
}

impl RoomEvent {
    pub fn node(&self) -> &str {
        match self {
            RoomEvent::Presence { node, .. }
            | RoomEvent::Sync { node }
            | RoomEvent::Typing { node, .. } => node,
        }
    }
}

/// A direct message for every session of `user`, wherever it is.
#[derive(Debug, Serialize, Deserialize)]
pub struct DirectRecord {
    pub node: String,
    pub user: String,
    /// The encoded `direct` frame, as the sending node made it.
    pub frame: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_record_becomes_the_same_message_everywhere() {
        let data = RawValue::from_string(r#"{"text":"hi"}"#.into()).unwrap();
        let record = LogRecord {
            id: "abc",
            user: "ann",
            data: &data,
            ts: 7,
        };
        let bytes = serde_json::to_vec(&record).unwrap();
        let room = RoomName::parse("r").unwrap();
        let message = LogRecord::decode(&bytes)
            .unwrap()
            .to_message(&room, 42)
            .unwrap();
        assert_eq!(
            message.as_str(),
            r#"{"type":"message","room":"r","offset":42,"id":"abc","user":"ann","data":{"text":"hi"},"ts":7}"#
        );
        assert!(LogRecord::decode(b"{").is_err());
    }

    /// Catch-up and the live log decode records that other nodes (or older
    /// versions, before publishes were checked) wrote: data no `Value` can
    /// hold is carried through byte for byte, never parsed, never a panic.
    #[test]
    fn poisoned_data_in_a_record_is_carried_through_raw() {
        let room = RoomName::parse("r").unwrap();
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for data in ["1e999999", r#""\ud800""#, deep.as_str()] {
            let payload = format!(r#"{{"id":"i","user":"ann","data":{data},"ts":1}}"#);
            let message = LogRecord::decode(payload.as_bytes())
                .expect("a record with poisoned data decodes")
                .to_message(&room, 3)
                .expect("and becomes a message");
            assert!(message.as_str().contains(data), "{}", message.as_str());
            assert_eq!((message.offset, message.ts), (3, 1));
        }
    }

    #[test]
    fn events_round_trip() {
        let event = RoomEvent::Typing {
            node: "n1".into(),
            user: "ann".into(),
            active: true,
        };
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(serde_json::from_str::<RoomEvent>(&json).unwrap(), event);
    }
}
