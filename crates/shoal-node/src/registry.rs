//! Tenants and deployed functions: kept durably in the embedded store (so a
//! restart keeps every function) and in memory for the call path, which
//! only ever takes a read lock for a map lookup.
//!
//! Tables: `tenants` (name → record), `functions` (`tenant/name` → record),
//! `modules` (wasm SHA-256 → the wasm bytes, shared by every function
//! deployed with them).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_runtime::{CallSettings, FunctionImage};
use shoal_state::{EmbeddedStore, StoreError, Table};

use crate::auth::TokenHash;
use crate::logs::LogRing;

const TENANTS: Table = Table::new("tenants");
const FUNCTIONS: Table = Table::new("functions");
const MODULES: Table = Table::new("modules");

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TenantRecord {
    pub name: String,
    /// SHA-256 of the tenant's token, hex.
    pub token_sha256: String,
    pub created_ms: u64,
}

impl TenantRecord {
    pub fn token_hash(&self) -> Option<TokenHash> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(&self.token_sha256, &mut out).ok()?;
        Some(out)
    }
}

/// What a deploy set, as stored and as described to clients.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FunctionRecord {
    pub tenant: String,
    pub name: String,
    pub kind: String,
    pub sha256: String,
    pub size_bytes: usize,
    pub memory_bytes: u64,
    pub timeout_ms: u64,
    pub env: Vec<(String, String)>,
    pub deployed_ms: u64,
}

/// A function ready to call.
#[derive(Debug)]
pub struct DeployedFunction {
    pub record: FunctionRecord,
    pub settings: CallSettings,
    pub logs: Arc<LogRing>,
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
        self.image.lock().expect(POISON).clone()
    }

    pub fn set_image(&self, image: Arc<FunctionImage>) {
        *self.image.lock().expect(POISON) = Some(image);
    }

    pub fn touch(&self, now: u64) {
        self.last_used.store(now, Ordering::Relaxed);
    }

    pub fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }

    /// Let go of the image (a call using it keeps it until it ends).
    pub fn evict(&self) {
        self.image.lock().expect(POISON).take();
    }

    pub fn new(record: FunctionRecord, image: Arc<FunctionImage>, logs: Arc<LogRing>) -> Self {
        let settings = CallSettings {
            tenant: Arc::from(record.tenant.as_str()),
            memory_limit: record.memory_bytes,
            timeout: Duration::from_millis(record.timeout_ms),
            env: Arc::from(record.env.clone()),
        };
        let key = Arc::from(function_key(&record.tenant, &record.name));
        Self { record, settings, logs, key, image: Mutex::new(Some(image)), last_used: AtomicU64::new(0) }
    }
}

fn function_key(tenant: &str, name: &str) -> String {
    format!("{tenant}/{name}")
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("registry records always serialise: plain strings and numbers")
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Io(format!("{what} record {key:?} is unreadable: {e}")))
}

pub struct Registry {
    store: Arc<EmbeddedStore>,
    tenants: RwLock<HashMap<String, TenantRecord>>,
    /// tenant → name → function: looked up with borrowed strings, so the
    /// call path allocates nothing to find a function.
    functions: RwLock<HashMap<String, HashMap<String, Arc<DeployedFunction>>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

const POISON: &str = "registry locks are never poisoned: nothing panics while holding them";

impl Registry {
    /// Open the registry and read the tenants; functions are loaded by the
    /// node with [`Registry::stored_functions`] and [`Registry::insert_loaded`].
    pub fn open(store: Arc<EmbeddedStore>) -> Result<Self, StoreError> {
        let mut tenants = HashMap::new();
        for (key, bytes) in store.scan_prefix(TENANTS, "")? {
            let record: TenantRecord = decode("tenant", &key, &bytes)?;
            tenants.insert(record.name.clone(), record);
        }
        Ok(Self { store, tenants: RwLock::new(tenants), functions: RwLock::new(HashMap::new()) })
    }

    pub fn tenant_hash(&self, tenant: &str) -> Option<TokenHash> {
        self.tenants.read().expect(POISON).get(tenant).and_then(TenantRecord::token_hash)
    }

    pub fn tenant_exists(&self, tenant: &str) -> bool {
        self.tenants.read().expect(POISON).contains_key(tenant)
    }

    pub fn n_tenants(&self) -> usize {
        self.tenants.read().expect(POISON).len()
    }

