//! Tenants and deployed functions: kept durably in the embedded store (so a
//! restart keeps every function) and in memory for the call path, which
//! only ever takes a read lock for a map lookup.
//!
//! Tables: `tenants` (name → record), `functions` (`tenant/name` → record),
//! `modules` (wasm SHA-256 → the wasm bytes, shared by every function
//! deployed with them).
//!
//! In a cluster the records live in Redis ([`SharedRegistry`]) and every
//! node mirrors them in memory ([`Registry::mirror`], polled by the
//! node); `modules` stays as the node's local copy of the wasm it has
//! fetched, so reloading an evicted image does not go to Redis.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_cluster::{AliasChange, RegistrySnapshot, SharedRegistry};
use shoal_runtime::{CallSettings, FunctionImage};
use shoal_state::{EmbeddedStore, StoreError, Table};

use crate::activity::CallHistory;
use crate::auth::TokenHash;
use crate::logs::LogRing;

const TENANTS: Table = Table::new("tenants");
const FUNCTIONS: Table = Table::new("functions");
const MODULES: Table = Table::new("modules");
/// `tenant/name` → the function's aliases (JSON).
const ALIASES: Table = Table::new("aliases");
/// The node's own notes: `ready` is written by each readiness check.
const NODE: Table = Table::new("node");

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub name: String,
    /// SHA-256 of the tenant's token, hex.
    pub token_sha256: String,
    pub created_ms: u64,
    /// What the admin set for it (records written before limits existed
    /// have none).
    #[serde(default, skip_serializing_if = "TenantLimitsRecord::is_default")]
    pub limits: TenantLimitsRecord,
    /// Tokens rotated out and still valid until their time runs out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_tokens: Vec<PreviousToken>,
    /// Set when its deletion began: none of its tokens is valid any more,
    /// nothing of it can be deployed or called, and the node removes what
    /// it has (resumed at start if the node stopped half-way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleting_since_ms: Option<u64>,
    /// Its secrets, sealed (see `secrets.rs`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub secrets: std::collections::BTreeMap<String, crate::secrets::SealedSecret>,
}

/// A token rotated out, valid until `valid_until_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousToken {
    pub token_sha256: String,
    pub valid_until_ms: u64,
}

/// A token hash, or None if `hex` is not one (a revoked tenant's record
/// holds an empty string).
fn parse_hash(hex: &str) -> Option<TokenHash> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex, &mut out).ok()?;
    Some(out)
}

/// A tenant's limits as the admin set them; None: the node's default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantLimitsRecord {
    /// Its share of the CPU and of the running places when tenants compete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Root calls running at once while no other tenant waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<u32>,
    /// Sandboxes its calls hold at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandboxes: Option<u32>,
    /// Sum of the memory limits of its running calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Bytes of its values in the local state tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_bytes: Option<u64>,
    /// Bytes of its values in the global tier (durable state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_quota_bytes: Option<u64>,
}

impl TenantLimitsRecord {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl TenantRecord {
    pub fn token_hash(&self) -> Option<TokenHash> {
        parse_hash(&self.token_sha256)
    }

    /// Whether `presented` is one of this tenant's valid tokens at `now_ms`:
    /// its current one, or one rotated out whose grace has not run out.
    /// Every candidate is compared (in constant time), so the time taken
    /// says nothing about which one matched.
    pub fn opens(&self, presented: &TokenHash, now_ms: u64) -> bool {
        if self.deleting_since_ms.is_some() {
            return false;
        }
        let mut valid = self.token_hash().is_some_and(|h| crate::auth::hashes_equal(presented, &h));
        for previous in &self.previous_tokens {
            let matches = parse_hash(&previous.token_sha256).is_some_and(|h| crate::auth::hashes_equal(presented, &h));
            valid |= matches && now_ms < previous.valid_until_ms;
        }
        valid
    }
}

/// What a deploy set, as stored and as described to clients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionRecord {
    pub tenant: String,
    pub name: String,
    pub kind: String,
    /// Calls start from a snapshot taken at deploy (`snapshot=true`, and
    /// every function of a shared language runtime). Records written
    /// before snapshots existed have none.
    #[serde(default)]
    pub snapshot: bool,
    pub sha256: String,
    pub size_bytes: usize,
    pub memory_bytes: u64,
    pub timeout_ms: u64,
    pub env: Vec<(String, String)>,
    pub deployed_ms: u64,
    /// Where its outbound HTTP requests may go (none in records written
    /// before outbound HTTP existed).
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// An HTTP function anyone may call; else only with its tenant's token.
    #[serde(default)]
    pub public: bool,
    /// The tenant's secrets it is given (as env vars and `wasi:config`).
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Its version: 1 for the first deploy of the name, one more for each
    /// deploy after (0 in records written before versions existed).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub version: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Where an alias sends calls: one version, or a split between two by
/// weight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasTarget {
    pub versions: Vec<Route>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub version: u32,
    pub weight: u32,
}

impl AliasTarget {
    /// The version a call goes to: by `bucket` (a hash of the request's
    /// key, for calls that must stick to one version; else random) among
    /// the weights.
    pub fn pick(&self, bucket: u64) -> u32 {
        let total: u64 = self.versions.iter().map(|r| u64::from(r.weight)).sum();
        let mut at = if total == 0 { 0 } else { bucket % total };
        for route in &self.versions {
            if at < u64::from(route.weight) {
                return route.version;
            }
            at -= u64::from(route.weight);
        }
        self.versions.first().map_or(0, |r| r.version)
    }

