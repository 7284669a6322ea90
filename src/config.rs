//! Settings: the layered configuration described in `docs/configuration.md`.
//!
//! Layers, later winning: built-in defaults, `config/default.toml` in the
//! working directory, the `--config` file (or `ROOMHUB_CONFIG`), then
//! `ROOMHUB_<SECTION>__<KEY>` variables. Unknown keys, malformed values and
//! impossible combinations are reported with the key and where it came from;
//! nothing here starts anything.

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

mod describe;
use describe::{describe_figment_error, source_of};

/// The prefix of every environment variable the hub reads.
pub const ENV_PREFIX: &str = "ROOMHUB_";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub server: ServerSettings,
    pub storage: StorageSettings,
    pub history: HistorySettings,
    pub heartbeat: HeartbeatSettings,
    pub limits: LimitSettings,
    pub websocket: WebSocketSettings,
    pub auth: AuthSettings,
    pub cluster: ClusterSettings,
    pub rooms: RoomSettings,
    pub hooks: HookSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub bind: SocketAddr,
    /// `None`: a random id, made once and kept in the data dir.
    #[serde(
        deserialize_with = "lenient_opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub node_id: Option<String>,
    pub shutdown_grace_ms: u64,
    /// An addition to the configuration contract (docs/configuration.md): the most an HTTP request body may take to
    /// arrive, from the start of its request's handling (the headers have 5 s
    /// of their own). A slower body gets 408 and its connection is closed.
    pub body_timeout_ms: u64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([0, 0, 0, 0], 8080)),
            node_id: None,
            shutdown_grace_ms: 10_000,
            body_timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Ack a publish only after a (group-committed) flush to disk.
    Sync,
    /// Ack on write; the store is flushed every few milliseconds.
    Batched,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    pub data_dir: PathBuf,
    pub durability: Durability,
    /// An addition to the configuration contract (docs/configuration.md): how long a busy store writer waits for more
    /// writes before a group commit, in µs (0 = never). See `sled_store`.
    pub commit_delay_us: u64,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            durability: Durability::Sync,
            commit_delay_us: 4000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistorySettings {
    pub max_per_room: u64,
    pub ttl_secs: u64,
    pub replay: usize,
    pub dedup_window_secs: u64,
}

