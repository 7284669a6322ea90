//! The publish hook: the backend approves, rewrites or refuses a client's
//! publish before it gets an offset.

use super::client::{Hook, HookClient};
use crate::protocol::{RoomName, UserId};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::future::Future;
use std::sync::Arc;

#[derive(Serialize)]
struct PublishEvent<'a> {
    event: &'static str,
    node: &'a str,
    room: &'a RoomName,
    user: &'a UserId,
    data: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
}

/// What the backend decided.
#[derive(Debug)]
pub enum PublishVerdict {
    /// 200 `{}`.
    AsIs,
    /// 200 `{"data":…}` (still to be checked like any published data).
    Replace(Box<RawValue>),
    /// 403, with the backend's message if it gave one.
    Forbidden(Option<String>),
    /// Any other answer, or none in time.
    Unavailable(String),
}

#[derive(Deserialize)]
struct Approved {
    // `Option<Box<RawValue>>` would read `"data":null` as no data at all.
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize, Default)]
struct Refused {
    #[serde(default)]
    message: Option<String>,
}

pub struct PublishHook {
    client: Arc<HookClient>,
    url: Arc<str>,
    node: Arc<str>,
}

impl PublishHook {
    pub fn new(client: Arc<HookClient>, url: String, node: &str) -> Self {
        Self {
            client,
            url: url.into(),
            node: node.into(),
        }
    }

    /// The call, as a future that owns what it needs (the body is made now).
    pub fn ask(
        &self,
        room: &RoomName,
        user: &UserId,
        data: &RawValue,
        key: Option<&str>,
    ) -> impl Future<Output = PublishVerdict> + 'static {
        let event = PublishEvent {
            event: "publish",
            node: &self.node,
            room,
            user,
            data,
            key,
        };
        // Strings and already-valid raw JSON always serialize.
        let body = serde_json::to_vec(&event).expect("publish event serializes");
        let (client, url) = (self.client.clone(), self.url.clone());
        async move {
            match client.post(Hook::Publish, &url, body).await {
                Err(e) => PublishVerdict::Unavailable(e.to_string()),
                Ok(answer) => match answer.status {
                    200 => match serde_json::from_slice::<Approved>(&answer.body) {
                        Ok(Approved { data: None }) => PublishVerdict::AsIs,
                        Ok(Approved { data: Some(data) }) => PublishVerdict::Replace(data),
                        Err(e) => {
                            client.unusable_answer(Hook::Publish);
                            PublishVerdict::Unavailable(format!("the backend's answer: {e}"))
                        }
                    },
                    403 => PublishVerdict::Forbidden(
                        serde_json::from_slice::<Refused>(&answer.body)
                            .unwrap_or_default()
                            .message,
                    ),
                    status => PublishVerdict::Unavailable(format!("the backend answered {status}")),
                },
            }
        }
    }
}
