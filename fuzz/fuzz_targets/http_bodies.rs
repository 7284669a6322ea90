//! Any POST body of the HTTP API: parsed or refused with a 400, never a panic.
#![no_main]

use actix_web::ResponseError;
use libfuzzer_sys::fuzz_target;
use roomhub::http::{DirectBody, PublishBody};

fuzz_target!(|data: &[u8]| {
    if let Err(e) = PublishBody::parse(data, 16_384) {
        assert_eq!(e.status_code().as_u16(), 400);
    }
    if let Err(e) = DirectBody::parse(data, 16_384) {
        assert_eq!(e.status_code().as_u16(), 400);
    }
});
