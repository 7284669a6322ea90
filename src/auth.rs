//! Who a connection is: HS256 JWTs (`?token=`), anonymous users, room
//! patterns. Secrets and tokens are never logged.

use crate::config::AuthSettings;
use crate::protocol::{RoomName, UserId};
use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required")]
    TokenRequired,
    #[error("the token is invalid, forged or expired")]
    BadToken,
    #[error("the token's `sub` is not a valid user id")]
    BadSubject,
    #[error("{0}")]
    BadUser(String),
}

/// A room pattern from the `rooms` claim: `*` matches any run of characters,
/// and a pattern must match the whole room name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomPattern(String);

impl RoomPattern {
    pub fn new(pattern: &str) -> Self {
        Self(pattern.to_owned())
    }

    pub fn matches(&self, room: &RoomName) -> bool {
        glob_match(self.0.as_bytes(), room.as_str().as_bytes())
    }
}

/// Iterative wildcard match with one backtrack point (linear-ish, no recursion).
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// What a session may do, decided once at the upgrade.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: UserId,
    /// `None`: every room. `Some`: only rooms matching one of the patterns.
    pub rooms: Option<Vec<RoomPattern>>,
    /// When the token expires (unix seconds); the session is closed then.
    pub expires_at: Option<u64>,
}

impl Identity {
    pub fn may_join(&self, room: &RoomName) -> bool {
        self.rooms
            .as_ref()
            .is_none_or(|patterns| patterns.iter().any(|p| p.matches(room)))
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    rooms: Option<Vec<String>>,
}

/// Checks tokens against `auth.*`.
pub struct Authenticator {
    key: Option<DecodingKey>,
    validation: Validation,
    anonymous: bool,
}

impl Authenticator {
    pub fn new(settings: &AuthSettings) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            key: (!settings.jwt_secret.is_empty())
                .then(|| DecodingKey::from_secret(settings.jwt_secret.as_bytes())),
            validation,
            anonymous: settings.anonymous,
        }
    }

    /// The identity for an upgrade with these query parameters.
    pub fn identify(&self, token: Option<&str>, user: Option<&str>) -> Result<Identity, AuthError> {
        match (token, &self.key) {
            (Some(token), Some(key)) => {
                let claims = decode::<Claims>(token, key, &self.validation)
                    .map_err(|_| AuthError::BadToken)?
                    .claims;
                Ok(Identity {
                    user: UserId::parse(&claims.sub).map_err(|_| AuthError::BadSubject)?,
                    rooms: claims
                        .rooms
                        .map(|patterns| patterns.iter().map(|p| RoomPattern::new(p)).collect()),
                    expires_at: Some(claims.exp),
                })
            }
            _ if !self.anonymous => Err(AuthError::TokenRequired),
            // Anonymous: a token is ignored when no secret is set to check it.
            _ => {
                let user = match user {
                    Some(u) => UserId::parse(u).map_err(|e| AuthError::BadUser(e.to_string()))?,
                    None => {
                        UserId::parse(&format!("guest-{:06x}", rand::random::<u32>() & 0xff_ffff))
                            .expect("guest ids are valid user ids")
                    }
                };
                Ok(Identity {
                    user,
                    rooms: None,
                    expires_at: None,
                })
            }
        }
    }
}

impl Authenticator {
    /// Who an upgrade claims to be, for the connect hook, which decides:
    /// a token (when a secret is set to check it) must be valid, and gives
    /// its `sub` and expiry; otherwise `?user=`, if any. `auth.anonymous`
    /// does not apply: the hook lets in whom it accepts.
    pub fn claim(
        &self,
        token: Option<&str>,
        user: Option<&str>,
    ) -> Result<(Option<UserId>, Option<u64>), AuthError> {
        match (token, &self.key) {
            (Some(token), Some(key)) => {
                let claims = decode::<Claims>(token, key, &self.validation)
                    .map_err(|_| AuthError::BadToken)?
                    .claims;
                let user = UserId::parse(&claims.sub).map_err(|_| AuthError::BadSubject)?;
                Ok((Some(user), Some(claims.exp)))
            }
            _ => {
                let user = user
                    .map(UserId::parse)
                    .transpose()
                    .map_err(|e| AuthError::BadUser(e.to_string()))?;
                Ok((user, None))
            }
        }
    }
}

/// The credentials of an `Authorization: <scheme> <credentials>` header when
/// the scheme is `Bearer`. RFC 7235 §2.1: the scheme is case-insensitive, and
/// one or more spaces may separate it from the credentials.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, rest) = authorization.trim_start().split_once(' ')?;
    let token = rest.trim_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Whether an `Authorization` header carries the API key; an empty key
/// refuses everyone.
pub fn api_key_matches(authorization: Option<&str>, key: &str) -> bool {
    match authorization.and_then(bearer_token) {
        Some(given) => !key.is_empty() && constant_time_eq(given.as_bytes(), key.as_bytes()),
        None => false,
    }
}

/// Compares without leaking where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for header in ["Bearer k", "bearer k", "BEARER k", "bEaReR   k"] {
            assert!(api_key_matches(Some(header), "k"), "{header}");
        }
        for header in ["Bearer", "Bearer ", "Basic k", "Bearerk", "Bearer j"] {
            assert!(!api_key_matches(Some(header), "k"), "{header}");
        }
        assert!(!api_key_matches(None, "k"));
        assert!(!api_key_matches(Some("Bearer "), ""));
    }

    fn room(s: &str) -> RoomName {
        RoomName::parse(s).unwrap()
    }

    #[test]
    fn patterns_match_whole_names() {
        let p = RoomPattern::new("team-*");
        assert!(p.matches(&room("team-a")));
        assert!(p.matches(&room("team-")));
        assert!(!p.matches(&room("xteam-a")));
        assert!(RoomPattern::new("*").matches(&room("anything")));
        assert!(RoomPattern::new("a*b*c").matches(&room("aXXbYYc")));
        assert!(!RoomPattern::new("a*b*c").matches(&room("aXXbYY")));
        assert!(RoomPattern::new("lobby").matches(&room("lobby")));
        assert!(!RoomPattern::new("lobby").matches(&room("lobby2")));
        assert!(RoomPattern::new("*:general").matches(&room("org1:general")));
    }
}
