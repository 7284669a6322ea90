//! Request bodies nobody finished reading close their connection.
//!
//! actix-http times out only a request's head. When a handler answers
//! without reading the whole body (a 401, a route that takes no body, a body
//! read that timed out with 408), actix drains the rest of a chunked body
//! before the next request, for as long as it keeps trickling in: one
//! client could hold any number of connections that way. A body that is
//! still held (not dropped) when the response has been written makes actix
//! close the connection instead (after its 1 s linger), so this middleware
//! keeps every unfinished body alive a little longer and says
//! `Connection: close`.

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::ConnectionType;
use actix_web::middleware::Next;
use actix_web::Error;
use actix_web::HttpMessage as _;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

/// How long an unfinished body is held (what arrives is thrown away) at
/// most: longer than actix's 1 s linger after an early response, which ends
/// it sooner by closing the connection.
const HOLD_UNFINISHED: Duration = Duration::from_secs(5);

/// The request's body, shared by the handler (through [`Reader`]) and this
/// middleware, which learns whether it was read to its end.
struct Shared {
    payload: Payload,
    finished: bool,
}

struct Reader(Rc<RefCell<Shared>>);

impl Stream for Reader {
    type Item = Result<Bytes, actix_web::error::PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut shared = self.0.borrow_mut();
        let next = Pin::new(&mut shared.payload).poll_next(cx);
        if matches!(next, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            shared.finished = true;
        }
        next
    }
}

pub async fn close_after_unread_body(
    mut req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let payload = req.take_payload();
    if matches!(payload, Payload::None) {
        // No body (a GET, `Content-Length: 0`): nothing to watch.
        return next.call(req).await;
    }
    let shared = Rc::new(RefCell::new(Shared {
        payload,
        finished: false,
    }));
    req.set_payload(Payload::Stream {
        payload: Box::pin(Reader(shared.clone())),
    });
    let mut res = next.call(req).await?;
    if !shared.borrow().finished {
        res.response_mut()
            .head_mut()
            .set_connection_type(ConnectionType::Close);
        actix_web::rt::spawn(hold_for_a_while(shared));
    }
    Ok(res)
}

async fn hold_for_a_while(shared: Rc<RefCell<Shared>>) {
    let mut reader = Reader(shared);
    let discard = async { while let Some(Ok(_)) = reader.next().await {} };
    let _ = tokio::time::timeout(HOLD_UNFINISHED, discard).await;
}