    pub fn names(&self, version: u32) -> bool {
        self.versions.iter().any(|r| r.version == version)
    }
}

/// A function's aliases, by name.
pub type Aliases = std::collections::BTreeMap<String, AliasTarget>;

/// The alias the unversioned name means.
pub const LATEST: &str = "latest";

/// The most aliases a function has (each may keep a version from being
/// collected: this bounds what a tenant keeps past `max_versions`).
pub const MAX_ALIASES: usize = 16;

impl FunctionRecord {
    /// How the function's binary is loaded (again).
    pub fn load_options(&self) -> shoal_runtime::LoadOptions {
        shoal_runtime::LoadOptions { snapshot: self.snapshot, tenant: Some(std::sync::Arc::from(self.tenant.as_str())) }
    }
}

/// A function ready to call.
#[derive(Debug)]
pub struct DeployedFunction {
    pub record: FunctionRecord,
    pub settings: CallSettings,
    pub logs: Arc<LogRing>,
    /// Its recent calls and rates on this node.
    pub history: Arc<CallHistory>,
    /// `tenant/name`: how the scheduler knows the function.
    pub key: Arc<str>,
    /// The compiled, pre-linked image while loaded; dropped when the node
    /// is over its image budget and this function is the least recently
    /// used idle one (reloaded from the compiled cache on its next call).
    image: Mutex<Option<Arc<FunctionImage>>>,
    /// When it was last called, on the node's use clock.
    last_used: AtomicU64,
}

impl DeployedFunction {
    /// The image, if loaded.
    pub fn loaded(&self) -> Option<Arc<FunctionImage>> {
        self.image.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn set_image(&self, image: Arc<FunctionImage>) {
        *self.image.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(image);
    }

    pub fn touch(&self, now: u64) {
        self.last_used.store(now, Ordering::Relaxed);
    }

    pub fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }

    /// How calls name exactly this version: `name@N` (`name` for a
    /// function deployed before versions, which has none).
    pub fn reference(&self) -> String {
        match self.record.version {
            0 => self.record.name.clone(),
            n => version_name(&self.record.name, n),
        }
    }

    /// Let go of the image (a call using it keeps it until it ends).
    pub fn evict(&self) {
        self.image.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    }

    pub fn new(record: FunctionRecord, image: Arc<FunctionImage>, trail: Trail) -> Self {
        let function = Self::unloaded(record, trail);
        function.set_image(image);
        function
    }

    /// A function known from the shared registry whose image this node
    /// has not loaded yet (it loads on the first call here).
    pub fn unloaded(record: FunctionRecord, trail: Trail) -> Self {
        let settings = CallSettings {
            tenant: Arc::from(record.tenant.as_str()),
            memory_limit: record.memory_bytes,
            timeout: Duration::from_millis(record.timeout_ms),
            env: Arc::from(record.env.clone()),
            // Checked at deploy; a record that no longer parses allows nothing.
            allowed_hosts: Arc::new(shoal_runtime::AllowList::parse(&record.allowed_hosts).unwrap_or_default()),
            config: Default::default(),
            trace: None,
        };
        let key = Arc::from(function_key(&record.tenant, &record.name));
        let Trail { logs, history } = trail;
        Self { record, settings, logs, history, key, image: Mutex::new(None), last_used: AtomicU64::new(0) }
    }
}

/// What a function leaves behind on this node: its recent log lines and
/// calls, which a redeploy keeps.
#[derive(Clone, Debug)]
pub struct Trail {
    pub logs: Arc<LogRing>,
    pub history: Arc<CallHistory>,
}

fn function_key(tenant: &str, name: &str) -> String {
    format!("{tenant}/{name}")
}

/// A version's entry name: `name@N`.
pub fn version_name(name: &str, version: u32) -> String {
    format!("{name}@{version}")
}

/// Stored aliases (`tenant/name` → JSON) by tenant and function; an
/// unreadable entry is skipped (and said so).
fn aliases_by_function(entries: &[(String, Vec<u8>)]) -> HashMap<String, HashMap<String, Arc<Aliases>>> {
    let mut out: HashMap<String, HashMap<String, Arc<Aliases>>> = HashMap::new();
    for (key, bytes) in entries {
        let Some((tenant, name)) = key.split_once('/') else { continue };
        match decode::<Aliases>("aliases", key, bytes) {
            Ok(aliases) if !aliases.is_empty() => {
                out.entry(tenant.to_string()).or_default().insert(name.to_string(), Arc::new(aliases));
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "skipping a function's aliases"),
        }
    }
    out
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("registry records always serialise: plain strings and numbers")
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Io(format!("{what} record {key:?} is unreadable: {e}")))
}

/// Why a registry change failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cluster(#[from] shoal_cluster::ClusterError),
}

