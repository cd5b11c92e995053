//! Who is in the cluster: a heartbeat key per node in Redis.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use crate::{ClusterError, redis_error};

/// A node as the others see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Unique per process run: a restarted node joins as a new member.
    pub id: String,
    /// Where the other nodes reach it (`host:port`).
    pub advertise: String,
    /// When it joined, Unix ms.
    pub started_ms: u64,
    /// Its load as of its last heartbeat.
    #[serde(default)]
    pub load: Load,
}

/// How busy a node is: what placement weighs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// Calls running now.
    pub running: u32,
    /// Calls it runs at once before queueing.
    pub capacity: u32,
}

impl Load {
    pub fn has_room(&self) -> bool {
        self.running < self.capacity
    }
}

impl Member {
    pub fn new(id: impl Into<String>, advertise: impl Into<String>) -> Self {
        let started_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Self { id: id.into(), advertise: advertise.into(), started_ms, load: Load::default() }
    }
}

#[derive(Clone)]
pub struct MembershipConfig {
    /// May hold a password: left out of `Debug`.
    pub redis_url: String,
    /// How long a node's key lives without a heartbeat: a node that stops
    /// is gone from the others' view within about this long. Heartbeats
    /// (and view refreshes) come every third of it. Default 1 s.
    pub ttl: Duration,
    /// Prefix of the keys, so that several clusters can share one Redis.
    /// Default `shoal`.
    pub prefix: String,
}

impl std::fmt::Debug for MembershipConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MembershipConfig")
            .field("redis_url", &"<redacted>")
            .field("ttl", &self.ttl)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl MembershipConfig {
    pub fn new(redis_url: impl Into<String>) -> Self {
        Self { redis_url: redis_url.into(), ttl: Duration::from_secs(1), prefix: "shoal".into() }
    }
}

/// This node's place in the cluster, kept alive by a background task until
/// [`Membership::leave`] (or drop, after which the key expires).
pub struct Membership {
    me: Member,
    load: Arc<Mutex<Load>>,
    key: String,
    conn: ConnectionManager,
    view: watch::Receiver<Vec<Member>>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    viewer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership").field("me", &self.me).field("members", &*self.view.borrow()).finish()
    }
}

impl Membership {
    /// Register `me` and start heartbeating. Fails if Redis does not
    /// answer: a node configured for a cluster must not start alone.
    pub async fn join(config: MembershipConfig, me: Member) -> Result<Self, ClusterError> {
        let client = redis::Client::open(config.redis_url.as_str())
            .map_err(|e| ClusterError::Redis(format!("redis URL: {e}")))?;
        let timeout = (config.ttl / 2).max(Duration::from_millis(50));
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let mut conn = ConnectionManager::new_lazy_with_config(client, manager).map_err(redis_error)?;
        let key = format!("{}:node:{}", config.prefix, me.id);
        let load = Arc::new(Mutex::new(me.load));
        let value = {
            let (me, load) = (me.clone(), load.clone());
            move || {
                let member = Member { load: *load.lock().unwrap_or_else(|e| e.into_inner()), ..me.clone() };
                serde_json::to_string(&member).expect("a member serialises")
            }
        };
        let ttl_ms = u64::try_from(config.ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        heartbeat(&mut conn, &key, &value(), ttl_ms).await?;
        let pattern = format!("{}:node:*", config.prefix);
        let (publish, view) = watch::channel(read_members(&mut conn, &pattern).await?);
        let (stop, mut stopped) = oneshot::channel();
        let every = config.ttl / 3;
        let task = {
            let mut conn = conn.clone();
            let key = key.clone();
            tokio::spawn(async move {
                // On a fixed beat, not a sleep after each round: a slow
                // round must not push the next heartbeat past the TTL.
                let mut beat = tokio::time::interval(every);
                beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                beat.tick().await;
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        _ = beat.tick() => {}
                    }
                    if let Err(e) = heartbeat(&mut conn, &key, &value(), ttl_ms).await {
                        tracing::warn!(error = %e, "cluster heartbeat failed; retrying");
                        // Once more at once (a reconnect), then on the beat.
                        let _ = heartbeat(&mut conn, &key, &value(), ttl_ms).await;
                    }
                }
            })
        };
        // The view is read by a task of its own, so a slow read never
        // delays a heartbeat.
        let viewer = {
            let mut conn = conn.clone();
            tokio::spawn(async move {
                let mut beat = tokio::time::interval(every);
                beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                beat.tick().await;
                loop {
                    beat.tick().await;
                    match read_members(&mut conn, &pattern).await {
                        Ok(members) => {
                            publish.send_if_modified(|current| {
                                let changed = *current != members;
                                *current = members;
                                changed
                            });
                        }
                        // Keep the last view until Redis answers again.
                        Err(e) => tracing::warn!(error = %e, "reading the cluster's members failed"),
                    }
                }
            })
        };
        Ok(Self {
            me,
            load,
            key,
            conn,
            view,
            stop: Mutex::new(Some(stop)),
            task: Mutex::new(Some(task)),
            viewer: Mutex::new(Some(viewer)),
        })
    }

    pub fn me(&self) -> &Member {
        &self.me
    }

    /// Set the load the next heartbeats report.
    pub fn report_load(&self, load: Load) {
        *self.load.lock().unwrap_or_else(|e| e.into_inner()) = load;
    }

    /// The members up as of the last refresh, this node included, by id.
    pub fn members(&self) -> Vec<Member> {
        self.view.borrow().clone()
    }

    /// Changes of the member list.
    pub fn changes(&self) -> watch::Receiver<Vec<Member>> {
        self.view.clone()
    }

    /// Stop heartbeating and remove this node's key at once.
    pub async fn leave(&self) -> Result<(), ClusterError> {
        if let Some(stop) = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = stop.send(());
        }
        if let Some(viewer) = self.viewer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            viewer.abort();
        }
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        self.conn.clone().del::<_, ()>(&self.key).await.map_err(redis_error)
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        // Without `leave`, the key stays until its TTL runs out.
        for task in [&self.task, &self.viewer] {
            if let Some(task) = task.lock().unwrap_or_else(|e| e.into_inner()).take() {
                task.abort();
            }
        }
    }
}

