//! This node as one of a cluster (ARCHITECTURE.md, "In a cluster"), when it is started with a
//! Redis URL: it heartbeats its membership and load, mirrors the shared
//! registry, takes asynchronous calls from the cluster's queue, puts back
//! the calls of nodes that died, and places calls it cannot run warm
//! itself on the node that should (rendezvous hashing with bounded load),
//! forwarding them over HTTP/2 with the cluster secret.
//!
//! A forwarded call runs where it lands: the receiving node never
//! forwards it again. A forward that never reached its peer is placed
//! again without that peer; one whose answer was lost is reported to the
//! caller as `unavailable` (it may have run).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderName, HeaderValue, Response, StatusCode};
use bytes::Bytes;
use shoal_cluster::placement::{self, Candidate};
use shoal_cluster::{Answer, CallQueue, ForwardError, Forwarder, Load, Member, Membership};
use shoal_runtime::ChainError;
use tokio::sync::{Notify, Semaphore};

use crate::Node;
use crate::error::{ApiError, ErrorKind};
use crate::registry::DeployedFunction;

/// Headers between nodes.
pub(crate) const LOAD_HEADER: &str = "x-shoal-load";
pub(crate) const DEPTH_HEADER: &str = "x-shoal-chain-depth";
pub(crate) const DEADLINE_HEADER: &str = "x-shoal-deadline-ms";
pub(crate) const CALL_ID_HEADER: &str = "x-shoal-call-id";
/// The id of the node that ran a call, on its answer (cluster mode only).
pub(crate) const NODE_HEADER: &str = "x-shoal-node";
/// The CPU time a sync call's run took, in microseconds (what its usage
/// is charged).
pub(crate) const CPU_HEADER: &str = "x-shoal-cpu-us";

/// How often the node reports its load and checks the registry's version.
const TICK: Duration = Duration::from_millis(100);
/// Registry polls happen every this many ticks.
const MIRROR_EVERY: u32 = 2;
/// Dead nodes' leases are looked for every this many ticks.
const RECLAIM_EVERY: u32 = 10;
/// How long the async worker waits before looking at an empty queue again
/// (a call this node queues wakes it at once).
const IDLE_POLL: Duration = Duration::from_millis(25);
/// A peer's load from its last answer counts for this long.
const REPORT_FRESH: Duration = Duration::from_secs(1);

pub(crate) struct Cluster {
    pub(crate) membership: Membership,
    shared: shoal_cluster::SharedRegistry,
    pub(crate) queue: CallQueue,
    /// Where every node adds its usage (set when the node joins).
    pub(crate) usage: Option<shoal_cluster::SharedUsage>,
    /// The cluster's cron triggers (set when the node joins).
    pub(crate) triggers: Option<shoal_cluster::SharedTriggers>,
    /// The cluster's queues (set when the node joins).
    pub(crate) queues: Option<shoal_cluster::SharedQueues>,
    pub(crate) forwarder: Forwarder,
    /// The secret peers must present: the cluster's current one, and the
    /// one before it while peers may still send it (Redis lost it and
    /// another node made a new one).
    secrets: std::sync::RwLock<(String, Option<String>)>,
    /// Calls this node runs at once before queueing them (0 for a gateway,
    /// which runs none while another node can).
    pub(crate) capacity: u32,
    /// Asynchronous calls this node has taken and is running, by id: the
    /// leases it holds for a reason.
    pub(crate) running_ids: Mutex<HashMap<String, u32>>,
    /// Peers' loads from their answers, fresher than their heartbeats.
    reported: Mutex<HashMap<String, (Load, Instant)>>,
    /// Calls forwarded to each peer and not answered yet.
    in_flight: Mutex<HashMap<String, u32>>,
    /// Wakes the async worker: this node queued a call.
    pub(crate) queued: Notify,
    /// Asynchronous calls this node runs at once.
    async_slots: Arc<Semaphore>,
    pub(crate) stopping: AtomicBool,
    /// Asynchronous calls running here now.
    pub(crate) async_running: AtomicU32,
    /// Calls sent to peers, and those whose peer could not be reached or
    /// whose answer was lost.
    pub(crate) n_forwarded: std::sync::atomic::AtomicU64,
    pub(crate) n_forward_failures: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("me", self.membership.me()).finish_non_exhaustive()
    }
}

