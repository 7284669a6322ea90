//! What nodes send each other, as JSON. A record of a room's cluster log is
//! a [`LogBatch`]: consecutive messages with the room's epoch and the first
//! one's offset, so id, user, data, `ts`, epoch and offset are made once, on
//! the node that took the publishes, and are the same on every node.

use crate::protocol::{EncodedMessage, Message, RoomName, UserId};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("malformed cluster record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("malformed cluster record: bad user id")]
    User,
    #[error("malformed cluster record: no messages, or offset 0")]
    Empty,
}

/// One record of a room's cluster log: messages `first..first + len`.
#[derive(Serialize, Deserialize)]
pub struct LogBatch<'a> {
    /// The room's epoch.
    #[serde(rename = "e")]
    pub epoch: u64,
    /// The offset of the first message.
    #[serde(rename = "o")]
    pub first: u64,
    /// The writer's id for this batch, so a writer whose ack was lost knows
    /// its batch when it finds it in the log.
    #[serde(rename = "b")]
    pub batch: Cow<'a, str>,
    /// The stream sequence of the room's record this one was appended
    /// after (the expected last subject sequence). A record is part of the
    /// room's log only if it directly follows that record on its subject:
    /// JetStream checks this when it stores the record, but not always
    /// (replicated streams of nats-server before 2.9.21 accept concurrent
    /// appends with the same expectation, nats-io/nats-server#4320, and the
    /// check is leader-local across leader changes), so every node checks
    /// it again, the same way, when it applies the log. Absent in records
    /// written before this check (taken as they are).
    #[serde(rename = "a", default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    #[serde(rename = "m", borrow)]
    pub messages: Vec<LogRecord<'a>>,
}

impl<'a> LogBatch<'a> {
    pub fn decode(payload: &'a [u8]) -> Result<LogBatch<'a>, RecordError> {
        let batch: LogBatch = serde_json::from_slice(payload)?;
        if batch.messages.is_empty() || batch.first == 0 {
            return Err(RecordError::Empty);
        }
        Ok(batch)
    }

    /// The offset of the last message.
    pub fn last(&self) -> u64 {
        self.first + self.messages.len() as u64 - 1
    }

    /// The messages with their offsets, oldest first.
    pub fn offsets(&self) -> impl Iterator<Item = (u64, &LogRecord<'a>)> {
        (self.first..).zip(self.messages.iter())
    }
}

/// One message in a room's cluster log.
#[derive(Serialize, Deserialize)]
pub struct LogRecord<'a> {
    pub id: &'a str,
    pub user: &'a str,
    #[serde(borrow)]
    pub data: &'a RawValue,
    pub ts: u64,
    /// The publish's idempotency key: every node learns it with the
    /// message, so a repeat is recognised on whichever node it arrives.
    #[serde(rename = "k", default, borrow, skip_serializing_if = "Option::is_none")]
    pub key: Option<Cow<'a, str>>,
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
        /// With this change the room became empty and the node reported
        /// `room_vacated` (so the others need not).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        vacated: bool,
        /// With this change the node's first user arrived in a room it saw
        /// empty: it holds a `room_occupied` (settled by node id in a race).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        occupied: bool,
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
            key: None,
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
    fn a_batch_round_trips_with_offsets_and_keys() {
        let data = RawValue::from_string("1".into()).unwrap();
        let record = |id, key: Option<&'static str>| LogRecord {
            id,
            user: "ann",
            data: &data,
            ts: 1,
            key: key.map(Cow::Borrowed),
        };
        let batch = LogBatch {
            epoch: 9,
            first: 4,
            batch: "n1-1".into(),
            after: Some(17),
            messages: vec![record("a", Some("k\"1")), record("b", None)],
        };
        let bytes = serde_json::to_vec(&batch).unwrap();
        let back = LogBatch::decode(&bytes).unwrap();
        assert_eq!((back.epoch, back.first, back.last()), (9, 4, 5));
        assert_eq!(back.after, Some(17));
        let legacy = LogBatch::decode(
            br#"{"e":1,"o":1,"b":"x","m":[{"id":"a","user":"u","data":1,"ts":1}]}"#,
        );
        assert_eq!(legacy.unwrap().after, None);
        let offsets: Vec<_> = back.offsets().map(|(o, r)| (o, r.id)).collect();
        assert_eq!(offsets, [(4, "a"), (5, "b")]);
        assert_eq!(back.messages[0].key.as_deref(), Some("k\"1"));
        assert!(LogBatch::decode(br#"{"e":1,"o":1,"b":"x","m":[]}"#).is_err());
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
