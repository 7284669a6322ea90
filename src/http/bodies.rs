//! The JSON bodies of the HTTP API, parsed without touching anything else
//! (so they can be fuzzed on their own). Fields are kept as raw JSON so
//! `data` may be any JSON, `null` included, and is never re-encoded.

use super::ApiError;
use crate::protocol::{check_data, UserId, MAX_REF_CHARS};
use futures_util::StreamExt;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::time::Duration;

type Fields = HashMap<String, Box<RawValue>>;

/// Reads a request body of at most `limit` bytes within `timeout`. A larger
/// one is a bad body like any other (400 with a JSON error), not actix's
/// plain-text 413. actix-http times out only the request head, so without
/// the deadline a body that trickles in would hold its connection (and its
/// buffer) forever: a slow one gets 408 and its connection is closed.
pub async fn read_body(
    mut payload: actix_web::web::Payload,
    limit: usize,
    timeout: Duration,
) -> Result<Vec<u8>, ApiError> {
    let read = async {
        let mut body = Vec::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("unreadable body: {e}")))?;
            if body.len() + chunk.len() > limit {
                return Err(ApiError::BadRequest(format!(
                    "the body is over {limit} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    // The connection is closed after the 408 (`unread_body`): the rest of
    // the body is not waited for.
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Err(ApiError::BodyTimeout(timeout)))
}

fn fields(body: &[u8]) -> Result<Fields, ApiError> {
    serde_json::from_slice(body)
        .map_err(|_| ApiError::BadRequest("the body must be a JSON object".into()))
}

fn data(fields: &mut Fields, max_bytes: usize) -> Result<Box<RawValue>, ApiError> {
    let data = fields
        .remove("data")
        .ok_or_else(|| ApiError::BadRequest("`data` is required".into()))?;
    if data.get().len() > max_bytes {
        return Err(ApiError::BadRequest(format!(
            "`data` is over {max_bytes} bytes"
        )));
    }
    check_data(&data).map_err(|e| ApiError::BadRequest(format!("`data`: {e}")))?;
    Ok(data)
}

fn optional_string(fields: &Fields, name: &str) -> Result<Option<String>, ApiError> {
    match fields.get(name).map(|raw| raw.get()) {
        None | Some("null") => Ok(None),
        Some(raw) => serde_json::from_str(raw)
            .map(Some)
            .map_err(|_| ApiError::BadRequest(format!("`{name}` must be a string"))),
    }
}

/// `POST /api/rooms/{room}/messages`: `{"data":…,"user"?:…,"key"?:…}`.
#[derive(Debug)]
pub struct PublishBody {
    pub data: Box<RawValue>,
    pub user: Option<UserId>,
    pub key: Option<String>,
}

impl PublishBody {
    pub fn parse(body: &[u8], max_data_bytes: usize) -> Result<Self, ApiError> {
        let mut fields = fields(body)?;
        let data = data(&mut fields, max_data_bytes)?;
        let user = optional_string(&fields, "user")?
            .map(|u| UserId::parse(&u).map_err(|e| ApiError::BadRequest(e.to_string())))
            .transpose()?;
        let key = optional_string(&fields, "key")?;
        if key
            .as_ref()
            .is_some_and(|k| k.is_empty() || k.chars().count() > MAX_REF_CHARS)
        {
            return Err(ApiError::BadRequest(format!(
                "`key` is 1 to {MAX_REF_CHARS} characters"
            )));
        }
        Ok(Self { data, user, key })
    }
}

/// `POST /api/users/{user}/messages`: `{"data":…}`.
#[derive(Debug)]
pub struct DirectBody {
    pub data: Box<RawValue>,
}

impl DirectBody {
    pub fn parse(body: &[u8], max_data_bytes: usize) -> Result<Self, ApiError> {
        let mut fields = fields(body)?;
        Ok(Self {
            data: data(&mut fields, max_data_bytes)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let ok = PublishBody::parse(br#"{"data":null,"user":"bot","key":"k"}"#, 100).unwrap();
        assert_eq!((ok.data.get(), ok.key.as_deref()), ("null", Some("k")));
        assert!(PublishBody::parse(b"{}", 100).is_err());
        assert!(PublishBody::parse(br#"{"data":1,"user":"a b"}"#, 100).is_err());
        assert!(PublishBody::parse(br#"{"data":"xxxxxxxxxx"}"#, 5).is_err());
        assert!(DirectBody::parse(b"[]", 100).is_err());
        assert!(DirectBody::parse(br#"{"data":[1]}"#, 100).is_ok());
        // Data that no reader could parse back is refused, not stored.
        assert!(PublishBody::parse(br#"{"data":1e999999}"#, 100).is_err());
        assert!(PublishBody::parse(br#"{"data":"\ud800"}"#, 100).is_err());
    }
}
