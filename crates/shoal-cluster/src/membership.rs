//! Who is in the cluster: one sorted set of heartbeats in Redis.
//!
//! Keys (under the cluster's prefix `P`):
//! - `P:members` — sorted set, node id → the time its heartbeat runs out
//!   (Unix ms by Redis's own clock, so the nodes' clocks never matter);
//! - `P:member-info` — hash, node id → its [`Member`] (JSON), written with
//!   the score in one step.
//!
//! A heartbeat sets both; reading the members returns those whose time has
//! not run out and, in the same script, removes the others (whoever reads
//! first cleans up). Neither grows with what else Redis holds: the old
//! layout (a key per node with a TTL, found with `SCAN`) read the whole
//! keyspace, state values and call records included, several times a
//! second on every node.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use crate::{ClusterError, redis_error};

/// `now_ms()`: Redis's clock in Unix ms. Every script that compares a
/// heartbeat's time with now asks Redis, so a node whose clock is off
/// neither keeps a dead node alive nor drops a live one. (Redis 5 and
/// later replicate a script's effects, not the script, so reading `TIME`
/// before writing is allowed.) The numbers stay below 2^53 and have 13
/// digits, which Lua turns into exact strings for the commands.
pub(crate) const NOW_MS: &str = r"
local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
";

/// Record a heartbeat: the member's time runs out TTL from now, and its
/// value (with its load) replaces the last one. KEYS: members, info; ARGV:
/// id, TTL in ms, the member as JSON.
const HEARTBEAT: &str = r"
redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
";