impl Default for HistorySettings {
    fn default() -> Self {
        Self {
            max_per_room: 1000,
            ttl_secs: 0,
            replay: 50,
            dedup_window_secs: 300,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatSettings {
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

impl Default for HeartbeatSettings {
    fn default() -> Self {
        Self {
            interval_ms: 10_000,
            timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    pub publish_per_sec: u32,
    pub publish_burst: u32,
    pub max_message_bytes: usize,
    pub max_frame_bytes: usize,
    pub max_rooms_per_connection: usize,
    pub max_connections_per_ip: u32,
    pub handshakes_per_ip_per_sec: u32,
    pub outbound_queue: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            publish_per_sec: 10,
            publish_burst: 20,
            max_message_bytes: 16_384,
            max_frame_bytes: 65_536,
            max_rooms_per_connection: 32,
            max_connections_per_ip: 1000,
            handshakes_per_ip_per_sec: 50,
            outbound_queue: 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketSettings {
    /// Accept permessage-deflate (RFC 7692) from clients that offer it.
    pub compression: bool,
}

impl Default for WebSocketSettings {
    fn default() -> Self {
        Self { compression: true }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    pub anonymous: bool,
    #[serde(deserialize_with = "lenient_string")]
    pub jwt_secret: String,
    #[serde(deserialize_with = "lenient_string")]
    pub api_key: String,
    #[serde(deserialize_with = "comma_list")]
    pub allowed_origins: Vec<String>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            anonymous: true,
            jwt_secret: String::new(),
            api_key: String::new(),
            allowed_origins: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    #[serde(deserialize_with = "lenient_string")]
    pub nats_url: String,
    #[serde(deserialize_with = "lenient_string")]
    pub subject_prefix: String,
    /// Replicas of the cluster's JetStream streams: 1, or 3 on a NATS
    /// cluster of three or more servers.
    pub replicas: usize,
    /// How many JetStream streams hold all rooms' logs (a room's stream is
    /// chosen by a hash of its name). Fixed for the life of a cluster: every
    /// node must use the same value.
    pub partitions: u32,
}

/// The default `cluster.partitions` (see docs/operations.md, "Cluster").
pub const DEFAULT_PARTITIONS: u32 = 8;

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            nats_url: String::new(),
            subject_prefix: "roomhub".into(),
            replicas: 1,
            partitions: DEFAULT_PARTITIONS,
        }
    }
}

/// An addition to the configuration contract (docs/configuration.md): how rooms live on a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomSettings {
    /// An empty room's actor stops after this long without members.
    pub idle_timeout_ms: u64,
}

impl Default for RoomSettings {
    fn default() -> Self {
        Self {
            idle_timeout_ms: 30_000,
        }
    }
}

/// The event types `hooks.events` may name (PROTOCOL.md, "Backend hooks").
pub const HOOK_EVENT_TYPES: [&str; 7] = [
    "session_connected",
    "session_disconnected",
    "room_occupied",
    "room_vacated",
    "user_joined",
    "user_left",
    "message",
];

/// Backend hooks (docs/configuration.md, `hooks.*`): all off while their URLs are empty.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HookSettings {
    #[serde(deserialize_with = "lenient_string")]
    pub connect_url: String,
    #[serde(deserialize_with = "lenient_string")]
    pub publish_url: String,
    #[serde(deserialize_with = "lenient_string")]
    pub events_url: String,
    #[serde(deserialize_with = "lenient_string")]
    pub secret: String,
    pub timeout_ms: u64,
    #[serde(deserialize_with = "comma_list")]
    pub events: Vec<String>,
    pub queue: usize,
}

impl Default for HookSettings {
    fn default() -> Self {
        Self {
            connect_url: String::new(),
            publish_url: String::new(),
            events_url: String::new(),
            secret: String::new(),
            timeout_ms: 2000,
            // Every type but `message`, which is opt-in.
            events: HOOK_EVENT_TYPES[..6]
                .iter()
                .map(|t| t.to_string())
                .collect(),
            queue: 10_000,
        }
    }
}

impl HookSettings {
    /// The URL settings, by key.
    fn urls(&self) -> [(&'static str, &str); 3] {
        [
            ("hooks.connect_url", self.connect_url.as_str()),
            ("hooks.publish_url", self.publish_url.as_str()),
            ("hooks.events_url", self.events_url.as_str()),
        ]
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        for (key, url) in self.urls() {
            if url.is_empty() {
                continue;
            }
            // Hook URLs are called by reqwest, whose parser this is.
            let parsed = reqwest::Url::parse(url)
                .map_err(|e| (key, format!("{url:?} is not a URL ({e})")))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
                return Err((
                    key,
                    format!("{url:?} must be an http:// or https:// URL with a host"),
                ));
            }
            if self.secret.is_empty() {
                // Unsigned requests would let anyone who reaches the
                // backend pose as the hub.
                return Err((
                    "hooks.secret",
                    format!("is empty but {key} is set: every hook request must be signed"),
                ));
            }
        }
        if self.timeout_ms == 0 {
            return Err(("hooks.timeout_ms", "must be at least 1".into()));
        }
        if self.queue == 0 {
            return Err(("hooks.queue", "must be at least 1".into()));
        }
        if let Some(unknown) = self
            .events
            .iter()
            .find(|e| !HOOK_EVENT_TYPES.contains(&e.as_str()))
        {
            return Err((
                "hooks.events",
                format!(
                    "{unknown:?} is not an event type; the types are {}",
                    HOOK_EVENT_TYPES.join(", ")
                ),
            ));
        }
        Ok(())
    }
}

/// A setting that stops start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("config file {0} is a directory, not a file")]
    Directory(PathBuf),
    #[error("{0}")]
    Invalid(String),
}

impl Settings {
    /// Loads the layers of docs/configuration.md. `config_file` is `--config` or `ROOMHUB_CONFIG`.
    pub fn load(config_file: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut figment = Figment::new().merge(Serialized::defaults(Settings::default()));
        let default_file = Path::new("config/default.toml");
        if default_file.is_file() {
            figment = figment.merge(Toml::file_exact(default_file));
        }
        if let Some(file) = config_file {
            // Anything readable will do (`/dev/null`, a pipe): only a path
            // that is missing or a directory is refused here; figment reports
            // a file it cannot read, naming it.
            if file.is_dir() {
                return Err(ConfigError::Directory(file.to_owned()));
            }
            if !file.exists() {
                return Err(ConfigError::MissingFile(file.to_owned()));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment.merge(setting_variables());
        let settings: Settings = figment.extract().map_err(describe_figment_error)?;
        settings.validate().map_err(|(key, problem)| {
            let source = figment
                .find_metadata(key)
                .map(|m| source_of(m, key))
                .unwrap_or_else(|| "defaults".into());
            ConfigError::Invalid(format!("{key} (from {source}): {problem}"))
        })?;
        Ok(settings)
    }

    /// Checks combinations that no single type can express; returns the key at fault.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        fn at_least(key: &'static str, v: u64, min: u64) -> Result<(), (&'static str, String)> {
            if v < min {
                Err((key, format!("must be at least {min}, got {v}")))
            } else {
                Ok(())
            }
        }
        at_least("history.max_per_room", self.history.max_per_room, 1)?;
        at_least("server.body_timeout_ms", self.server.body_timeout_ms, 1)?;
        if self.history.replay > crate::protocol::MAX_HISTORY_PAGE {
            return Err((
                "history.replay",
                format!("must be at most {}", crate::protocol::MAX_HISTORY_PAGE),
            ));
        }
        at_least("heartbeat.interval_ms", self.heartbeat.interval_ms, 10)?;
        if self.heartbeat.timeout_ms <= self.heartbeat.interval_ms {
            return Err((
                "heartbeat.timeout_ms",
                "must be greater than heartbeat.interval_ms".into(),
            ));
        }
        at_least(
            "limits.publish_per_sec",
            self.limits.publish_per_sec.into(),
            1,
        )?;
        at_least("limits.publish_burst", self.limits.publish_burst.into(), 1)?;
        at_least(
            "limits.max_message_bytes",
            self.limits.max_message_bytes as u64,
            1,
        )?;
        if self.limits.max_frame_bytes <= self.limits.max_message_bytes {
            return Err((
                "limits.max_frame_bytes",
                "must be greater than limits.max_message_bytes".into(),
            ));
        }
        at_least(
            "limits.max_rooms_per_connection",
            self.limits.max_rooms_per_connection as u64,
            1,
        )?;
        at_least(
            "limits.max_connections_per_ip",
            self.limits.max_connections_per_ip.into(),
            1,
        )?;
        at_least(
            "limits.handshakes_per_ip_per_sec",
            self.limits.handshakes_per_ip_per_sec.into(),
            1,
        )?;
        at_least(
            "limits.outbound_queue",
            self.limits.outbound_queue as u64,
            1,
        )?;
        if !self.auth.anonymous
            && self.auth.jwt_secret.is_empty()
            && self.hooks.connect_url.is_empty()
        {
            return Err((
                "auth.anonymous",
                "is false but auth.jwt_secret and hooks.connect_url are empty: nobody could connect".into(),
            ));
        }
        if let Some(id) = &self.server.node_id {
            if crate::protocol::UserId::parse(id).is_err() {
                return Err((
                    "server.node_id",
                    "must be 1-64 characters of [A-Za-z0-9._-]".into(),
                ));
            }
        }
        if self.storage.commit_delay_us > 100_000 {
            return Err((
                "storage.commit_delay_us",
                "must be at most 100000 (0.1 s)".into(),
            ));
        }
        let nats_url = self.cluster.nats_url.trim();
        if !nats_url.is_empty() {
            // One server, or a comma-separated list of the NATS cluster's servers.
            if let Err(e) = crate::cluster::server_addrs(nats_url) {
                return Err(("cluster.nats_url", e));
            }
        }
        if !(1..=5).contains(&self.cluster.replicas) {
            return Err((
                "cluster.replicas",
                "must be 1 to 5 (JetStream's limit); 3 on a NATS cluster of three servers".into(),
            ));
        }
        if !(1..=1024).contains(&self.cluster.partitions) {
            return Err(("cluster.partitions", "must be 1 to 1024".into()));
        }
        let prefix_ok = !self.cluster.subject_prefix.is_empty()
            && self
                .cluster
                .subject_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !prefix_ok {
            return Err((
                "cluster.subject_prefix",
                "must be 1 or more characters of [A-Za-z0-9_-]".into(),
            ));
        }
        self.hooks.validate()
    }

    /// The settings as `check-config` prints them: TOML, secrets masked.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        for secret in [
            &mut shown.auth.jwt_secret,
            &mut shown.auth.api_key,
            &mut shown.hooks.secret,
        ] {
            if !secret.is_empty() {
                *secret = "<redacted>".into();
            }
        }
        // Settings holds only strings, numbers, bools, lists and tables.
        toml::to_string_pretty(&shown).expect("settings serialize to TOML")
    }
}

