//! Who is in a room: this node's sessions per user, plus (in cluster mode)
//! what every other node last said about its own. A user is present while
//! any node counts a session of theirs; `user_joined`/`user_left` mark the
//! moments the room-wide count leaves or reaches zero, so every node tells
//! its own members about the same changes.

use crate::protocol::{PresenceEntry, UserId};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Joined(UserId),
    Left(UserId),
}

struct RemoteNode {
    users: BTreeMap<UserId, u32>,
    seen: Instant,
}

#[derive(Default)]
pub struct Presence {
    local: BTreeMap<UserId, u32>,
    remote: HashMap<String, RemoteNode>,
}

impl Presence {
    fn total(&self, user: &UserId) -> u32 {
        self.local.get(user).copied().unwrap_or(0)
            + self
                .remote
                .values()
                .map(|n| n.users.get(user).copied().unwrap_or(0))
                .sum::<u32>()
    }

    /// One more session of `user` on this node.
    pub fn add_local(&mut self, user: &UserId) -> Option<Change> {
        let before = self.total(user);
        *self.local.entry(user.clone()).or_insert(0) += 1;
        (before == 0).then(|| Change::Joined(user.clone()))
    }

    /// One session fewer of `user` on this node.
    pub fn remove_local(&mut self, user: &UserId) -> Option<Change> {
        let count = self.local.get_mut(user)?;
        *count -= 1;
        if *count == 0 {
            self.local.remove(user);
        }
        (self.total(user) == 0).then(|| Change::Left(user.clone()))
    }

    /// Replaces what `node` counts (its whole presence in this room).
    pub fn set_remote(
        &mut self,
        node: &str,
        users: BTreeMap<UserId, u32>,
        now: Instant,
    ) -> Vec<Change> {
        let touched: BTreeSet<UserId> = users
            .keys()
            .chain(
                self.remote
                    .get(node)
                    .into_iter()
                    .flat_map(|n| n.users.keys()),
            )
            .cloned()
            .collect();
        let before: Vec<u32> = touched.iter().map(|u| self.total(u)).collect();
        let users = users.into_iter().filter(|(_, n)| *n > 0).collect();
        self.remote
            .insert(node.to_owned(), RemoteNode { users, seen: now });
        self.changes(touched, before)
    }

    /// Forgets nodes not heard of since `cutoff` (dead or cut off).
    #[cfg(test)]
    pub fn expire_remote(&mut self, cutoff: Instant) -> Vec<Change> {
        self.expire_remote_where(|_, seen| seen < cutoff)
            .into_iter()
            .flat_map(|(_, changes, _)| changes)
            .collect()
    }

    /// Forgets the nodes `gone(node, last presence heard)` says are gone,
    /// in the order of their names (the same on every node): each with the
    /// changes its removal made and whether it left the room empty.
    pub fn expire_remote_where(
        &mut self,
        gone: impl Fn(&str, Instant) -> bool,
    ) -> Vec<(String, Vec<Change>, bool)> {
        let mut stale: Vec<String> = self
            .remote
            .iter()
            .filter(|(node, n)| gone(node, n.seen))
            .map(|(node, _)| node.clone())
            .collect();
        stale.sort();
        let mut removed = Vec::new();
        for node in stale {
            let touched: BTreeSet<UserId> = self.remote[&node].users.keys().cloned().collect();
            let before: Vec<u32> = touched.iter().map(|u| self.total(u)).collect();
            let had_users = !self.is_empty();
            self.remote.remove(&node);
            let changes = self.changes(touched, before);
            let emptied = had_users && self.is_empty();
            removed.push((node, changes, emptied));
        }
        removed
    }

    /// Whether `node` counts any user here.
    pub fn has_users(&self, node: &str) -> bool {
        self.remote.get(node).is_some_and(|n| !n.users.is_empty())
    }

    fn changes(&self, users: BTreeSet<UserId>, before: Vec<u32>) -> Vec<Change> {
        users
            .into_iter()
            .zip(before)
            .filter_map(|(user, before)| match (before, self.total(&user)) {
                (0, after) if after > 0 => Some(Change::Joined(user)),
                (b, 0) if b > 0 => Some(Change::Left(user)),
                _ => None,
            })
            .collect()
    }

    /// Everyone in the room, sorted by user, sessions summed over nodes.
    pub fn list(&self) -> Vec<PresenceEntry> {
        let mut all = self.local.clone();
        for node in self.remote.values() {
            for (user, n) in &node.users {
                *all.entry(user.clone()).or_insert(0) += n;
            }
        }
        all.into_iter()
            .map(|(user, sessions)| PresenceEntry { user, sessions })
            .collect()
    }

    /// This node's own counts, as it tells the other nodes.
    pub fn local_counts(&self) -> BTreeMap<String, u32> {
        self.local
            .iter()
            .map(|(u, n)| (u.as_str().to_owned(), *n))
            .collect()
    }

    /// No user in the room on any node (as far as this node knows).
    pub fn is_empty(&self) -> bool {
        self.local.is_empty() && self.remote.values().all(|n| n.users.is_empty())
    }

    pub fn local_users(&self) -> usize {
        self.local.len()
    }

    pub fn clear_local(&mut self) {
        self.local.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn a_user_is_present_while_any_node_counts_them() {
        let mut p = Presence::default();
        let now = Instant::now();
        assert_eq!(p.add_local(&user("ann")), Some(Change::Joined(user("ann"))));
        // Ann also on node b: no change; Bob on node b: joined.
        let b = BTreeMap::from([(user("ann"), 1), (user("bob"), 2)]);
        assert_eq!(p.set_remote("b", b, now), vec![Change::Joined(user("bob"))]);
        assert_eq!(p.remove_local(&user("ann")), None);
        let list = p.list();
        assert_eq!((list[0].user.as_str(), list[0].sessions), ("ann", 1));
        assert_eq!((list[1].user.as_str(), list[1].sessions), ("bob", 2));
        // Node b goes silent: both leave.
        let changes = p.expire_remote(now + Duration::from_secs(1));
        assert_eq!(
            changes,
            vec![Change::Left(user("ann")), Change::Left(user("bob"))]
        );
        assert!(p.list().is_empty());
    }

    #[test]
    fn a_node_saying_less_is_a_leave() {
        let mut p = Presence::default();
        let now = Instant::now();
        p.set_remote("b", BTreeMap::from([(user("bob"), 1)]), now);
        assert_eq!(
            p.set_remote("b", BTreeMap::new(), now),
            vec![Change::Left(user("bob"))]
        );
    }
}