/// Where a call runs.
pub(crate) enum Route {
    Local,
    Peer(Member),
}

impl Cluster {
    pub(crate) fn new(
        shared: shoal_cluster::SharedRegistry,
        membership: Membership,
        queue: CallQueue,
        forwarder: Forwarder,
        secret: String,
        capacity: u32,
    ) -> Self {
        Self {
            shared,
            membership,
            queue,
            usage: None,
            triggers: None,
            queues: None,
            forwarder,
            secrets: std::sync::RwLock::new((secret, None)),
            capacity,
            running_ids: Mutex::default(),
            reported: Mutex::default(),
            in_flight: Mutex::default(),
            queued: Notify::new(),
            async_slots: Arc::new(Semaphore::new(capacity.max(1) as usize)),
            stopping: AtomicBool::new(false),
            async_running: AtomicU32::new(0),
            n_forwarded: Default::default(),
            n_forward_failures: Default::default(),
        }
    }

    pub(crate) fn id(&self) -> &str {
        &self.membership.me().id
    }

    /// Whether `presented` is the cluster secret (constant time).
    pub(crate) fn is_secret(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        let secrets = self.secrets.read().unwrap_or_else(|e| e.into_inner());
        let current = bool::from(presented.ct_eq(secrets.0.as_bytes()));
        let previous = secrets.1.as_ref().is_some_and(|p| bool::from(presented.ct_eq(p.as_bytes())));
        current | previous
    }

    /// Take up the secret Redis has now, if it changed.
    async fn refresh_secret(&self) {
        let current = match self.registry_secret().await {
            Some(current) => current,
            None => return,
        };
        let mut secrets = self.secrets.write().unwrap_or_else(|e| e.into_inner());
        if secrets.0 != current && self.forwarder.set_secret(&current).is_ok() {
            tracing::warn!("the cluster secret changed in Redis (it lost its data); using the new one");
            self.shared.adopt_secret(&current);
            let previous = std::mem::replace(&mut secrets.0, current);
            secrets.1 = Some(previous);
        }
    }

    async fn registry_secret(&self) -> Option<String> {
        match self.shared.current_secret().await {
            Ok(secret) => secret,
            Err(e) => {
                tracing::warn!(error = %e, "reading the cluster secret failed");
                None
            }
        }
    }

    fn load_of_me(&self, node: &Node) -> Load {
        Load { running: node.executor.busy(), capacity: self.capacity }
    }

    /// Every member but `exclude`, with its best known load.
    fn candidates(&self, node: &Node, exclude: &[String]) -> Vec<(Member, Load)> {
        let reported = self.reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let in_flight = self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.membership
            .members()
            .into_iter()
            .filter(|m| !exclude.contains(&m.id))
            .map(|m| {
                let load = if m.id == self.id() {
                    self.load_of_me(node)
                } else {
                    let mut load = match reported.get(&m.id) {
                        Some((load, at)) if at.elapsed() < REPORT_FRESH => *load,
                        _ => m.load,
                    };
                    load.running += in_flight.get(&m.id).copied().unwrap_or(0);
                    load
                };
                (m, load)
            })
            .collect()
    }

    /// Where a client's call of `function` runs: here when this node has
    /// room; else on the node placement picks — where the function is warm
    /// and its keys are in the local tier, unless that node is busy.
    pub(crate) fn route(&self, node: &Node, function: &DeployedFunction, exclude: &[String]) -> Route {
        if self.load_of_me(node).has_room() {
            return Route::Local;
        }
        self.place(node, &function.key, exclude)
    }

