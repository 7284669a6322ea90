//! The one way the hub calls a backend: a signed JSON POST with a timeout,
//! over reqwest's pooled connections, counted per hook in Prometheus.

use super::signature;
use crate::metrics::Metrics;
use bytes::Bytes;
use std::time::{Duration, Instant};

/// The largest answer read from a backend; a larger one is a failure.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Which hook a call is for (the `hook` label of the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect,
    Publish,
    Events,
}

impl Hook {
    pub fn label(self) -> &'static str {
        match self {
            Hook::Connect => "connect",
            Hook::Publish => "publish",
            Hook::Events => "events",
        }
    }
}

/// A backend's answer: its status and (bounded) body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("no answer within the timeout")]
    Timeout,
    #[error("the request failed: {0}")]
    Transport(#[source] reqwest::Error),
    #[error("the answer is over {MAX_ANSWER_BYTES} bytes")]
    TooLarge,
}

pub struct HookClient {
    http: reqwest::Client,
    key: ring::hmac::Key,
    metrics: Metrics,
}

impl HookClient {
    pub fn new(secret: &str, timeout: Duration, metrics: Metrics) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            // Covers connecting, sending and reading the whole answer.
            .timeout(timeout)
            // A redirect would be an answer from somewhere not configured.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            http,
            key: signature::key(secret),
            metrics,
        })
    }

    /// POSTs `body` (JSON) to `url`, signed. Any answer, whatever its
    /// status, is `Ok`; what it means is the caller's.
    pub async fn post(&self, hook: Hook, url: &str, body: Vec<u8>) -> Result<Answer, HookError> {
        let started = Instant::now();
        let signature = signature::sign(&self.key, &body);
        let result = self.send(url, body, signature).await;
        self.metrics.hook_called(
            hook.label(),
            started.elapsed(),
            match &result {
                Ok(answer) => !matches!(answer.status, 200..=299 | 401 | 403),
                Err(_) => true,
            },
        );
        result
    }

    async fn send(&self, url: &str, body: Vec<u8>, signature: String) -> Result<Answer, HookError> {
        let mut response = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(signature::HEADER, signature)
            .body(body)
            .send()
            .await
            .map_err(transport)?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(HookError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            body: body.into(),
        })
    }
}

impl HookClient {
    /// Counts a 2xx answer that turned out to be no verdict (malformed) as
    /// a failure too: to the hub it is one.
    pub fn unusable_answer(&self, hook: Hook) {
        self.metrics.hook_unusable_answer(hook.label());
    }
}

fn transport(e: reqwest::Error) -> HookError {
    if e.is_timeout() {
        HookError::Timeout
    } else {
        HookError::Transport(e)
    }
}
