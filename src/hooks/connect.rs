//! The connect hook: the backend decides who an upgrade is, before the 101.

use super::client::{Hook, HookClient};
use crate::auth::RoomPattern;
use crate::protocol::UserId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connect hook calls in flight per node: an upgrade beyond them is refused
/// at once (503) rather than queued, so a slow backend cannot make the hub
/// hold an unbounded number of half-open connections.
pub const MAX_CONNECT_CALLS: usize = 256;

/// The request body (PROTOCOL.md, "Backend hooks").
#[derive(Debug, Serialize)]
pub struct ConnectEvent {
    pub event: &'static str,
    pub node: String,
    pub ip: Option<String>,
    /// The token's `sub`, or `?user=`.
    pub user: Option<String>,
    /// The query parameters but `token`.
    pub query: BTreeMap<String, String>,
    /// `origin`, `cookie` and `user-agent`, those that were sent.
    pub headers: BTreeMap<&'static str, String>,
}

/// The headers a connect event carries.
pub const FORWARDED_HEADERS: [&str; 3] = ["origin", "cookie", "user-agent"];

/// What the backend decided.
#[derive(Debug)]
pub enum ConnectVerdict {
    Accept {
        user: UserId,
        rooms: Option<Vec<RoomPattern>>,
    },
    /// 401 or 403: the upgrade gets that status.
    Refuse(u16),
    /// Any other answer, or none in time: fail closed.
    Unavailable(String),
}

#[derive(Deserialize)]
struct Accepted {
    user: String,
    #[serde(default)]
    rooms: Option<Vec<String>>,
}

pub struct ConnectHook {
    client: Arc<HookClient>,
    url: String,
    calls: Arc<Semaphore>,
}

impl ConnectHook {
    pub fn new(client: Arc<HookClient>, url: String) -> Self {
        Self {
            client,
            url,
            calls: Arc::new(Semaphore::new(MAX_CONNECT_CALLS)),
        }
    }

    /// A slot for one call, or `None` when [`MAX_CONNECT_CALLS`] are in flight.
    pub fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.calls.clone().try_acquire_owned().ok()
    }

    /// Asks the backend; holds `slot` until the answer (or the timeout).
    pub async fn ask(&self, event: &ConnectEvent, slot: OwnedSemaphorePermit) -> ConnectVerdict {
        // A struct of strings and maps always serializes.
        let body = serde_json::to_vec(event).expect("connect event serializes");
        let answer = self.client.post(Hook::Connect, &self.url, body).await;
        drop(slot);
        match answer {
            Err(e) => ConnectVerdict::Unavailable(e.to_string()),
            Ok(answer) => match answer.status {
                200 => {
                    let verdict = accepted(&answer.body);
                    if matches!(verdict, ConnectVerdict::Unavailable(_)) {
                        self.client.unusable_answer(Hook::Connect);
                    }
                    verdict
                }
                status @ (401 | 403) => ConnectVerdict::Refuse(status),
                status => ConnectVerdict::Unavailable(format!("the backend answered {status}")),
            },
        }
    }
}

fn accepted(body: &[u8]) -> ConnectVerdict {
    let accepted: Accepted = match serde_json::from_slice(body) {
        Ok(a) => a,
        Err(e) => return ConnectVerdict::Unavailable(format!("the backend's answer: {e}")),
    };
    match UserId::parse(&accepted.user) {
        Ok(user) => ConnectVerdict::Accept {
            user,
            rooms: accepted
                .rooms
                .map(|patterns| patterns.iter().map(|p| RoomPattern::new(p)).collect()),
        },
        Err(e) => ConnectVerdict::Unavailable(format!("the backend named a bad user: {e}")),
    }
}