    fn place(&self, node: &Node, key: &str, exclude: &[String]) -> Route {
        let candidates = self.candidates(node, exclude);
        let view: Vec<Candidate<'_>> =
            candidates.iter().map(|(m, load)| Candidate { id: &m.id, load: *load }).collect();
        let chosen = placement::place(key, &view, placement::DEFAULT_BOUND);
        tracing::debug!(function = %key, ?view, ?chosen, "placed");
        match chosen {
            Some(id) if id != self.id() => {
                let member = candidates.iter().find(|(m, _)| m.id == id).map(|(m, _)| m.clone());
                member.map_or(Route::Local, Route::Peer)
            }
            _ => Route::Local,
        }
    }

    /// Send a call to `peer` and note the load its answer reports.
    async fn send(
        &self,
        peer: &Member,
        path: &str,
        headers: &[(HeaderName, HeaderValue)],
        input: Bytes,
        timeout: Duration,
    ) -> Result<Answer, ForwardError> {
        self.n_forwarded.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight::new(self, &peer.id);
        let answer = self.forwarder.post(&peer.advertise, path, headers, input, timeout).await;
        match &answer {
            Ok(answer) => {
                if let Some(load) = answer.headers.get(LOAD_HEADER).and_then(|v| parse_load(v.to_str().ok()?)) {
                    self.reported
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(peer.id.clone(), (load, Instant::now()));
                }
            }
            Err(_) => {
                self.n_forward_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        answer
    }
}

/// An asynchronous call counted as running here (and its lease as held
/// for a reason) until its task ends, however it ends.
struct Running<'a> {
    cluster: &'a Cluster,
    id: &'a str,
}

impl<'a> Running<'a> {
    fn new(cluster: &'a Cluster, id: &'a str) -> Self {
        cluster.async_running.fetch_add(1, Ordering::AcqRel);
        *cluster
            .running_ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(id.to_string())
            .or_default() += 1;
        Self { cluster, id }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut running = self.cluster.running_ids.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = running.get_mut(self.id) {
            *n -= 1;
            if *n == 0 {
                running.remove(self.id);
            }
        }
        self.cluster.async_running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A forward counted against its peer's load until it ends, however it
/// ends (answered, failed, or dropped with its caller).
struct InFlight<'a> {
    cluster: &'a Cluster,
    peer: &'a str,
}

impl<'a> InFlight<'a> {
    fn new(cluster: &'a Cluster, peer: &'a str) -> Self {
        *cluster
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(peer.to_string())
            .or_default() += 1;
        Self { cluster, peer }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(n) =
            self.cluster.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_mut(self.peer)
        {
            *n = n.saturating_sub(1);
        }
    }
}

pub(crate) fn load_header(running: u32, capacity: u32) -> HeaderValue {
    HeaderValue::from_str(&format!("{running}/{capacity}")).expect("digits and a slash are a header value")
}

fn parse_load(text: &str) -> Option<Load> {
    let (running, capacity) = text.split_once('/')?;
    Some(Load { running: running.parse().ok()?, capacity: capacity.parse().ok()? })
}

/// A forwarded call names the version it resolved to here, so the peer
/// runs the same one (an alias may have split the call).
fn internal_path(function: &DeployedFunction) -> String {
    format!("/internal/v1/functions/{}/{}/invoke", function.record.tenant, function.reference())
}

impl Node {
    /// A client's call, placed: `None` when it should run here, else the
    /// answer of the node that ran it.
    pub(crate) async fn forward_invoke(
        &self,
        function: &DeployedFunction,
        input: &Bytes,
        call_id: &str,
        traced: Option<&crate::trace::Traced>,
    ) -> Result<Option<Response<Body>>, ApiError> {
        let Some(cluster) = &self.cluster else { return Ok(None) };
        let mut tried: Vec<String> = Vec::new();
        loop {
            let peer = match cluster.route(self, function, &tried) {
                Route::Local => return Ok(None),
                Route::Peer(peer) => peer,
            };
            let mut headers = vec![(HeaderName::from_static(CALL_ID_HEADER), header_value(call_id))];
            let forward = self.forward_span(traced.map(|t| &t.span), function, &peer.id, &mut headers);
            let timeout = function.settings.timeout + Duration::from_secs(5);
            let sent = cluster.send(&peer, &internal_path(function), &headers, input.clone(), timeout).await;
            self.end_forward_span(forward, &sent);
            match sent {
                Ok(answer) if answer.status == StatusCode::UNAUTHORIZED => {
                    // The peer does not take this node's secret (it changed
                    // in Redis and one of us has not seen it yet): the call
                    // did not run there.
                    tracing::warn!(peer = %peer.id, "a peer refused the cluster secret; placing the call again");
                    tried.push(peer.id);
                }
                Ok(answer) => return Ok(Some(relay(answer))),
                Err(ForwardError::NotSent { reason, .. }) => {
                    tracing::warn!(peer = %peer.id, %reason, "a peer could not be reached; placing the call again");
                    tried.push(peer.id);
                }
                Err(e) => {
                    return Err(ApiError::new(
                        ErrorKind::Unavailable,
                        format!("the node running call {call_id} stopped answering ({e}); the call may have run"),
                    ));
                }
            }
        }
    }