/// The `ROOMHUB_<SECTION>__<KEY>` variables, as settings. Only names with
/// the `__` separator are settings: `ROOMHUB_CONFIG` names the file, and the
/// service links Kubernetes puts in every pod of a namespace with a Service
/// named `roomhub` (`ROOMHUB_PORT=tcp://…`, `ROOMHUB_SERVICE_HOST`, …) are
/// none of ours, so they must never stop start-up.
fn setting_variables() -> Env {
    Env::prefixed(ENV_PREFIX)
        .filter(|key| key.as_str().contains("__"))
        .split("__")
}

/// A string setting that also accepts numbers and booleans, because values
/// from environment variables arrive typed ("12345" becomes a number).
fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_bool<E>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(V)
}

fn lenient_opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    lenient_string(d).map(|s| Some(s).filter(|s| !s.is_empty()))
}

/// A list setting: a TOML array, or one string of comma-separated values (env).
fn comma_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        One(String),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::List(v) => v,
        Raw::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_nats_url(url: &str) -> Result<(), (&'static str, String)> {
        let mut settings = Settings::default();
        settings.cluster.nats_url = url.into();
        settings.validate()
    }

    #[test]
    fn nats_url_takes_a_comma_separated_list_of_servers() {
        assert!(with_nats_url("").is_ok(), "standalone");
        assert!(with_nats_url("nats://127.0.0.1:4222").is_ok());
        assert!(
            with_nats_url("nats://127.0.0.1:4222, nats://127.0.0.1:4223,nats://h:4224").is_ok()
        );
        for bad in [
            "nats://127.0.0.1:4222,,nats://127.0.0.1:4223",
            "nats://127.0.0.1:4222,",
            "nats://127.0.0.1:4222,http://127.0.0.1:4223",
        ] {
            let (key, message) = with_nats_url(bad).expect_err(bad);
            assert_eq!(key, "cluster.nats_url");
            assert!(!message.is_empty());
        }
        let (_, message) = with_nats_url("nats://a:4222, ,nats://b:4222").unwrap_err();
        assert!(message.contains("empty"), "{message}");
    }
}
