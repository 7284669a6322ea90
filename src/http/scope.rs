//! `?scope=` of `/api/stats` and `/api/rooms`: `node` (the default: this
//! node's own answer, unchanged) or `cluster` (summed over live nodes).

use super::ApiError;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Node,
    Cluster,
}

#[derive(Deserialize)]
pub struct ScopeParams {
    scope: Option<String>,
}

impl ScopeParams {
    pub fn scope(&self) -> Result<Scope, ApiError> {
        match self.scope.as_deref() {
            None | Some("node") => Ok(Scope::Node),
            Some("cluster") => Ok(Scope::Cluster),
            Some(other) => Err(ApiError::BadRequest(format!(
                "unknown scope {other:?}: use `node` (the default) or `cluster`"
            ))),
        }
    }
}
