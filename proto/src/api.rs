//! JSON bodies of the HTTP API under `/v1`, shared by the node and the clients.

use serde::{Deserialize, Serialize};

use crate::command::Role;
use crate::tuple::Op;
use crate::value::Value;
use crate::LogIndex;

/// Every error body: `{ "error": { "code": "...", "message": "..." } }`, with `"leader"`
/// beside them when the answer names the leader's HTTP URL.
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
    /// The leader's HTTP base URL, when the answering node knows another node leads and the
    /// request may be sent there instead (clients follow it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
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
    /// Lifetime in seconds (1 to [`crate::command::TOKEN_TTL_S_MAX`]); absent: no expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u64>,
    /// Limit the token to these parts of the site (absent or empty: the whole site).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<crate::command::Scope>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The secret. Shown once; only its hash is stored.
    pub token: String,
    pub site: String,
    pub role: Role,
    /// What `GET .../tokens` lists it as, and `DELETE .../tokens/{id}` revokes.
    pub id: LogIndex,
    /// Milliseconds since the Unix epoch; absent: never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

/// One token as `GET /v1/sites/{site}/tokens` lists it: never the secret or its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: LogIndex,
    pub role: Role,
    pub created_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    /// True once `expires_at_ms` has passed (by the answering node's clock).
    pub expired: bool,
    /// The parts of the site it is limited to; empty: the whole site.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<crate::command::Scope>,
}

/// `GET /v1/sites/{site}/tokens`: the site's tokens that are not revoked, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenList {
    pub tokens: Vec<TokenInfo>,
}

/// `DELETE /v1/sites/{site}/tokens/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRevoked {
    pub id: LogIndex,
    pub revoked: bool,
}

/// `DELETE /v1/sites/{site}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteDeleted {
    pub site: String,
    /// The log index of the deletion.
    pub index: LogIndex,
}

/// `GET /v1/sites/{site}/status`: how far projection and publishing have come.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteStatus {
    pub site: String,
    /// Every commit at or below this index is applied on this node.
    pub committed_index: LogIndex,
    /// Every commit at or below this index is reflected in the served pages.
    pub projected_index: LogIndex,
    /// The commit index of the version served now, if one is published.
    pub served_index: Option<LogIndex>,
    /// True when the served version is a rollback: it stays served until the site's next
    /// commit or a rebuild, which project the current data again.
    #[serde(default)]
    pub rolled_back: bool,
    /// HTML pages in the current version.
    pub pages: u64,
    /// Page renders since the node started.
    pub pages_rendered_total: u64,
    /// Log entries committed but not yet projected.
    pub pending: u64,
    pub last_publish_at: Option<u64>,
    pub last_publish_ms: Option<u64>,
    /// The first standing template problem, or null.
    pub last_error: Option<TemplateProblem>,
    /// Every standing problem.
    pub errors: Vec<TemplateProblem>,
    /// CDN purges of the site's changed URLs, when the node has a purge target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purge: Option<PurgeStatus>,
}

/// The purges of one site's changed URLs on this node (the leader sends them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeStatus {
    /// `cloudflare` or `webhook` (never the token or the URL).
    pub target: String,
    /// URLs waiting to be purged, with those being sent now.
    pub pending_urls: u64,
    /// URLs purged since the node started.
    pub purged_urls_total: u64,
    /// URLs never purged since the node started: the backlog overflowed, or the target
    /// refused them for good. Their cached copies live until the cache time ends.
    pub dropped_urls_total: u64,
    /// The last failure since the last success, or null.
    pub last_error: Option<String>,
    /// When that failure happened, in milliseconds since the Unix epoch.
    pub last_error_at: Option<u64>,
    /// When the target last acknowledged a purge of this site's URLs.
    pub last_success_at: Option<u64>,
}

/// A template or route problem: `{ template, line, message }` (and the page, when one failed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateProblem {
    pub template: String,
    pub line: Option<usize>,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// One published version of a site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The commit index the version reflects (what `Sesame-Version` says).
    pub index: LogIndex,
    pub manifest: String,
    pub files: u64,
    pub published_at_ms: u64,
    /// True if this entry re-pointed the root to an earlier version.
    pub rollback: bool,
    /// True for the version served now.
    pub current: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionList {
    pub versions: Vec<VersionInfo>,
}

/// `POST /v1/sites/{site}/rollback`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    /// The commit index of the version to go back to (see `versions`).
    pub index: LogIndex,
}

/// `GET /v1/cluster`: who leads, and every member's progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The leader's node id, if one is known.
    pub leader: Option<u64>,
    pub term: u64,
    pub members: Vec<MemberStatus>,
}

/// One member of the cluster, as the node answering sees it (and as the member says, when
/// it can be reached).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: u64,
    /// `voter` or `learner`.
    pub role: String,
    /// The member's cluster (QUIC) address.
    pub raft: String,
    /// The member's HTTP base URL, when it could be asked.
    pub http: Option<String>,
    pub log_index: Option<u64>,
    /// The commit index as far as the member has applied it.
    pub committed_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// Entries the member's applied index trails the leader's log by.
    pub lag: Option<u64>,
    /// Why the member could not be asked, or what it reports wrong with itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// `POST /v1/cluster/learners`: add a node as a learner.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddLearner {
    pub id: u64,
    /// Its cluster (QUIC) address, `host:port`.
    pub raft: String,
    /// Its HTTP base URL (optional: learned from the node when it can be reached).
    #[serde(default)]
    pub http: String,
}

/// `POST /v1/cluster/voters` (promote a learner) and `POST /v1/cluster/remove`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberId {
    pub id: u64,
}

/// What a membership change answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MembershipChanged {
    /// The log index of the membership entry.
    pub index: u64,
}