/// The values of the members whose time has not run out, after removing
/// the others (in batches, as Lua's `unpack` is bounded). KEYS: members,
/// info.
const READ: &str = r"
local now = now_ms()
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #dead > 0 then
  for i = 1, #dead, 500 do
    redis.call('HDEL', KEYS[2], unpack(dead, i, math.min(i + 499, #dead)))
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
end
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
local values = {}
for i = 1, #live, 500 do
  for _, value in ipairs(redis.call('HMGET', KEYS[2], unpack(live, i, math.min(i + 499, #live)))) do
    if value then values[#values + 1] = value end
  end
end
return values
";

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
    /// How long a node stays a member without a heartbeat: a node that
    /// stops is gone from the others' view within about this long.
    /// Heartbeats (and view refreshes) come every third of it. Default 1 s.
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

/// The sorted set of members' heartbeats under `prefix` (also what
/// [`crate::CallQueue::requeue_from`] asks whether a node is alive).
pub(crate) fn members_key(prefix: &str) -> String {
    format!("{prefix}:members")
}

/// The keys and scripts of one cluster's membership, shared by the tasks.
struct Table {
    members: String,
    info: String,
    heartbeat: Script,
    read: Script,
}

impl Table {
    fn new(prefix: &str) -> Self {
        Self {
            members: members_key(prefix),
            info: format!("{prefix}:member-info"),
            heartbeat: Script::new(&format!("{NOW_MS}{HEARTBEAT}")),
            read: Script::new(&format!("{NOW_MS}{READ}")),
        }
    }

    async fn heartbeat(
        &self,
        conn: &mut ConnectionManager,
        id: &str,
        value: &str,
        ttl_ms: u64,
    ) -> Result<(), ClusterError> {
        let _: i64 = self
            .heartbeat
            .key(&self.members)
            .key(&self.info)
            .arg(id)
            .arg(ttl_ms)
            .arg(value)
            .invoke_async(conn)
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    /// Every live member, sorted by id; unreadable values are skipped.
    async fn read(&self, conn: &mut ConnectionManager) -> Result<Vec<Member>, ClusterError> {
        let values: Vec<String> =
            self.read.key(&self.members).key(&self.info).invoke_async(conn).await.map_err(redis_error)?;
        let mut members: Vec<Member> = values.iter().filter_map(|value| serde_json::from_str(value).ok()).collect();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        members.dedup_by(|a, b| a.id == b.id);
        Ok(members)
    }

    async fn remove(&self, conn: &mut ConnectionManager, id: &str) -> Result<(), ClusterError> {
        redis::pipe()
            .atomic()
            .zrem(&self.members, id)
            .ignore()
            .hdel(&self.info, id)
            .ignore()
            .query_async::<()>(conn)
            .await
            .map_err(redis_error)
    }
}

/// This node's place in the cluster, kept alive by a background task until
/// [`Membership::leave`] (or drop, after which its heartbeat runs out).
pub struct Membership {
    me: Member,
    load: Arc<Mutex<Load>>,
    table: Arc<Table>,
    ttl_ms: u64,
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

/// This member with the load it reports now, as the heartbeat carries it.
fn value_of(me: &Member, load: &Mutex<Load>) -> String {
    let member = Member { load: *load.lock().unwrap_or_else(|e| e.into_inner()), ..me.clone() };
    serde_json::to_string(&member).expect("a member serialises")
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
        let table = Arc::new(Table::new(&config.prefix));
        let load = Arc::new(Mutex::new(me.load));
        let ttl_ms = u64::try_from(config.ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        table.heartbeat(&mut conn, &me.id, &value_of(&me, &load), ttl_ms).await?;
        let (publish, view) = watch::channel(table.read(&mut conn).await?);
        let (stop, mut stopped) = oneshot::channel();
        let every = config.ttl / 3;
        let task = {
            let (mut conn, table, me, load) = (conn.clone(), table.clone(), me.clone(), load.clone());
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
                    let value = value_of(&me, &load);
                    if let Err(e) = table.heartbeat(&mut conn, &me.id, &value, ttl_ms).await {
                        tracing::warn!(error = %e, "cluster heartbeat failed; retrying");
                        // Once more at once (a reconnect), then on the beat.
                        let _ = table.heartbeat(&mut conn, &me.id, &value, ttl_ms).await;
                    }
                }
            })
        };
        // The view is read by a task of its own, so a slow read never
        // delays a heartbeat.
        let viewer = {
            let (mut conn, table) = (conn.clone(), table.clone());
            tokio::spawn(async move {
                let mut beat = tokio::time::interval(every);
                beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                beat.tick().await;
                loop {
                    beat.tick().await;
                    match table.read(&mut conn).await {
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
            table,
            ttl_ms,
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

    /// Send a heartbeat now, besides those of the background beat (what
    /// the benchmarks time).
    pub async fn heartbeat(&self) -> Result<(), ClusterError> {
        let value = value_of(&self.me, &self.load);
        self.table.heartbeat(&mut self.conn.clone(), &self.me.id, &value, self.ttl_ms).await
    }

    /// Read the members from Redis now, as the background refresh does
    /// (without changing the view [`Membership::members`] returns).
    pub async fn read_members(&self) -> Result<Vec<Member>, ClusterError> {
        self.table.read(&mut self.conn.clone()).await
    }

    /// Stop heartbeating and remove this node from the members at once.
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
        self.table.remove(&mut self.conn.clone(), &self.me.id).await
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        // Without `leave`, the node stays a member until its heartbeat
        // runs out.
        for task in [&self.task, &self.viewer] {
            if let Some(task) = task.lock().unwrap_or_else(|e| e.into_inner()).take() {
                task.abort();
            }
        }
    }
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
        // Killed: no leave, no more heartbeats; its time runs out.
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

    #[tokio::test]
    async fn the_reader_removes_members_whose_heartbeat_ran_out_and_leave_removes_at_once() {
        let redis = RedisServer::start();
        let a = Membership::join(config(&redis, 300), Member::new("a", "127.0.0.2:8080")).await.unwrap();
        let b = Membership::join(config(&redis, 300), Member::new("b", "127.0.0.3:8080")).await.unwrap();
        let c = Membership::join(config(&redis, 300), Member::new("c", "127.0.0.4:8080")).await.unwrap();
        assert_eq!(redis.command(&["ZCARD", "shoal:members"]), ":3");
        assert_eq!(redis.command(&["HLEN", "shoal:member-info"]), ":3");
        // Killed: b's entry stays until a reader finds its time ran out.
        drop(b);
        assert!(sees(&a, &["a", "c"]).await, "{a:?}");
        assert_eq!(redis.command(&["ZCARD", "shoal:members"]), ":2");
        assert_eq!(redis.command(&["HLEN", "shoal:member-info"]), ":2");
        // Left: gone at once, before any TTL.
        c.leave().await.unwrap();
        assert_eq!(redis.command(&["ZSCORE", "shoal:members", "c"]), "$-1");
        assert_eq!(redis.command(&["HEXISTS", "shoal:member-info", "c"]), ":0");
        let read: Vec<String> = a.read_members().await.unwrap().into_iter().map(|m| m.id).collect();
        assert_eq!(read, ["a"]);
        // A heartbeat carries the load reported since.
        a.report_load(Load { running: 2, capacity: 8 });
        a.heartbeat().await.unwrap();
        assert_eq!(a.read_members().await.unwrap()[0].load, Load { running: 2, capacity: 8 });
        a.leave().await.unwrap();
        assert_eq!(redis.command(&["ZCARD", "shoal:members"]), ":0");
        assert_eq!(redis.command(&["HLEN", "shoal:member-info"]), ":0");
    }
}
