//! The reference in docs/ cannot drift from the code: every example frame in
//! docs/protocol.md goes through the hub's own codec (client frames through
//! its decoder; hub frames are rebuilt from their fields and encoded by its
//! encoder, which must give the example back), every frame type, error code
//! and close code is documented, and docs/configuration.md lists exactly the
//! settings there are.

use roomhub::config::Settings;
use roomhub::protocol::server::MessageTag;
use roomhub::protocol::{
    decode, encode, CloseCode, EncodedMessage, ErrorCode, Message, PresenceEntry, RoomName,
    ServerFrame, UserId,
};
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::BTreeSet;

fn doc(name: &str) -> String {
    let path = format!("{}/docs/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The lines of every fenced block whose info string is exactly `info`
/// (one frame per line), with their line numbers.
fn examples(text: &str, info: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut inside = false;
    for (n, line) in text.lines().enumerate() {
        let fence = line.trim_start().starts_with("```");
        match (inside, fence) {
            (false, true) => inside = line.trim() == format!("```{info}"),
            (true, true) => inside = false,
            (true, false) if !line.trim().is_empty() => out.push((n + 1, line.trim().to_owned())),
            _ => {}
        }
    }
    out
}

#[test]
fn every_client_frame_example_decodes() {
    let text = doc("protocol.md");
    let frames = examples(&text, "json client");
    let mut types = BTreeSet::new();
    for (line, frame) in &frames {
        if let Err(e) = decode(frame) {
            panic!("docs/protocol.md:{line}: {frame}\n  refused by the decoder: {e}");
        }
        let value: Value = serde_json::from_str(frame).unwrap();
        types.insert(value["type"].as_str().unwrap().to_owned());
    }
    let all = [
        "join", "leave", "publish", "typing", "presence", "history", "direct", "ping",
    ];
    for kind in all {
        assert!(types.contains(kind), "no `json client` example of `{kind}`");
    }
}

#[test]
fn every_hub_frame_example_is_what_the_encoder_sends() {
    let text = doc("protocol.md");
    let mut types = BTreeSet::new();
    for (line, frame) in examples(&text, "json server") {
        let value: Value = serde_json::from_str(&frame)
            .unwrap_or_else(|e| panic!("docs/protocol.md:{line}: not JSON ({e}): {frame}"));
        let encoded =
            reencode(&value).unwrap_or_else(|e| panic!("docs/protocol.md:{line}: {e}\n  {frame}"));
        let back: Value = serde_json::from_str(&encoded).unwrap();
        assert_eq!(
            back, value,
            "docs/protocol.md:{line}: the hub would send\n  {encoded}\nfor\n  {frame}"
        );
        types.insert(value["type"].as_str().unwrap().to_owned());
    }
    let all = [
        "welcome",
        "joined",
        "message",
        "ack",
        "user_joined",
        "user_left",
        "typing",
        "presence",
        "history",
        "direct",
        "pong",
        "error",
        "shutdown",
    ];
    for kind in all {
        assert!(types.contains(kind), "no `json server` example of `{kind}`");
    }
}

#[test]
fn every_error_and_close_code_is_documented() {
    let text = doc("protocol.md");
    for code in ErrorCode::ALL {
        assert!(
            text.contains(&format!("| `{}` |", code.as_str())),
            "error code {} is not in the table",
            code.as_str()
        );
    }
    for close in [
        CloseCode::Normal,
        CloseCode::Draining,
        CloseCode::ProtocolError,
        CloseCode::InvalidData,
        CloseCode::Policy,
        CloseCode::FrameTooBig,
        CloseCode::Internal,
        CloseCode::TooSlow,
    ] {
        assert!(
            text.contains(&format!("| {} |", close.code())),
            "close code {} is not in the table",
            close.code()
        );
    }
}

/// Every key of the settings, from the settings structs themselves.
fn setting_keys() -> BTreeSet<String> {
    fn walk(prefix: &str, value: &toml::Value, out: &mut BTreeSet<String>) {
        match value {
            toml::Value::Table(table) => {
                for (k, v) in table {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            _ => {
                out.insert(prefix.to_owned());
            }
        }
    }
    let mut defaults = Settings::default();
    // Unset by default (so not serialized), but a setting all the same.
    defaults.server.node_id = Some("n".into());
    let mut keys = BTreeSet::new();
    walk("", &toml::Value::try_from(&defaults).unwrap(), &mut keys);
    keys
}

#[test]
fn the_configuration_reference_lists_exactly_the_settings() {
    let text = doc("configuration.md");
    let keys = setting_keys();
    for key in &keys {
        assert!(
            text.contains(&format!("| `{key}` |")),
            "docs/configuration.md has no row for `{key}`"
        );
    }
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("| `") else {
            continue;
        };
        let name = rest.split('`').next().unwrap_or_default();
        if name.contains('.') && !name.contains(' ') && !name.starts_with("ROOMHUB") {
            assert!(
                keys.contains(name),
                "docs/configuration.md documents unknown `{name}`"
            );
        }
    }
}

// ---- rebuilding a hub frame from its fields ------------------------------

type Fields<'a> = &'a serde_json::Map<String, Value>;

fn field<'a>(f: Fields<'a>, name: &str) -> Result<&'a Value, String> {
    f.get(name).ok_or_else(|| format!("`{name}` is missing"))
}

fn string<'a>(f: Fields<'a>, name: &str) -> Result<&'a str, String> {
    field(f, name)?
        .as_str()
        .ok_or_else(|| format!("`{name}` must be a string"))
}

