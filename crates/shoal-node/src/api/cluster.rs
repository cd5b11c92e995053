//! `GET /v1/cluster`: the admin's view of the nodes — each member, where
//! it is reached, when it joined and its load (calls running of those it
//! runs at once). A single node answers with itself alone.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde_json::json;

use crate::Node;
use crate::error::ApiError;

pub(super) async fn get(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    node.authenticate(&headers)?.check_admin()?;
    let busy = node.executor.busy();
    let slots = node.executor.n_slots();
    let Some(cluster) = &node.cluster else {
        return Ok(Json(json!({
            "clustered": false,
            "members": [{
                "id": null,
                "advertise": null,
                "started_ms": null,
                "running": busy,
                "capacity": slots,
                "this_node": true,
            }],
        })));
    };
    let me = cluster.id();
    let mut members: Vec<serde_json::Value> = cluster
        .membership
        .members()
        .into_iter()
        .map(|member| {
            let this_node = member.id == me;
            // This node's own load is read now, not from its last heartbeat.
            let (running, capacity) =
                if this_node { (busy, cluster.capacity) } else { (member.load.running, member.load.capacity) };
            json!({
                "id": member.id,
                "advertise": member.advertise,
                "started_ms": member.started_ms,
                "running": running,
                "capacity": capacity,
                "this_node": this_node,
            })
        })
        .collect();
    members.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Ok(Json(json!({ "clustered": true, "members": members })))
}
