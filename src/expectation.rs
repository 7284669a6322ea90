//! The `Expect` request header (RFC 9110 §10.1.1).
//!
//! actix-http meets `100-continue` itself: it answers `100 Continue` before
//! the handler reads the body (and ignores it in HTTP/1.0 requests, as the
//! RFC asks). Any other expectation it ignores, leaving a client waiting for
//! something that never comes; the hub refuses those with 417, on the HTTP
//! routes ([`refuse_unmet`]) and on WebSocket upgrades alike.

use actix_http::{RequestHead, Version};
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::HttpResponse;

/// Whether the request expects something the hub cannot meet: an
/// `Expect` member other than `100-continue` in an HTTP/1.1 request.
pub fn unmet(head: &RequestHead) -> bool {
    if head.version < Version::HTTP_11 {
        return false;
    }
    head.headers().get_all(header::EXPECT).any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .map(<[u8]>::trim_ascii)
            .any(|member| !member.is_empty() && !member.eq_ignore_ascii_case(b"100-continue"))
    })
}

/// The answer to an expectation the hub cannot meet.
pub fn refusal() -> HttpResponse {
    HttpResponse::ExpectationFailed().json(serde_json::json!({
        "error": "expectation_failed",
        "message": "only `Expect: 100-continue` is supported",
    }))
}

/// Route middleware: 417 before any handler runs for an unmet expectation.
pub async fn refuse_unmet(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    if unmet(req.head()) {
        return Ok(req.into_response(refusal()).map_into_right_body());
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn head(version: Version, expect: &[&str]) -> RequestHead {
        let mut req = TestRequest::default().version(version);
        for value in expect {
            req = req.append_header((header::EXPECT, *value));
        }
        req.to_http_request().head().clone()
    }

    #[test]
    fn only_100_continue_is_met_and_http_1_0_expects_nothing() {
        assert!(!unmet(&head(Version::HTTP_11, &[])));
        assert!(!unmet(&head(Version::HTTP_11, &["100-continue"])));
        assert!(!unmet(&head(Version::HTTP_11, &[" 100-Continue ", ""])));
        assert!(unmet(&head(Version::HTTP_11, &["bogus"])));
        assert!(unmet(&head(Version::HTTP_11, &["100-continue, x=1"])));
        assert!(unmet(&head(Version::HTTP_2, &["x"])));
        assert!(!unmet(&head(Version::HTTP_10, &["bogus"])));
    }
}
