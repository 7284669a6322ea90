//! Every open session on this node, by user: for direct messages (which reach
//! every session of a user) and for the drain (which tells every session).

use crate::outbound::{Offer, Outbound, SessionLink, WireFrames};
use crate::protocol::{SessionId, UserId};
use parking_lot::RwLock;
use std::collections::HashMap;

#[derive(Default)]
pub struct SessionDirectory {
    users: RwLock<HashMap<UserId, HashMap<SessionId, SessionLink>>>,
}

impl SessionDirectory {
    pub fn register(&self, user: &UserId, session: SessionId, link: SessionLink) {
        self.users
            .write()
            .entry(user.clone())
            .or_default()
            .insert(session, link);
    }

    pub fn unregister(&self, user: &UserId, session: SessionId) {
        let mut users = self.users.write();
        if let Some(sessions) = users.get_mut(user) {
            sessions.remove(&session);
            if sessions.is_empty() {
                users.remove(user);
            }
        }
    }

    /// Offers `frame` to every session of `user`; returns how many took it.
    pub fn send_to_user(&self, user: &UserId, frame: &str) -> usize {
        let users = self.users.read();
        users
            .get(user)
            .map(|sessions| {
                let frame = WireFrames::text(frame);
                sessions
                    .values()
                    .filter(|link| link.offer(&frame) == Offer::Delivered)
                    .count()
            })
            .unwrap_or(0)
    }

    /// Sends `message` to every session on this node.
    pub fn tell_all(&self, message: Outbound) {
        for link in self.users.read().values().flat_map(|s| s.values()) {
            link.tell(message.clone());
        }
    }

    pub fn session_count(&self) -> usize {
        self.users.read().values().map(HashMap::len).sum()
    }
}
