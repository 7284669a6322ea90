//! `X-Roomhub-Signature`: what lets a backend tell the hub's requests from
//! anyone else's, since hook requests carry no token or API key.

use ring::hmac;

/// The header every hook request carries.
pub const HEADER: &str = "x-roomhub-signature";

/// The signing key made from `hooks.secret`.
pub fn key(secret: &str) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes())
}

/// `sha256=<lowercase hex HMAC-SHA256(secret, body)>`, over the raw body as sent.
pub fn sign(key: &hmac::Key, body: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let tag = hmac::sign(key, body);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for byte in tag.as_ref() {
        out.push(HEX[usize::from(byte >> 4)] as char);
        out.push(HEX[usize::from(byte & 0xf)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_rfc_4231_test_case_2() {
        assert_eq!(
            sign(&key("Jefe"), b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
