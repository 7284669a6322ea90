//! Negotiating permessage-deflate (RFC 7692) at the upgrade.
//!
//! The hub accepts an offer only on terms that keep compression cheap:
//! - `server_no_context_takeover` (the server may always choose it, §7.1.1.1):
//!   every message the hub sends is deflated from a fresh state, so a
//!   broadcast is compressed once and the same bytes go to every member;
//! - `client_no_context_takeover` (the server may always ask it, §7.1.1.2):
//!   every message a client sends inflates from a fresh state, so a
//!   connection keeps no inflate state between messages and an idle one
//!   holds nothing for compression.
//!
//! An offer that limits the server's window below 32 KiB
//! (`server_max_window_bits` < 15) is declined: the hub's one compressor
//! per thread uses the full window. `client_max_window_bits` needs nothing
//! (inflating with the full window reads any smaller one). An offer with a
//! parameter the hub does not know, or a malformed one, is declined too;
//! the next offer, if any, is considered (§5.1).

use actix_http::header::{HeaderMap, SEC_WEBSOCKET_EXTENSIONS};

/// The extension's name in `Sec-WebSocket-Extensions`.
const NAME: &str = "permessage-deflate";

/// The `Sec-WebSocket-Extensions` answer to an accepted offer.
pub const RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// Whether the request offers permessage-deflate on terms the hub accepts.
pub fn accepts(headers: &HeaderMap) -> bool {
    headers
        .get_all(SEC_WEBSOCKET_EXTENSIONS)
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(acceptable)
}

/// One offer: `permessage-deflate; param; param=value`.
fn acceptable(offer: &str) -> bool {
    let mut parts = offer.split(';').map(str::trim);
    if !parts
        .next()
        .is_some_and(|name| name.eq_ignore_ascii_case(NAME))
    {
        return false;
    }
    let mut seen: Vec<&str> = Vec::new();
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(unquote(value.trim()))),
            None => (param, None),
        };
        // §7: a parameter given twice makes the offer invalid.
        if seen.iter().any(|s| s.eq_ignore_ascii_case(name)) {
            return false;
        }
        seen.push(name);
        let ok = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" | "client_no_context_takeover" => value.is_none(),
            "server_max_window_bits" => value.and_then(window_bits) == Some(15),
            "client_max_window_bits" => value.is_none_or(|v| window_bits(v).is_some()),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

/// A window size parameter: 8 to 15, in decimal without leading zeros.
fn window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_http::header::HeaderValue;

    fn offers(values: &[&str]) -> bool {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(
                SEC_WEBSOCKET_EXTENSIONS,
                HeaderValue::from_str(value).unwrap(),
            );
        }
        accepts(&headers)
    }

    #[test]
    fn what_browsers_and_libraries_offer_is_accepted() {
        // Chromium and Firefox.
        assert!(offers(&["permessage-deflate; client_max_window_bits"]));
        assert!(offers(&["permessage-deflate"]));
        assert!(offers(&[
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ]));
        assert!(offers(&["Permessage-Deflate; client_max_window_bits=10"]));
        assert!(offers(&[
            "permessage-deflate; server_max_window_bits=\"15\""
        ]));
    }

    #[test]
    fn nothing_offered_nothing_accepted() {
        assert!(!offers(&[]));
        assert!(!offers(&["x-webkit-deflate-frame"]));
        assert!(!offers(&["permessage-deflate-x"]));
    }

    #[test]
    fn offers_the_hub_cannot_meet_are_declined_and_the_next_one_is_taken() {
        for bad in [
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=09",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; unknown_param",
        ] {
            assert!(!offers(&[bad]), "{bad}");
        }
        assert!(offers(&[
            "permessage-deflate; server_max_window_bits=10, permessage-deflate"
        ]));
        assert!(offers(&[
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; client_max_window_bits"
        ]));
    }
}
