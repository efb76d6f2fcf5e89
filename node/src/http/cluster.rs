//! The cluster admin API (admin token): `GET /v1/cluster`, and membership changes, which
//! any node takes and the leader makes.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use sesame_proto::api::{AddLearner, ClusterStatus, MemberId, MembershipChanged};

use crate::app::Node;
use crate::cluster::MembershipError;
use crate::http::api::JsonBody;
use crate::http::auth::Caller;
use crate::http::error::ApiError;
use crate::peer::{MemberWire, MembershipChange};

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/v1/cluster", get(status))
        .route("/v1/cluster/learners", post(add_learner))
        .route("/v1/cluster/voters", post(promote))
        .route("/v1/cluster/remove", post(remove))
}

async fn status(
    State(node): State<Arc<Node>>,
    caller: Caller,
) -> Result<Json<ClusterStatus>, ApiError> {
    caller.require_admin()?;
    Ok(Json(node.cluster.status().await))
}

async fn change(
    node: &Node,
    change: MembershipChange,
) -> Result<Json<MembershipChanged>, ApiError> {
    match node.cluster.change(change).await {
        Ok(index) => Ok(Json(MembershipChanged { index })),
        Err(MembershipError::Refused(m)) => {
            Err(ApiError::new(StatusCode::CONFLICT, "membership_refused", m))
        }
        Err(e @ MembershipError::NoLeader(_)) => {
            let mut api =
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_leader", e.to_string());
            api.retry_after = Some(1);
            Err(api)
        }
    }
}

async fn add_learner(
    State(node): State<Arc<Node>>,
    caller: Caller,
    JsonBody(req): JsonBody<AddLearner>,
) -> Result<Json<MembershipChanged>, ApiError> {
    caller.require_admin()?;
    if req.raft.trim().is_empty() || req.raft.len() > 256 {
        return Err(ApiError::bad_request(
            "raft must be the new node's cluster address, host:port (at most 256 bytes)",
        ));
    }
    if req.http.len() > 256 {
        return Err(ApiError::bad_request("http is at most 256 bytes"));
    }
    let member = MemberWire {
        raft: req.raft,
        http: req.http,
    };
    change(&node, MembershipChange::AddLearner { id: req.id, member }).await
}

async fn promote(
    State(node): State<Arc<Node>>,
    caller: Caller,
    JsonBody(req): JsonBody<MemberId>,
) -> Result<Json<MembershipChanged>, ApiError> {
    caller.require_admin()?;
    change(&node, MembershipChange::Promote { id: req.id }).await
}

async fn remove(
    State(node): State<Arc<Node>>,
    caller: Caller,
    JsonBody(req): JsonBody<MemberId>,
) -> Result<Json<MembershipChanged>, ApiError> {
    caller.require_admin()?;
    change(&node, MembershipChange::Remove { id: req.id }).await
}