    /// A client span for a forward under `parent`, its context added to
    /// `headers` as `traceparent`.
    fn forward_span(
        &self,
        parent: Option<&crate::trace::Span>,
        function: &DeployedFunction,
        peer: &str,
        headers: &mut Vec<(HeaderName, HeaderValue)>,
    ) -> Option<crate::trace::Span> {
        let parent = parent?;
        let mut span = parent.child(
            if parent.sampled { format!("forward {}", function.key) } else { String::new() },
            crate::trace::Kind::Client,
        );
        span.attr("shoal.peer", peer);
        headers.push((HeaderName::from_static("traceparent"), header_value(&span.context().header())));
        Some(span)
    }

    fn end_forward_span(&self, span: Option<crate::trace::Span>, sent: &Result<Answer, ForwardError>) {
        let Some(mut span) = span else { return };
        let error = match sent {
            Ok(answer) => {
                span.attr("http.response.status_code", i64::from(answer.status.as_u16()));
                answer.status.is_server_error().then(|| answer.status.to_string())
            }
            Err(e) => Some(e.to_string()),
        };
        self.tracer.end(span, error);
    }

    /// A chained call that found no room here: run it on another node.
    pub(crate) async fn forward_chained(
        &self,
        function: &DeployedFunction,
        input: Bytes,
        depth: u32,
        deadline: Option<Instant>,
        traced: Option<&crate::trace::Span>,
    ) -> Result<Vec<u8>, ChainError> {
        let cluster = self.cluster.as_ref().ok_or_else(|| ChainError::Unavailable("no room on this node".into()))?;
        let mut tried = vec![cluster.id().to_string()];
        // The callee ends by the caller's deadline, or its own timeout.
        let remaining = deadline.map_or(function.settings.timeout, |d| {
            d.saturating_duration_since(Instant::now()).min(function.settings.timeout)
        });
        loop {
            let Route::Peer(peer) = cluster.place(self, &function.key, &tried) else {
                return Err(ChainError::Unavailable(format!(
                    "no node of the cluster has room for `{}` now",
                    function.key
                )));
            };
            let mut headers = vec![
                (HeaderName::from_static(DEPTH_HEADER), header_value(&depth.to_string())),
                (HeaderName::from_static(DEADLINE_HEADER), header_value(&remaining.as_millis().to_string())),
            ];
            let forward = self.forward_span(traced, function, &peer.id, &mut headers);
            let timeout = remaining + Duration::from_secs(5);
            let sent = cluster.send(&peer, &internal_path(function), &headers, input.clone(), timeout).await;
            self.end_forward_span(forward, &sent);
            match sent {
                Ok(answer) if answer.status == StatusCode::UNAUTHORIZED => tried.push(peer.id),
                Ok(answer) => return chained_outcome(answer),
                Err(ForwardError::NotSent { .. }) => tried.push(peer.id),
                Err(e) => return Err(ChainError::Unavailable(format!("the node running the call: {e}"))),
            }
        }
    }
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// A peer's answer as this node's answer to its client.
fn relay(answer: Answer) -> Response<Body> {
    let mut response = Response::new(Body::from(answer.body));
    *response.status_mut() = answer.status;
    for name in [
        CONTENT_TYPE,
        RETRY_AFTER,
        HeaderName::from_static(CALL_ID_HEADER),
        HeaderName::from_static(NODE_HEADER),
        HeaderName::from_static(CPU_HEADER),
    ] {
        if let Some(value) = answer.headers.get(&name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}

/// A peer's answer to a chained call as the guest sees it.
fn chained_outcome(answer: Answer) -> Result<Vec<u8>, ChainError> {
    if answer.status == StatusCode::OK {
        return Ok(answer.body.to_vec());
    }
    let (kind, message) = serde_json::from_slice::<serde_json::Value>(&answer.body)
        .ok()
        .and_then(|v| {
            let e = v.get("error")?;
            Some((e.get("kind")?.as_str()?.to_string(), e.get("message")?.as_str()?.to_string()))
        })
        .unwrap_or_else(|| ("internal".into(), format!("a peer answered {}", answer.status)));
    Err(match kind.as_str() {
        "not_found" => ChainError::NotFound(message),
        "overloaded" | "unavailable" => ChainError::Unavailable(message),
        "function_error" => ChainError::Failed(shoal_runtime::CallError::Function { message }),
        // The guest sees the message of any other failure.
        "trap" | "timeout" | "out_of_memory" | "too_large" => {
            ChainError::Failed(shoal_runtime::CallError::Trap { message: format!("{kind}: {message}") })
        }
        _ => ChainError::Unavailable(format!("{kind}: {message}")),
    })
}

/// The node's cluster chores, every tick until the node is gone: report
/// load, mirror the registry, put back the calls of dead nodes.
pub(crate) fn spawn_chores(node: &Arc<Node>) {
    let weak = Arc::downgrade(node);
    let worker = weak.clone();
    crate::supervise(node, "async worker", move || async_worker(worker.clone()));
    crate::supervise(node, "cluster chores", move || chores(weak.clone()));
}

async fn chores(weak: Weak<Node>) {
    let mut tick: u32 = 0;
    let mut suspects: HashSet<String> = HashSet::new();
    let mut strays: HashSet<String> = HashSet::new();
    let mut every = tokio::time::interval(TICK);
    loop {
        every.tick().await;
        let Some(node) = weak.upgrade() else { return };
        let Some(cluster) = &node.cluster else { return };
        if cluster.stopping.load(Ordering::Acquire) {
            return;
        }
        node.chores_beat.store(crate::now_ms(), Ordering::Release);
        #[cfg(feature = "fault-injection")]
        if node.fault_in_chores.swap(false, Ordering::AcqRel) {
            panic!("fault injected: a panic in the cluster chores");
        }
        cluster.membership.report_load(cluster.load_of_me(&node));
        tick = tick.wrapping_add(1);
        if tick.is_multiple_of(MIRROR_EVERY) {
            match node.registry.mirror(false, node.config.log_lines_per_function).await {
                Ok(true) => {
                    node.apply_tenant_limits();
                    node.collect_orphans();
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "mirroring the cluster's registry failed; retrying"),
            }
        }
        if tick.is_multiple_of(RECLAIM_EVERY) {
            reclaim(cluster, &mut suspects).await;
            release_strays(cluster, &mut strays).await;
            cluster.refresh_secret().await;
        }
    }
}

/// Requeue the calls held by nodes that are not members (seen so twice in
/// a row, so a node that just joined is not mistaken for a dead one; and
/// never while the node's heartbeat has time left).
async fn reclaim(cluster: &Cluster, suspects: &mut HashSet<String>) {
    let holders = match cluster.queue.lease_holders().await {
        Ok(holders) => holders,
        Err(e) => {
            tracing::warn!(error = %e, "listing the cluster's call leases failed");
            return;
        }
    };
    let live: HashSet<String> = cluster.membership.members().into_iter().map(|m| m.id).collect();
    // Forget what was noted about nodes that are gone (ids are new on
    // every start, so these maps would otherwise only grow).
    cluster.reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|id, _| live.contains(id));
    cluster
        .in_flight
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .retain(|id, n| live.contains(id) || *n > 0);
    let mut now_suspect = HashSet::new();
    for holder in holders {
        if holder == cluster.id() || live.contains(&holder) {
            continue;
        }
        if suspects.contains(&holder) {
            match cluster.queue.requeue_from(&holder).await {
                Ok(Some(0) | None) => {}
                Ok(Some(n)) => tracing::info!(node = %holder, calls = n, "requeued the calls of a node that is gone"),
                Err(e) => tracing::warn!(node = %holder, error = %e, "requeueing a dead node's calls failed"),
            }
        } else {
            now_suspect.insert(holder);
        }
    }
    *suspects = now_suspect;
}

/// Leases this node holds on calls it is not running (a `take` whose
/// answer was lost, a run that could not record its end): seen so twice in
/// a row, they go back to the queue, so that no call waits on a live node
/// that forgot it.
async fn release_strays(cluster: &Cluster, strays: &mut HashSet<String>) {
    let held = match cluster.queue.held(cluster.id()).await {
        Ok(held) => held,
        Err(e) => {
            tracing::warn!(error = %e, "listing this node's call leases failed");
            return;
        }
    };
    let running: HashSet<String> =
        cluster.running_ids.lock().unwrap_or_else(std::sync::PoisonError::into_inner).keys().cloned().collect();
    let mut now_stray = HashSet::new();
    for id in held.into_iter().filter(|id| !running.contains(id)) {
        if strays.contains(&id) {
            match cluster.queue.requeue(cluster.id(), &id).await {
                Ok(true) => tracing::warn!(call_id = %id, "requeued a call this node held but was not running"),
                Ok(false) => {}
                Err(e) => tracing::warn!(call_id = %id, error = %e, "requeueing a stray call failed"),
            }
        } else {
            now_stray.insert(id);
        }
    }
    *strays = now_stray;
}

/// Take asynchronous calls from the cluster's queue while this node has
/// room for them, and run each.
async fn async_worker(weak: Weak<Node>) {
    loop {
        let (slots, cluster_stopping) = {
            let Some(node) = weak.upgrade() else { return };
            let Some(cluster) = &node.cluster else { return };
            (cluster.async_slots.clone(), cluster.stopping.load(Ordering::Acquire))
        };
        if cluster_stopping {
            return;
        }
        let Ok(permit) = slots.acquire_owned().await else { return };
        let Some(node) = weak.upgrade() else { return };
        let Some(cluster) = node.cluster.clone() else { return };
        // A node on its way out takes nothing more.
        if cluster.stopping.load(Ordering::Acquire) {
            return;
        }
        if cluster.capacity == 0 {
            // A gateway runs no calls: the other nodes take them.
            return;
        }
        match cluster.queue.take(cluster.id()).await {
            Ok(Some(call)) => {
                tokio::spawn(async move {
                    let id = call.id.clone();
                    let running = Running::new(&cluster, &id);
                    let requeue = node.run_taken(call).await;
                    // No longer running here before it is given back, so
                    // a new take of it is never mistaken for this one.
                    drop(running);
                    if requeue && let Err(e) = cluster.queue.requeue(cluster.id(), &id).await {
                        tracing::warn!(call_id = %id, error = %e, "requeueing failed; it is given back later");
                    }
                    drop(permit);
                });
            }
            Ok(None) => {
                drop((permit, node));
                tokio::select! {
                    () = cluster.queued.notified() => {}
                    () = tokio::time::sleep(IDLE_POLL) => {}
                }
            }
            Err(e) => {
                drop((permit, node));
                tracing::warn!(error = %e, "taking from the cluster's call queue failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