    /// Store a new tenant; false if it exists already.
    pub fn create_tenant(&self, record: TenantRecord) -> Result<bool, StoreError> {
        let mut tenants = self.tenants.write().expect(POISON);
        if tenants.contains_key(&record.name) {
            return Ok(false);
        }
        self.store.put(TENANTS, &record.name, &encode(&record))?;
        tenants.insert(record.name.clone(), record);
        Ok(true)
    }

    /// Every stored function with its wasm, for loading at start.
    pub fn stored_functions(&self) -> Result<Vec<(FunctionRecord, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for (key, bytes) in self.store.scan_prefix(FUNCTIONS, "")? {
            let record: FunctionRecord = decode("function", &key, &bytes)?;
            let Some(wasm) = self.store.get(MODULES, &record.sha256)? else {
                tracing::error!(function = %key, sha256 = %record.sha256, "stored function has no wasm; skipping it");
                continue;
            };
            out.push((record, wasm));
        }
        Ok(out)
    }

    pub fn get(&self, tenant: &str, name: &str) -> Option<Arc<DeployedFunction>> {
        self.functions.read().expect(POISON).get(tenant)?.get(name).cloned()
    }

    /// The wasm stored under `sha256` (hex).
    pub fn module(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.get(MODULES, sha256)
    }

    /// Every function deployed now.
    pub fn all(&self) -> Vec<Arc<DeployedFunction>> {
        self.functions.read().expect(POISON).values().flat_map(|by_name| by_name.values().cloned()).collect()
    }

    pub fn list(&self, tenant: &str) -> Vec<FunctionRecord> {
        let functions = self.functions.read().expect(POISON);
        let mut records: Vec<FunctionRecord> =
            functions.get(tenant).into_iter().flat_map(|by_name| by_name.values()).map(|f| f.record.clone()).collect();
        records.sort_by(|a, b| a.name.cmp(&b.name));
        records
    }

    pub fn n_functions(&self) -> usize {
        self.functions.read().expect(POISON).values().map(HashMap::len).sum()
    }

    fn publish(&self, function: Arc<DeployedFunction>) {
        let record = &function.record;
        let mut functions = self.functions.write().expect(POISON);
        functions.entry(record.tenant.clone()).or_default().insert(record.name.clone(), function);
    }

    /// The log ring a (re)deployed function should use: its predecessor's,
    /// so a redeploy keeps recent logs.
    pub fn logs_for(&self, tenant: &str, name: &str, capacity: usize) -> Arc<LogRing> {
        match self.get(tenant, name) {
            Some(previous) => previous.logs.clone(),
            None => Arc::new(LogRing::new(capacity)),
        }
    }

    /// Persist a deploy (wasm and record in one durable transaction), then
    /// make it visible to calls.
    pub fn deploy(&self, function: DeployedFunction, wasm: &[u8]) -> Result<Arc<DeployedFunction>, StoreError> {
        let record = &function.record;
        let key = function_key(&record.tenant, &record.name);
        let encoded = encode(record);
        if self.store.get(MODULES, &record.sha256)?.is_some() {
            self.store.put(FUNCTIONS, &key, &encoded)?;
        } else {
            self.store.put_all(&[(MODULES, &record.sha256, wasm), (FUNCTIONS, &key, &encoded)])?;
        }
        let function = Arc::new(function);
        self.publish(function.clone());
        Ok(function)
    }

    /// Make a function loaded from the store at start visible to calls.
    pub fn insert_loaded(&self, function: DeployedFunction) {
        self.publish(Arc::new(function));
    }

    /// Remove a function; its wasm goes too when no other function uses it.
    pub fn remove(&self, tenant: &str, name: &str) -> Result<bool, StoreError> {
        let mut functions = self.functions.write().expect(POISON);
        let Some(by_name) = functions.get_mut(tenant) else {
            return Ok(false);
        };
        let Some(sha) = by_name.get(name).map(|f| f.record.sha256.clone()) else {
            return Ok(false);
        };
        self.store.delete(FUNCTIONS, &function_key(tenant, name))?;
        by_name.remove(name);
        if !functions.values().flat_map(HashMap::values).any(|f| f.record.sha256 == sha) {
            self.store.delete(MODULES, &sha)?;
        }
        Ok(true)
    }
}