pub struct Registry {
    store: Arc<EmbeddedStore>,
    /// The cluster's registry, when this node is one of a cluster.
    shared: Option<SharedRegistry>,
    /// The shared registry's version this node mirrors.
    mirrored: AtomicU64,
    /// The shared registry's epoch this node has mirrored (None before the
    /// first mirror).
    epoch: Mutex<Option<String>>,
    /// Held across a change of the shared registry and its publication
    /// here, and across a mirror's read and apply: a mirror never puts back
    /// a view older than a change this node just made.
    changes: tokio::sync::Mutex<()>,
    tenants: RwLock<HashMap<String, TenantRecord>>,
    /// tenant → name → function: looked up with borrowed strings, so the
    /// call path allocates nothing to find a function.
    /// Versions are entries too, named `name@N`; the newest is the same
    /// function as the name's own entry.
    functions: RwLock<HashMap<String, HashMap<String, Arc<DeployedFunction>>>>,
    /// tenant → function name → its aliases (only functions that have any).
    aliases: RwLock<HashMap<String, HashMap<String, Arc<Aliases>>>>,
    /// Binaries (SHA-256, hex) the last function using them left: their
    /// compiled code on disk goes next ([`Registry::take_orphaned`]).
    orphaned: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// Whether the store takes a durable write now (a readiness check).
    pub(crate) async fn store_writable(&self) -> Result<(), RegistryError> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let stamp = now.as_millis().to_le_bytes();
        self.on_store(move |store| store.put(NODE, "ready", &stamp)).await
    }

    /// Panic while holding the locks every request takes (tenants, to
    /// authenticate; functions, to find what it calls).
    #[cfg(feature = "fault-injection")]
    pub(crate) fn panic_holding_locks(&self) -> std::convert::Infallible {
        let _tenants = self.tenants.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _functions = self.functions.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        panic!("fault injected: a panic holding the registry's locks");
    }

    /// Open the registry and read the tenants; functions are loaded by the
    /// node with [`Registry::stored_functions`] and [`Registry::insert_known`].
    /// With `shared`, tenants and functions come from the cluster (by
    /// [`Registry::mirror`]), not the local store.
    pub fn open(store: Arc<EmbeddedStore>, shared: Option<SharedRegistry>) -> Result<Self, StoreError> {
        let mut tenants = HashMap::new();
        let mut aliases = Vec::new();
        if shared.is_none() {
            for (key, bytes) in store.scan_prefix(TENANTS, "")? {
                let record: TenantRecord = decode("tenant", &key, &bytes)?;
                tenants.insert(record.name.clone(), record);
            }
            aliases = store.scan_prefix(ALIASES, "")?;
        }
        Ok(Self {
            store,
            shared,
            mirrored: AtomicU64::new(0),
            epoch: Mutex::new(None),
            changes: tokio::sync::Mutex::new(()),
            tenants: RwLock::new(tenants),
            functions: RwLock::new(HashMap::new()),
            aliases: RwLock::new(aliases_by_function(&aliases)),
            orphaned: Mutex::new(Vec::new()),
        })
    }

    /// Bring the in-memory view in line with the cluster's registry if it
    /// changed since the last time (or always, with `force`). Functions
    /// new or changed here arrive unloaded; those gone are dropped. Returns
    /// whether anything was read.
    pub async fn mirror(&self, force: bool, log_lines: usize) -> Result<bool, RegistryError> {
        let Some(shared) = &self.shared else { return Ok(false) };
        let _changes = self.changes.lock().await;
        let (version, epoch) = shared.version().await?;
        let mirrored = self.mirrored.load(Ordering::Acquire);
        let known = self.epoch.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if epoch.is_none() || epoch != known || version < mirrored {
            // Redis lost the registry (restarted empty, or from an older
            // snapshot; another node may have started it afresh): put back
            // what this node knows rather than forget every function.
            if known.is_some() {
                self.republish(shared).await?;
            }
            *self.epoch.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(shared.epoch().await?);
        } else if !force && version == mirrored {
            return Ok(false);
        }
        let RegistrySnapshot { version, tenants, functions, aliases } = shared.snapshot().await?;
        let tenants: HashMap<String, TenantRecord> = tenants
            .iter()
            .filter_map(|(name, bytes)| decode::<TenantRecord>("tenant", name, bytes).ok())
            .map(|record| (record.name.clone(), record))
            .collect();
        // (entry name, record): `name` for a function, `name@N` for its versions.
        let mut records: Vec<(String, FunctionRecord)> = functions
            .iter()
            .filter_map(|(key, bytes)| match decode::<FunctionRecord>("function", key, bytes) {
                Ok(record) => {
                    let entry = key.split_once('/').map_or(record.name.as_str(), |(_, entry)| entry).to_string();
                    Some((entry, record))
                }
                Err(e) => {
                    tracing::error!(error = %e, "skipping a function record of the cluster's registry");
                    None
                }
            })
            .collect();
        // Versions first, so a function's own entry shares its newest version's.
        records.sort_by_key(|(entry, _)| !entry.contains('@'));
        *self.tenants.write().unwrap_or_else(std::sync::PoisonError::into_inner) = tenants;
        let mut next: HashMap<String, HashMap<String, Arc<DeployedFunction>>> = HashMap::new();
        for (entry, record) in records {
            let same_version = (record.version > 0)
                .then(|| next.get(&record.tenant)?.get(&version_name(&record.name, record.version)).cloned())
                .flatten()
                .filter(|f| f.record == record);
            let function = match same_version.or_else(|| self.get(&record.tenant, &entry)) {
                Some(current) if current.record == record => current,
                _ => {
                    let trail = self.trail_for(&record.tenant, &record.name, log_lines);
                    Arc::new(DeployedFunction::unloaded(record, trail))
                }
            };
            next.entry(function.record.tenant.clone()).or_default().insert(entry, function.clone());
        }
        *self.aliases.write().unwrap_or_else(std::sync::PoisonError::into_inner) = aliases_by_function(&aliases);
        let before: std::collections::HashSet<String> = self.all().iter().map(|f| f.record.sha256.clone()).collect();
        let after: std::collections::HashSet<&str> =
            next.values().flat_map(HashMap::values).map(|f| f.record.sha256.as_str()).collect();
        let gone: Vec<String> = before.into_iter().filter(|sha| !after.contains(sha.as_str())).collect();
        *self.functions.write().unwrap_or_else(std::sync::PoisonError::into_inner) = next;
        self.mirrored.store(version, Ordering::Release);
        // The node's own copies of binaries no function uses any more.
        for sha in gone {
            let key = sha.clone();
            self.on_store(move |store| store.delete(MODULES, &key)).await?;
            self.orphan(sha);
        }
        Ok(true)
    }

    /// Whether `presented` is one of `tenant`'s valid tokens now.
    pub fn opens(&self, tenant: &str, presented: &TokenHash) -> bool {
        let tenants = self.tenants.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(record) = tenants.get(tenant) else { return false };
        // The clock is read only when a rotated-out token may still count.
        let now = if record.previous_tokens.is_empty() { 0 } else { crate::now_ms() };
        record.opens(presented, now)
    }

    /// Whether `presented` is `tenant`'s current token (not one rotated out).
    pub fn is_current_token(&self, tenant: &str, presented: &TokenHash) -> bool {
        let tenants = self.tenants.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        tenants.get(tenant).and_then(TenantRecord::token_hash).is_some_and(|h| crate::auth::hashes_equal(presented, &h))
    }

    /// Whether the tenant exists (even while being deleted).
    pub fn tenant_exists(&self, tenant: &str) -> bool {
        self.tenants.read().unwrap_or_else(std::sync::PoisonError::into_inner).contains_key(tenant)
    }

    /// Whether the tenant exists and is not being deleted.
    pub fn tenant_active(&self, tenant: &str) -> bool {
        self.tenant(tenant).is_some_and(|record| record.deleting_since_ms.is_none())
    }

    /// The tenant's record, if it exists.
    pub fn tenant(&self, tenant: &str) -> Option<TenantRecord> {
        self.tenants.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(tenant).cloned()
    }

    /// Tenants whose deletion began and has not ended.
    pub fn tenants_being_deleted(&self) -> Vec<String> {
        let tenants = self.tenants.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        tenants.values().filter(|t| t.deleting_since_ms.is_some()).map(|t| t.name.clone()).collect()
    }

    /// Store work on a blocking thread: a durable commit waits for the
    /// disk, which must hold up neither an async thread (and the requests
    /// it serves) nor a lock that calls take.
    async fn on_store<R: Send + 'static>(
        &self,
        work: impl FnOnce(&EmbeddedStore) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, RegistryError> {
        let store = self.store.clone();
        let done = tokio::task::spawn_blocking(move || work(&store)).await;
        Ok(done.map_err(|e| StoreError::Io(format!("the store task failed: {e}")))??)
    }

    pub fn tenant_names(&self) -> Vec<String> {
        self.tenants.read().unwrap_or_else(std::sync::PoisonError::into_inner).keys().cloned().collect()
    }

    pub fn n_tenants(&self) -> usize {
        self.tenants.read().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    async fn republish(&self, shared: &SharedRegistry) -> Result<(), RegistryError> {
        let tenants: Vec<(String, Vec<u8>)> = self
            .tenants
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .map(|t| (t.name.clone(), encode(t)))
            .collect();
        let mut functions = Vec::new();
        let mut missing = 0;
        for (key, function) in self.entries() {
            match self.store.get(MODULES, &function.record.sha256)? {
                Some(wasm) => functions.push((key, function, wasm)),
                None => missing += 1,
            }
        }
        let tenants: Vec<(&str, Vec<u8>)> = tenants.iter().map(|(n, r)| (n.as_str(), r.clone())).collect();
        let republished: Vec<shoal_cluster::Republished<'_>> = functions
            .iter()
            .map(|(key, f, wasm)| shoal_cluster::Republished {
                key,
                sha256: &f.record.sha256,
                record: encode(&f.record),
                wasm: wasm.clone(),
            })
            .collect();
        let aliases: Vec<(String, Vec<u8>)> = {
            let aliases = self.aliases.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            aliases
                .iter()
                .flat_map(|(tenant, by_name)| {
                    by_name.iter().map(move |(name, a)| (function_key(tenant, name), encode(a.as_ref())))
                })
                .collect()
        };
        shared.republish(&tenants, &republished, &aliases).await?;
        tracing::warn!(
            n_tenants = tenants.len(),
            n_functions = republished.len(),
            n_without_wasm_here = missing,
            "the cluster's registry went back in time (Redis lost data); put back what this node knows"
        );
        Ok(())
    }

    /// Store a new tenant; false if it exists already.
    pub async fn create_tenant(&self, record: TenantRecord) -> Result<bool, RegistryError> {
        if let Some(shared) = &self.shared {
            let _changes = self.changes.lock().await;
            let created = shared.put_tenant(&record.name, &encode(&record)).await?;
            if created {
                self.tenants
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(record.name.clone(), record);
            }
            return Ok(created);
        }
        // Changes one at a time: nothing is created between the check and
        // the insert.
        let _changes = self.changes.lock().await;
        if self.tenants.read().unwrap_or_else(std::sync::PoisonError::into_inner).contains_key(&record.name) {
            return Ok(false);
        }
        let (name, encoded) = (record.name.clone(), encode(&record));
        self.on_store(move |store| store.put(TENANTS, &name, &encoded)).await?;
        self.tenants.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(record.name.clone(), record);
        Ok(true)
    }

    /// Replace `tenant`'s limits; false if there is no such tenant.
    pub async fn set_tenant_limits(&self, tenant: &str, limits: TenantLimitsRecord) -> Result<bool, RegistryError> {
        Ok(self.update_tenant(tenant, |record| record.limits = limits).await?.is_some())
    }

    /// Change `tenant`'s record with `change` and keep it (durably, or in
    /// the cluster's registry); returns what `change` returned, or None if
    /// there is no such tenant.
    pub async fn update_tenant<T>(
        &self,
        tenant: &str,
        change: impl FnOnce(&mut TenantRecord) -> T,
    ) -> Result<Option<T>, RegistryError> {
        let _changes = self.changes.lock().await;
        let Some(mut record) = self.tenant(tenant) else { return Ok(None) };
        let out = change(&mut record);
        if let Some(shared) = &self.shared {
            shared.update_tenant(tenant, &encode(&record)).await?;
        } else {
            let (name, encoded) = (tenant.to_string(), encode(&record));
            self.on_store(move |store| store.put(TENANTS, &name, &encoded)).await?;
        }
        self.tenants.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(tenant.to_string(), record);
        Ok(Some(out))
    }

    /// Forget the tenant's record (its functions must be gone already);
    /// false if there was none.
    pub async fn remove_tenant(&self, tenant: &str) -> Result<bool, RegistryError> {
        let _changes = self.changes.lock().await;
        let removed = if let Some(shared) = &self.shared {
            shared.remove_tenant(tenant).await?
        } else {
            let name = tenant.to_string();
            self.on_store(move |store| store.delete(TENANTS, &name)).await?
        };
        self.tenants.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(tenant);
        self.functions.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(tenant);
        self.aliases.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(tenant);
        Ok(removed)
    }

    /// `tenant`'s limits, if it exists.
    pub fn tenant_limits(&self, tenant: &str) -> Option<TenantLimitsRecord> {
        self.tenants
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(tenant)
            .map(|record| record.limits.clone())
    }

    /// Every tenant's limits.
    pub fn all_tenant_limits(&self) -> Vec<(String, TenantLimitsRecord)> {
        self.tenants
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .map(|record| (record.name.clone(), record.limits.clone()))
            .collect()
    }

    /// Every stored function (its own entry, the newest version), made
    /// known at start; each loads on its first call, as its versions do
    /// ([`Registry::insert_versions`]). A function stored before versions
    /// existed becomes version 1 here, once.
    pub fn stored_functions(&self) -> Result<Vec<FunctionRecord>, StoreError> {
        let mut out = Vec::new();
        for (key, bytes) in self.store.scan_prefix(FUNCTIONS, "")? {
            if key.contains('@') {
                continue;
            }
            let mut record: FunctionRecord = decode("function", &key, &bytes)?;
            if record.version == 0 {
                record.version = 1;
                let encoded = encode(&record);
                self.store.put_all(&[(FUNCTIONS, &key, &encoded), (FUNCTIONS, &format!("{key}@1"), &encoded)])?;
            }
            out.push(record);
        }
        Ok(out)
    }

    /// Make every stored version known, unloaded (each loads on its first
    /// call); after the functions, so the newest version is the function's
    /// own entry.
    pub fn insert_versions(&self, log_lines: usize) -> Result<usize, StoreError> {
        let mut n = 0;
        for (key, bytes) in self.store.scan_prefix(FUNCTIONS, "")? {
            let Some((_, entry)) = key.split_once('/').filter(|(_, entry)| entry.contains('@')) else { continue };
            let record: FunctionRecord = decode("function", &key, &bytes)?;
            // A version of a function that could not be read is not callable either.
            let Some(head) = self.get(&record.tenant, &record.name) else {
                tracing::error!(function = %key, "a version of a function that is not known; skipping it");
                continue;
            };
            let own = Some(head).filter(|f| f.record == record);
            let function = match own {
                Some(own) => own,
                None => {
                    let trail = self.trail_for(&record.tenant, &record.name, log_lines);
                    Arc::new(DeployedFunction::unloaded(record, trail))
                }
            };
            let mut functions = self.functions.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            functions.entry(function.record.tenant.clone()).or_default().insert(entry.to_string(), function);
            n += 1;
        }
        Ok(n)
    }

    /// A function's entry: `name` (the function's newest version) or
    /// `name@N` (version N).
    pub fn get(&self, tenant: &str, name: &str) -> Option<Arc<DeployedFunction>> {
        self.functions.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(tenant)?.get(name).cloned()
    }

    /// What `reference` names: `name` (the version the alias `latest`
    /// routes to if it is set, else the newest), `name@N` (version N) or
    /// `name@alias`. A split alias picks by `bucket` (a hash of the
    /// request's key, or a random number).
    pub fn resolve(
        &self,
        tenant: &str,
        reference: &str,
        bucket: impl FnOnce() -> u64,
    ) -> Option<Arc<DeployedFunction>> {
        let (name, at) = match reference.split_once('@') {
            Some((name, at)) => (name, Some(at)),
            None => (reference, None),
        };
        let alias = match at {
            Some(at) if at.bytes().all(|b| b.is_ascii_digit()) => return self.get(tenant, reference),
            Some(alias) => alias,
            None => LATEST,
        };
        // `name@latest` is the bare name.
        let at = at.filter(|a| *a != LATEST);
        let target = {
            let aliases = self.aliases.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            aliases.get(tenant).and_then(|by_name| by_name.get(name)).and_then(|a| a.get(alias).cloned())
        };
        match target {
            Some(target) => self.get(tenant, &version_name(name, target.pick(bucket()))),
            None if at.is_none() => self.get(tenant, name),
            None => None,
        }
    }

    /// The versions of `tenant/name` kept, newest first.
    pub fn versions_of(&self, tenant: &str, name: &str) -> Vec<FunctionRecord> {
        let prefix = format!("{name}@");
        let functions = self.functions.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut versions: Vec<FunctionRecord> = functions
            .get(tenant)
            .into_iter()
            .flat_map(|by_name| by_name.iter())
            .filter(|(entry, _)| entry.starts_with(&prefix))
            .map(|(_, f)| f.record.clone())
            .collect();
        versions.sort_by_key(|r| std::cmp::Reverse(r.version));
        versions
    }

    /// The aliases of `tenant/name`.
    pub fn aliases_of(&self, tenant: &str, name: &str) -> Arc<Aliases> {
        let aliases = self.aliases.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        aliases.get(tenant).and_then(|by_name| by_name.get(name)).cloned().unwrap_or_default()
    }

    fn publish_aliases(&self, tenant: &str, name: &str, aliases: Aliases) {
        let mut all = self.aliases.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if aliases.is_empty() {
            if let Some(by_name) = all.get_mut(tenant) {
                by_name.remove(name);
            }
        } else {
            all.entry(tenant.to_string()).or_default().insert(name.to_string(), Arc::new(aliases));
        }
    }

    /// Set (`target`) or remove (None) an alias of `tenant/name`; the
    /// versions it names must exist.
    pub async fn set_alias(
        &self,
        tenant: &str,
        name: &str,
        alias: &str,
        target: Option<AliasTarget>,
    ) -> Result<AliasChange, RegistryError> {
        let key = function_key(tenant, name);
        let _changes = self.changes.lock().await;
        let versions: Vec<u32> =
            target.as_ref().map(|t| t.versions.iter().map(|r| r.version).collect()).unwrap_or_default();
        if let Some(shared) = &self.shared {
            let encoded = target.as_ref().map(encode);
            let change = shared.set_alias(&key, alias, encoded.as_deref(), &versions, MAX_ALIASES).await?;
            if change == AliasChange::Done {
                let mut aliases = (*self.aliases_of(tenant, name)).clone();
                match target {
                    Some(target) => aliases.insert(alias.to_string(), target),
                    None => aliases.remove(alias),
                };
                self.publish_aliases(tenant, name, aliases);
            }
            return Ok(change);
        }
        if let Some(missing) = versions.iter().find(|v| self.get(tenant, &version_name(name, **v)).is_none()) {
            return Ok(AliasChange::NoSuchVersion(*missing));
        }
        let mut aliases = (*self.aliases_of(tenant, name)).clone();
        if target.is_some() && !aliases.contains_key(alias) && aliases.len() >= MAX_ALIASES {
            return Ok(AliasChange::TooMany);
        }
        let changed = match target {
            Some(target) => {
                aliases.insert(alias.to_string(), target);
                true
            }
            None => aliases.remove(alias).is_some(),
        };
        if !changed {
            return Ok(AliasChange::NoSuchAlias);
        }
        let stored = (key, (!aliases.is_empty()).then(|| encode(&aliases)));
        self.on_store(move |store| match &stored.1 {
            Some(encoded) => store.put(ALIASES, &stored.0, encoded),
            None => store.delete(ALIASES, &stored.0).map(drop),
        })
        .await?;
        self.publish_aliases(tenant, name, aliases);
        Ok(AliasChange::Done)
    }

    /// The wasm stored under `sha256` (hex): the local copy, else (in a
    /// cluster) the shared one, then kept locally.
    pub async fn module(&self, sha256: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        if let Some(wasm) = self.store.get(MODULES, sha256)? {
            return Ok(Some(wasm));
        }
        let Some(shared) = &self.shared else { return Ok(None) };
        let Some(wasm) = shared.wasm(sha256).await? else { return Ok(None) };
        let (sha, kept) = (sha256.to_string(), wasm.clone());
        self.on_store(move |store| store.put(MODULES, &sha, &kept)).await?;
        Ok(Some(wasm))
    }

    /// Every function and kept version deployed now, each once.
    pub fn all(&self) -> Vec<Arc<DeployedFunction>> {
        let functions = self.functions.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut seen = std::collections::HashSet::new();
        functions
            .values()
            .flat_map(|by_name| by_name.values())
            .filter(|f| seen.insert(Arc::as_ptr(f)))
            .cloned()
            .collect()
    }

    /// Every entry (`tenant/name` and `tenant/name@N`) with its function.
    fn entries(&self) -> Vec<(String, Arc<DeployedFunction>)> {
        let functions = self.functions.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        functions
            .iter()
            .flat_map(|(tenant, by_name)| {
                by_name.iter().map(move |(entry, f)| (function_key(tenant, entry), f.clone()))
            })
            .collect()
    }

    /// `tenant`'s functions (their newest versions), by name.
    pub fn list(&self, tenant: &str) -> Vec<FunctionRecord> {
        let functions = self.functions.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut records: Vec<FunctionRecord> = functions
            .get(tenant)
            .into_iter()
            .flat_map(|by_name| by_name.iter())
            .filter(|(entry, _)| !entry.contains('@'))
            .map(|(_, f)| f.record.clone())
            .collect();
        records.sort_by(|a, b| a.name.cmp(&b.name));
        records
    }

    /// Functions `tenant` has deployed (not counting their versions).
    pub fn n_functions_of(&self, tenant: &str) -> usize {
        let functions = self.functions.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        functions.get(tenant).map_or(0, |by_name| by_name.keys().filter(|e| !e.contains('@')).count())
    }

    pub fn n_functions(&self) -> usize {
        let functions = self.functions.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        functions.values().map(|by_name| by_name.keys().filter(|e| !e.contains('@')).count()).sum()
    }

    /// Make `function` the function's own entry and, when it has a
    /// version, that version's.
    fn publish(&self, function: Arc<DeployedFunction>) {
        let record = &function.record;
        let replaced = {
            let mut functions = self.functions.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            let by_name = functions.entry(record.tenant.clone()).or_default();
            if record.version > 0 {
                by_name.insert(version_name(&record.name, record.version), function.clone());
            }
            by_name.insert(record.name.clone(), function.clone())
        };
        // The function it replaces (and perhaps its image, code and all) is
        // dropped here, with the lock calls read released.
        drop(replaced);
    }

    /// The log ring and call history a (re)deployed function should use:
    /// its predecessor's, so a redeploy keeps recent logs and calls.
    pub fn trail_for(&self, tenant: &str, name: &str, log_lines: usize) -> Trail {
        match self.get(tenant, name) {
            Some(previous) => Trail { logs: previous.logs.clone(), history: previous.history.clone() },
            None => Trail { logs: Arc::new(LogRing::new(log_lines)), history: Arc::default() },
        }
    }

    /// Persist a deploy as the function's next version (wasm, record and
    /// version in one durable transaction; in a cluster one script), make
    /// it visible to calls, drop a `latest` alias, and collect versions
    /// past the newest `keep` that no alias routes to.
    pub async fn deploy(
        &self,
        mut function: DeployedFunction,
        wasm: &[u8],
        keep: usize,
    ) -> Result<Arc<DeployedFunction>, RegistryError> {
        let (tenant, name) = (function.record.tenant.clone(), function.record.name.clone());
        let key = function_key(&tenant, &name);
        let _changes = self.changes.lock().await;
        let previous = self.get(&tenant, &name);
        // A function deployed before versions existed is version 1.
        let unversioned = previous.filter(|p| p.record.version == 0);
        let floor =
            self.versions_of(&tenant, &name).first().map_or(0, |r| r.version).max(u32::from(unversioned.is_some()));
        let version = match &self.shared {
            Some(shared) => shared.next_version(&key, floor).await?,
            None => floor + 1,
        };
        function.record.version = version;
        let record = &function.record;
        let encoded = encode(record);
        let first = unversioned.map(|old| FunctionRecord { version: 1, ..old.record.clone() });
        // Whether this version is the function's now (in a cluster, a
        // deploy that took a later number may have written first).
        let mut newest = true;
        if let Some(shared) = &self.shared {
            if let Some(first) = &first
                && let Some(old_wasm) = self.module(&first.sha256).await?
            {
                shared.put_version(&key, 1, &first.sha256, &encode(first), &old_wasm, true).await?;
            }
            newest = shared.put_version(&key, version, &record.sha256, &encoded, wasm, false).await?;
        }
        let (sha, wasm, local_record) = (record.sha256.clone(), wasm.to_vec(), self.shared.is_none());
        let versioned = format!("{key}@{version}");
        let first_stored = first.as_ref().map(|first| (format!("{key}@1"), encode(first)));
        let drop_latest = self.aliases_of(&tenant, &name).contains_key(LATEST);
        let mut aliases = (*self.aliases_of(&tenant, &name)).clone();
        aliases.remove(LATEST);
        let stored_aliases = (!aliases.is_empty()).then(|| encode(&aliases));
        let alias_key = key.clone();
        self.on_store(move |store| {
            let have_wasm = store.get(MODULES, &sha)?.is_some();
            if !local_record {
                // In a cluster the records live in Redis; keep the wasm.
                return if have_wasm { Ok(()) } else { store.put(MODULES, &sha, &wasm) };
            }
            store.transaction(|tx| {
                if !have_wasm {
                    tx.put(MODULES, &sha, &wasm)?;
                }
                if let Some((first_key, first)) = &first_stored {
                    tx.put(FUNCTIONS, first_key, first)?;
                }
                tx.put(FUNCTIONS, &versioned, &encoded)?;
                tx.put(FUNCTIONS, &key, &encoded)?;
                if drop_latest {
                    match &stored_aliases {
                        Some(aliases) => tx.put(ALIASES, &alias_key, aliases)?,
                        None => {
                            tx.delete(ALIASES, &alias_key)?;
                        }
                    }
                }
                Ok(())
            })
        })
        .await?;
        if let Some(first) = first {
            let trail = self.trail_for(&tenant, &name, 0);
            let first = Arc::new(DeployedFunction::unloaded(first, trail));
            self.functions
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(tenant.clone())
                .or_default()
                .insert(version_name(&name, 1), first);
        }
        if drop_latest {
            self.publish_aliases(&tenant, &name, aliases);
        }
        let function = Arc::new(function);
        if newest {
            self.publish(function.clone());
        } else {
            let mut functions = self.functions.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            functions.entry(tenant.clone()).or_default().insert(version_name(&name, version), function.clone());
        }
        // Stored and callable: a collection that fails now is tried again
        // at the next deploy, and does not fail this one.
        if let Err(e) = self.collect_versions(&tenant, &name, keep).await {
            tracing::warn!(%tenant, function = %name, error = %e, "collecting old versions failed");
        }
        Ok(function)
    }

    /// Remove versions of `tenant/name` past the newest `keep` that no
    /// alias routes to (caller holds `changes`).
    async fn collect_versions(&self, tenant: &str, name: &str, keep: usize) -> Result<(), RegistryError> {
        let aliases = self.aliases_of(tenant, name);
        let old: Vec<u32> = self
            .versions_of(tenant, name)
            .iter()
            .skip(keep.max(1))
            .map(|r| r.version)
            .filter(|v| !aliases.values().any(|a| a.names(*v)))
            .collect();
        let key = function_key(tenant, name);
        for version in old {
            if let Some(shared) = &self.shared {
                if shared.remove_version(&key, version).await? != shoal_cluster::VersionRemoval::Removed {
                    continue;
                }
            } else {
                let stored = format!("{key}@{version}");
                self.on_store(move |store| store.delete(FUNCTIONS, &stored)).await?;
            }
            self.forget_entry(tenant, &version_name(name, version)).await?;
        }
        Ok(())
    }

    /// Drop an entry from memory; the node's copy of its wasm goes with
    /// the last entry using it.
    async fn forget_entry(&self, tenant: &str, entry: &str) -> Result<(), RegistryError> {
        let (gone, still_used) = {
            let mut functions = self.functions.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            let gone = functions.get_mut(tenant).and_then(|by_name| by_name.remove(entry));
            let still_used = gone.as_ref().is_some_and(|g| {
                functions.values().flat_map(HashMap::values).any(|f| f.record.sha256 == g.record.sha256)
            });
            (gone, still_used)
        };
        if let Some(gone) = gone
            && !still_used
        {
            let sha = gone.record.sha256.clone();
            drop(gone);
            let key = sha.clone();
            self.on_store(move |store| store.delete(MODULES, &key)).await?;
            self.orphan(sha);
        }
        Ok(())
    }

    fn orphan(&self, sha256: String) {
        self.orphaned.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(sha256);
    }

    /// Binaries the last function using them left since the last time
    /// (each to be checked again: a deploy may have brought one back).
    pub fn take_orphaned(&self) -> Vec<String> {
        std::mem::take(&mut *self.orphaned.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Whether any function deployed now runs the binary `sha256` (hex).
    pub fn uses(&self, sha256: &str) -> bool {
        let functions = self.functions.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        functions.values().flat_map(HashMap::values).any(|f| f.record.sha256 == sha256)
    }

    /// Make a function read from the store at start visible to calls.
    pub fn insert_known(&self, function: DeployedFunction) {
        self.publish(Arc::new(function));
    }

    /// Remove a function with its versions and aliases; each wasm goes
    /// too when no other function uses it.
    pub async fn remove(&self, tenant: &str, name: &str) -> Result<bool, RegistryError> {
        let _changes = self.changes.lock().await;
        let versions: Vec<u32> = self.versions_of(tenant, name).iter().map(|r| r.version).collect();
        let key = function_key(tenant, name);
        let removed = match &self.shared {
            // Whatever the cluster holds under the name now, even if this
            // node has not mirrored it yet.
            Some(shared) => shared.remove_function(&key, &versions).await?,
            None => {
                if self.get(tenant, name).is_none() && versions.is_empty() {
                    return Ok(false);
                }
                let stored: Vec<String> =
                    std::iter::once(key.clone()).chain(versions.iter().map(|v| format!("{key}@{v}"))).collect();
                self.on_store(move |store| {
                    store.transaction(|tx| {
                        for entry in &stored {
                            tx.delete(FUNCTIONS, entry)?;
                        }
                        tx.delete(ALIASES, &key)?;
                        Ok(())
                    })
                })
                .await?;
                true
            }
        };
        self.publish_aliases(tenant, name, Aliases::new());
        for version in versions {
            self.forget_entry(tenant, &version_name(name, version)).await?;
        }
        self.forget_entry(tenant, name).await?;
        Ok(removed)
    }
}