fn number(f: Fields<'_>, name: &str) -> Result<u64, String> {
    field(f, name)?
        .as_u64()
        .ok_or_else(|| format!("`{name}` must be a whole number"))
}

fn boolean(f: Fields<'_>, name: &str) -> Result<bool, String> {
    field(f, name)?
        .as_bool()
        .ok_or_else(|| format!("`{name}` must be a boolean"))
}

fn reference<'a>(f: Fields<'a>) -> Result<Option<&'a str>, String> {
    f.get("ref")
        .map(|r| r.as_str().ok_or("`ref` must be a string".to_owned()))
        .transpose()
}

fn room(f: Fields<'_>) -> Result<RoomName, String> {
    RoomName::parse(string(f, "room")?).map_err(|e| e.to_string())
}

fn user(f: Fields<'_>, name: &str) -> Result<UserId, String> {
    UserId::parse(string(f, name)?).map_err(|e| e.to_string())
}

fn raw(value: &Value) -> Box<RawValue> {
    RawValue::from_string(value.to_string()).expect("a Value is valid JSON")
}

fn object(value: &Value) -> Result<Fields<'_>, String> {
    value.as_object().ok_or_else(|| "not an object".to_owned())
}

fn message(value: &Value) -> Result<EncodedMessage, String> {
    let f = object(value)?;
    if string(f, "type")? != "message" {
        return Err("a message's `type` must be \"message\"".into());
    }
    let (room, user) = (room(f)?, user(f, "user")?);
    let data = raw(field(f, "data")?);
    Ok(Message {
        kind: MessageTag,
        room: &room,
        offset: number(f, "offset")?,
        id: string(f, "id")?,
        user: &user,
        data: &data,
        ts: number(f, "ts")?,
    }
    .encode())
}

fn messages(f: Fields<'_>, name: &str) -> Result<Vec<EncodedMessage>, String> {
    field(f, name)?
        .as_array()
        .ok_or_else(|| format!("`{name}` must be a list"))?
        .iter()
        .map(message)
        .collect()
}

fn presence(f: Fields<'_>, name: &str) -> Result<Vec<PresenceEntry>, String> {
    let list = field(f, name)?
        .as_array()
        .ok_or_else(|| format!("`{name}` must be a list"))?;
    list.iter()
        .map(|entry| {
            let e = object(entry)?;
            Ok(PresenceEntry {
                user: user(e, "user")?,
                sessions: number(e, "sessions")? as u32,
            })
        })
        .collect()
}

fn error_code(f: Fields<'_>) -> Result<ErrorCode, String> {
    let code = string(f, "code")?;
    ErrorCode::ALL
        .into_iter()
        .find(|c| c.as_str() == code)
        .ok_or_else(|| format!("`{code}` is not an error code"))
}

/// Builds the hub's frame from the example's fields and encodes it with the
/// hub's encoder. Fields the frame does not have are simply not carried
/// over, so the comparison with the example catches them.
fn reencode(value: &Value) -> Result<String, String> {
    let f = object(value)?;
    let r = reference(f)?;
    Ok(match string(f, "type")? {
        "message" => message(value)?.as_str().to_owned(),
        "welcome" => encode(&ServerFrame::Welcome {
            session: string(f, "session")?,
            user: &user(f, "user")?,
            node: string(f, "node")?,
            heartbeat_ms: number(f, "heartbeat_ms")?,
            protocol: number(f, "protocol")? as u32,
        }),
        "joined" => encode(&ServerFrame::Joined {
            reference: r,
            room: &room(f)?,
            epoch: number(f, "epoch")?,
            offset: number(f, "offset")?,
            history: &messages(f, "history")?,
            recovered: boolean(f, "recovered")?,
            presence: &presence(f, "presence")?,
        }),
        "ack" => encode(&ServerFrame::Ack {
            reference: r,
            offset: f.get("offset").map(|_| number(f, "offset")).transpose()?,
        }),
        "user_joined" => encode(&ServerFrame::UserJoined {
            room: &room(f)?,
            user: &user(f, "user")?,
        }),
        "user_left" => encode(&ServerFrame::UserLeft {
            room: &room(f)?,
            user: &user(f, "user")?,
        }),
        "typing" => encode(&ServerFrame::Typing {
            room: &room(f)?,
            user: &user(f, "user")?,
            active: boolean(f, "active")?,
        }),
        "presence" => encode(&ServerFrame::Presence {
            reference: r,
            room: &room(f)?,
            users: &presence(f, "users")?,
        }),
        "history" => encode(&ServerFrame::History {
            reference: r,
            room: &room(f)?,
            messages: &messages(f, "messages")?,
        }),
        "direct" => encode(&ServerFrame::Direct {
            from: &user(f, "from")?,
            data: &raw(field(f, "data")?),
            ts: number(f, "ts")?,
        }),
        "pong" => encode(&ServerFrame::Pong { reference: r }),
        "error" => encode(&ServerFrame::Error {
            reference: r,
            code: error_code(f)?,
            message: string(f, "message")?,
            retry_after_ms: f
                .get("retry_after_ms")
                .map(|_| number(f, "retry_after_ms"))
                .transpose()?,
            room: f.get("room").map(|_| room(f)).transpose()?.as_ref(),
        }),
        "shutdown" => encode(&ServerFrame::Shutdown {
            reason: string(f, "reason")?,
            reconnect: boolean(f, "reconnect")?,
        }),
        other => return Err(format!("`{other}` is not a frame the hub sends")),
    })
}
