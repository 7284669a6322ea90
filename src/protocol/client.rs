//! Client → hub frames and their decoder.
//!
//! Decoding is staged so that every failure maps to the right error code
//! (docs/protocol.md, "Frames in general"): not a JSON object → `invalid_json`; no string
//! `type` → `bad_request`; an unknown `type` → `unknown_type`; a known type
//! with missing or ill-typed fields → `bad_request`. A valid `ref` is kept
//! even when the rest of the frame is bad, so the error can echo it.
//!
//! `data` is kept as raw JSON text: the hub never needs to look inside it,
//! only to measure it and copy it into the `message` frame.

use super::codes::ErrorCode;
use super::data::check_data;
use super::names::{RoomName, UserId};
use super::{MAX_HISTORY_PAGE, MAX_REF_CHARS};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;

/// Where a resuming client left off: the room's epoch and the last offset it saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Since {
    pub epoch: u64,
    pub offset: u64,
}

#[derive(Debug)]
pub enum ClientFrame {
    Join {
        room: RoomName,
        since: Option<Since>,
        /// How many recent messages to replay; `None` means the configured default.
        history: Option<usize>,
    },
    Leave {
        room: RoomName,
    },
    Publish {
        room: RoomName,
        data: Box<RawValue>,
        key: Option<String>,
    },
    Typing {
        room: RoomName,
        active: bool,
    },
    Presence {
        room: RoomName,
    },
    History {
        room: RoomName,
        before: Option<u64>,
        limit: usize,
    },
    Direct {
        to: UserId,
        data: Box<RawValue>,
    },
    Ping,
}

/// A decoded frame with the `ref` the client attached to it.
#[derive(Debug)]
pub struct ClientRequest {
    pub reference: Option<String>,
    pub frame: ClientFrame,
}

/// Why a frame was refused; `reference` is the frame's `ref` when it was valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct DecodeError {
    pub code: ErrorCode,
    pub reference: Option<String>,
    pub message: String,
}

/// The default `limit` of a `history` request.
pub const DEFAULT_HISTORY_LIMIT: usize = 50;

type Fields<'a> = HashMap<String, &'a RawValue>;

struct Decoder<'a> {
    fields: Fields<'a>,
    reference: Option<String>,
}

impl<'a> Decoder<'a> {
    fn bad(&self, message: impl Into<String>) -> DecodeError {
        DecodeError {
            code: ErrorCode::BadRequest,
            reference: self.reference.clone(),
            message: message.into(),
        }
    }

    fn parse<T: DeserializeOwned>(
        &self,
        name: &str,
        raw: &RawValue,
        what: &str,
    ) -> Result<T, DecodeError> {
        serde_json::from_str(raw.get()).map_err(|_| self.bad(format!("`{name}` must be {what}")))
    }

    fn optional<T: DeserializeOwned>(
        &self,
        name: &str,
        what: &str,
    ) -> Result<Option<T>, DecodeError> {
        match self.fields.get(name) {
            None => Ok(None),
            Some(raw) if raw.get() == "null" => Ok(None),
            Some(raw) => self.parse(name, raw, what).map(Some),
        }
    }

    fn required<T: DeserializeOwned>(&self, name: &str, what: &str) -> Result<T, DecodeError> {
        self.optional(name, what)?
            .ok_or_else(|| self.bad(format!("`{name}` is required and must be {what}")))
    }

    fn room(&self) -> Result<RoomName, DecodeError> {
        let name: String = self.required("room", "a string")?;
        RoomName::parse(&name).map_err(|e| self.bad(e.to_string()))
    }

    /// `data` may be any JSON, `null` included, that readers can parse back
    /// ([`check_data`]), but must be present.
    fn data(&self) -> Result<Box<RawValue>, DecodeError> {
        let data = self
            .fields
            .get("data")
            .ok_or_else(|| self.bad("`data` is required"))?;
        check_data(data).map_err(|e| self.bad(format!("`data`: {e}")))?;
        Ok((*data).to_owned())
    }

    fn bounded(
        &self,
        name: &str,
        value: Option<u64>,
        min: usize,
        max: usize,
    ) -> Result<Option<usize>, DecodeError> {
        match value {
            Some(n) if (n as usize) < min || n as usize > max => {
                Err(self.bad(format!("`{name}` must be between {min} and {max}")))
            }
            other => Ok(other.map(|n| n as usize)),
        }
    }
}

