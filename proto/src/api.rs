//! JSON bodies of the HTTP API under `/v1`, shared by the node and the clients.

use serde::{Deserialize, Serialize};

use crate::command::Role;
use crate::tuple::Op;
use crate::value::Value;
use crate::LogIndex;

/// Every error body: `{ "error": { "code": "...", "message": "..." } }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `bad_request`, `conflict`, `not_found`, `unauthorized`, ...
    pub code: String,
    /// For people: what is wrong and which limit applies.
    pub message: String,
}

/// `POST /v1/sites`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSite {
    pub name: String,
}

/// One site, as `GET /v1/sites` lists them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteInfo {
    pub name: String,
    /// The log index that created the site.
    pub created_index: LogIndex,
    pub created_at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteList {
    pub sites: Vec<SiteInfo>,
}

/// `POST /v1/sites/{site}/tx`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxRequest {
    pub ops: Vec<Op>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxResponse {
    /// The commit index: the version of every tuple the transaction wrote.
    pub index: LogIndex,
    /// True when this `(client_id, seq)` had been applied before and nothing changed now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// A tuple as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TupleBody {
    pub key: String,
    pub value: Value,
    pub version: LogIndex,
}

/// `GET /v1/sites/{site}/tuples/{collection}`: a page of tuples in key order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScanPage {
    pub tuples: Vec<TupleBody>,
    /// Pass as `after=` to get the next page; absent on the last page.
    pub next: Option<String>,
}

/// One entry of the change feed: the latest change to a key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeBody {
    pub index: LogIndex,
    pub collection: String,
    pub key: String,
    /// `put` or `delete`.
    pub op: ChangeOp,
    /// The value written, for puts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeOp {
    Put,
    Delete,
}

/// `GET /v1/sites/{site}/changes?since=N`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangesPage {
    pub changes: Vec<ChangeBody>,
    /// Every change up to this index is included: pass it as `since=` next time.
    pub next_since: LogIndex,
}

/// `POST /v1/sites/{site}/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub role: Role,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The secret. Shown once; only its hash is stored.
    pub token: String,
    pub site: String,
    pub role: Role,
}