async fn heartbeat(conn: &mut ConnectionManager, key: &str, value: &str, ttl_ms: u64) -> Result<(), ClusterError> {
    redis::cmd("SET").arg(key).arg(value).arg("PX").arg(ttl_ms).query_async::<()>(conn).await.map_err(redis_error)
}

/// Every member key's value, sorted by id; unreadable values are skipped.
async fn read_members(conn: &mut ConnectionManager, pattern: &str) -> Result<Vec<Member>, ClusterError> {
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(500)
            .query_async(conn)
            .await
            .map_err(redis_error)?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(conn).await.map_err(redis_error)?;
    let mut members: Vec<Member> =
        values.into_iter().flatten().filter_map(|value| serde_json::from_str(&value).ok()).collect();
    members.sort_by(|a, b| a.id.cmp(&b.id));
    members.dedup_by(|a, b| a.id == b.id);
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_testkit::RedisServer;
    use std::time::Instant;

    fn config(redis: &RedisServer, ttl_ms: u64) -> MembershipConfig {
        MembershipConfig { ttl: Duration::from_millis(ttl_ms), ..MembershipConfig::new(redis.url()) }
    }

    /// Wait (bounded) until `membership` sees exactly `ids`.
    async fn sees(membership: &Membership, ids: &[&str]) -> bool {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            let seen: Vec<String> = membership.members().into_iter().map(|m| m.id).collect();
            if seen == ids {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn members_see_each_other_join_and_leave() {
        let redis = RedisServer::start();
        let a = Membership::join(config(&redis, 600), Member::new("a", "127.0.0.2:8080")).await.unwrap();
        assert_eq!(a.members(), vec![a.me().clone()], "a node sees itself at once");
        let b = Membership::join(config(&redis, 600), Member::new("b", "127.0.0.3:8080")).await.unwrap();
        assert!(sees(&a, &["a", "b"]).await, "{a:?}");
        assert!(sees(&b, &["a", "b"]).await, "{b:?}");
        assert_eq!(b.members()[0].advertise, "127.0.0.2:8080");
        b.leave().await.unwrap();
        assert!(sees(&a, &["a"]).await, "{a:?}");
    }

    #[tokio::test]
    async fn a_node_that_stops_heartbeating_drops_out_and_a_restarted_one_rejoins() {
        let redis = RedisServer::start();
        let a = Membership::join(config(&redis, 300), Member::new("a", "127.0.0.2:8080")).await.unwrap();
        let b = Membership::join(config(&redis, 300), Member::new("b-1", "127.0.0.3:8080")).await.unwrap();
        assert!(sees(&a, &["a", "b-1"]).await, "{a:?}");
        // Killed: no leave, no more heartbeats; its key expires.
        drop(b);
        assert!(sees(&a, &["a"]).await, "{a:?}");
        let b = Membership::join(config(&redis, 300), Member::new("b-2", "127.0.0.3:8080")).await.unwrap();
        assert!(sees(&a, &["a", "b-2"]).await, "{a:?}");
        b.leave().await.unwrap();
    }

    #[tokio::test]
    async fn joining_without_redis_fails_in_bounded_time() {
        let redis = RedisServer::start();
        let url = redis.url();
        drop(redis);
        let started = Instant::now();
        let joined = Membership::join(MembershipConfig::new(url), Member::new("a", "127.0.0.2:8080")).await;
        assert!(matches!(joined, Err(ClusterError::Redis(_))), "{joined:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    }
}