/// Decodes one text frame.
pub fn decode(text: &str) -> Result<ClientRequest, DecodeError> {
    let fields: Fields<'_> = serde_json::from_str(text).map_err(|_| DecodeError {
        code: ErrorCode::InvalidJson,
        reference: None,
        message: "frames must be JSON objects".into(),
    })?;
    let mut d = Decoder {
        fields,
        reference: None,
    };
    // The ref is read first so that every later error can echo it.
    let reference: Option<String> = d.optional("ref", "a string")?;
    if let Some(r) = &reference {
        if r.chars().count() > MAX_REF_CHARS {
            return Err(d.bad(format!("`ref` is at most {MAX_REF_CHARS} characters")));
        }
    }
    d.reference = reference;
    let kind: String = match d.fields.get("type") {
        Some(raw) => d.parse("type", raw, "a string")?,
        None => return Err(d.bad("`type` is required and must be a string")),
    };
    let frame = match kind.as_str() {
        "join" => ClientFrame::Join {
            room: d.room()?,
            since: d.optional("since", "an object {\"epoch\":E,\"offset\":N}")?,
            history: {
                let n = d.optional("history", "a whole number")?;
                d.bounded("history", n, 0, MAX_HISTORY_PAGE)?
            },
        },
        "leave" => ClientFrame::Leave { room: d.room()? },
        "publish" => {
            let key: Option<String> = d.optional("key", "a string")?;
            if let Some(k) = &key {
                if k.is_empty() || k.chars().count() > MAX_REF_CHARS {
                    return Err(d.bad(format!("`key` is 1 to {MAX_REF_CHARS} characters")));
                }
            }
            ClientFrame::Publish {
                room: d.room()?,
                data: d.data()?,
                key,
            }
        }
        "typing" => ClientFrame::Typing {
            room: d.room()?,
            active: d.required("active", "a boolean")?,
        },
        "presence" => ClientFrame::Presence { room: d.room()? },
        "history" => ClientFrame::History {
            room: d.room()?,
            before: d.optional("before", "an offset (a whole number)")?,
            limit: {
                let n = d.optional("limit", "a whole number")?;
                d.bounded("limit", n, 1, MAX_HISTORY_PAGE)?
                    .unwrap_or(DEFAULT_HISTORY_LIMIT)
            },
        },
        "direct" => {
            let to: String = d.required("to", "a user id")?;
            ClientFrame::Direct {
                to: UserId::parse(&to).map_err(|e| d.bad(e.to_string()))?,
                data: d.data()?,
            }
        }
        "ping" => ClientFrame::Ping,
        other => {
            return Err(DecodeError {
                code: ErrorCode::UnknownType,
                reference: d.reference,
                message: format!(
                    "unknown frame type `{}`",
                    other.chars().take(64).collect::<String>()
                ),
            })
        }
    };
    Ok(ClientRequest {
        reference: d.reference,
        frame,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        decode(text).unwrap_err().code
    }

    #[test]
    fn classifies_bad_frames() {
        assert_eq!(code("nope"), ErrorCode::InvalidJson);
        assert_eq!(code("[1,2]"), ErrorCode::InvalidJson);
        assert_eq!(code("\"join\""), ErrorCode::InvalidJson);
        assert_eq!(code("{}"), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"type":5}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"join"}"#), ErrorCode::BadRequest);
        assert_eq!(
            code(r#"{"type":"join","room":"a b"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"join","room":"a","history":201}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"publish","room":"a"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"typing","room":"a","active":"yes"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"history","room":"a","limit":0}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"direct","to":"a b","data":1}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(code(r#"{"type":"ping","ref":7}"#), ErrorCode::BadRequest);
    }

    #[test]
    fn echoes_a_valid_ref_on_errors() {
        let err = decode(r#"{"type":"dance","ref":"r1"}"#).unwrap_err();
        assert_eq!(err.reference.as_deref(), Some("r1"));
        let err = decode(r#"{"type":"join","ref":"r2"}"#).unwrap_err();
        assert_eq!(err.reference.as_deref(), Some("r2"));
        let long = format!(r#"{{"type":"ping","ref":"{}"}}"#, "x".repeat(65));
        assert_eq!(decode(&long).unwrap_err().reference, None);
    }

    #[test]
    fn decodes_publish_keeping_data_raw() {
        let req = decode(
            r#"{"type":"publish","room":"r","data":{"text":"hi", "n":[1,2]},"key":"k1","ref":"a"}"#,
        )
        .unwrap();
        assert_eq!(req.reference.as_deref(), Some("a"));
        match req.frame {
            ClientFrame::Publish { room, data, key } => {
                assert_eq!(room.as_str(), "r");
                assert_eq!(data.get(), r#"{"text":"hi", "n":[1,2]}"#);
                assert_eq!(key.as_deref(), Some("k1"));
            }
            other => panic!("{other:?}"),
        }
        // `null` is valid data.
        assert!(decode(r#"{"type":"publish","room":"r","data":null}"#).is_ok());
        // Data no reader could parse back is refused.
        for data in [
            "1e999999",
            r#""\ud800""#,
            &format!("{}1{}", "[".repeat(127), "]".repeat(127)),
        ] {
            let frame = format!(r#"{{"type":"publish","room":"r","data":{data}}}"#);
            assert_eq!(code(&frame), ErrorCode::BadRequest, "{data}");
        }
    }

    #[test]
    fn decodes_join_since_and_defaults() {
        let req =
            decode(r#"{"type":"join","room":"r","since":{"epoch":7,"offset":3},"history":0}"#)
                .unwrap();
        match req.frame {
            ClientFrame::Join { since, history, .. } => {
                assert_eq!(
                    since,
                    Some(Since {
                        epoch: 7,
                        offset: 3
                    })
                );
                assert_eq!(history, Some(0));
            }
            other => panic!("{other:?}"),
        }
        match decode(r#"{"type":"history","room":"r"}"#).unwrap().frame {
            ClientFrame::History { limit, before, .. } => {
                assert_eq!(limit, DEFAULT_HISTORY_LIMIT);
                assert_eq!(before, None);
            }
            other => panic!("{other:?}"),
        }
    }
}
