//! Compiled artifacts on disk, keyed by the wasm's SHA-256 and the engine's
//! fingerprint, so a restart loads previously deployed functions without
//! compiling them again. Files are written whole (temporary file, then
//! rename) and never edited in place; a file that fails to load is removed
//! and the wasm compiled again.

#![allow(unsafe_code)]

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::Module;
use wasmtime::component::Component;

use crate::{Declared, DeployError, FunctionKind, RuntimeError};

pub(crate) struct ArtifactCache {
    dir: PathBuf,
    fingerprint: String,
}

/// Compiled code, ready to link.
pub(crate) enum Compiled {
    Component(Component),
    Module(Module),
}

impl ArtifactCache {
    pub(crate) fn open(dir: &Path, engine: &Engine) -> Result<Self, RuntimeError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| RuntimeError::Cache { path: dir.display().to_string(), source })?;
        // The engine's compatibility hash covers the wasmtime version and
        // every setting that changes generated code.
        let mut hasher = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(Self { dir: dir.to_path_buf(), fingerprint: format!("{:016x}", hasher.finish()) })
    }

    fn path(&self, sha256: &[u8; 32], kind: FunctionKind) -> PathBuf {
        let suffix = match kind {
            FunctionKind::Component | FunctionKind::Python | FunctionKind::JavaScript => "component",
            FunctionKind::Command => "module",
        };
        self.dir.join(format!("{}-{}.{suffix}.cwasm", hex::encode(sha256), self.fingerprint))
    }

    /// The cached artifact for `sha256`, if there is a usable one.
    pub(crate) fn load(&self, engine: &Engine, sha256: &[u8; 32], kind: FunctionKind) -> Option<Compiled> {
        let path = self.path(sha256, kind);
        if !path.exists() {
            return None;
        }
        match deserialize(engine, &path, kind) {
            Ok(compiled) => Some(compiled),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "dropping unusable compiled artifact");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Write `artifact` (from `Engine::precompile_*`) and load it back, so
    /// the code is mapped from the file and shared through the page cache.
    pub(crate) fn store(
        &self,
        engine: &Engine,
        sha256: &[u8; 32],
        kind: FunctionKind,
        artifact: &[u8],
    ) -> Result<Compiled, DeployError> {
        let path = self.path(sha256, kind);
        // A name of its own per write: two compiles of the same bytes may
        // store at once (compile_concurrency > 1).
        static N_WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N_WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
        let io = |e: std::io::Error| DeployError::Internal(format!("writing {}: {e}", path.display()));
        std::fs::write(&tmp, artifact).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        // The engine refuses here what its sandboxes cannot hold (the
        // checks before compiling should have caught it): the module's fault.
        deserialize(engine, &path, kind).map_err(|e| {
            let _ = std::fs::remove_file(&path);
            DeployError::InvalidWasm(format!("the module cannot run in this node's sandboxes: {e:#}"))
        })
    }
}

impl ArtifactCache {
    fn declared_path(&self, key: &[u8; 32]) -> PathBuf {
        self.dir.join(format!("{}-{}.declared", hex::encode(key), self.fingerprint))
    }

    /// Keep what a binary compiled under `key` declares (a snapshot's
    /// memories are those `init` left, not the deployed wasm's). Best
    /// effort: without it, a later load falls back to the deployed wasm's.
    pub(crate) fn store_declared(&self, key: &[u8; 32], declared: &Declared) {
        let text = format!(
            "{} {} {} {} {}\n",
            declared.memory_bytes,
            declared.largest_memory_bytes,
            declared.largest_table_elements,
            declared.most_memories_in_a_module,
            declared.most_tables_in_a_module
        );
        if let Err(e) = std::fs::write(self.declared_path(key), text) {
            tracing::warn!(error = %e, "keeping a snapshot's declared sizes failed");
        }
    }

    pub(crate) fn load_declared(&self, key: &[u8; 32]) -> Option<Declared> {
        let text = std::fs::read_to_string(self.declared_path(key)).ok()?;
        let numbers: Vec<u64> = text.split_whitespace().map(str::parse).collect::<Result<_, _>>().ok()?;
        let [memory_bytes, largest_memory_bytes, largest_table_elements, memories, tables] = numbers[..] else {
            return None;
        };
        Some(Declared {
            memory_bytes,
            largest_memory_bytes,
            largest_table_elements,
            most_memories_in_a_module: u32::try_from(memories).ok()?,
            most_tables_in_a_module: u32::try_from(tables).ok()?,
        })
    }
}

fn deserialize(engine: &Engine, path: &Path, kind: FunctionKind) -> wasmtime::Result<Compiled> {
    // SAFETY: `deserialize_file` trusts the file to be an artifact this
    // engine produced. Only `ArtifactCache::store` writes into the cache
    // directory, which belongs to the node's data directory, and the file
    // name carries the engine fingerprint, so an artifact from another
    // engine configuration is never picked up.
    Ok(match kind {
        FunctionKind::Component | FunctionKind::Python | FunctionKind::JavaScript => {
            Compiled::Component(unsafe { Component::deserialize_file(engine, path)? })
        }
        FunctionKind::Command => Compiled::Module(unsafe { Module::deserialize_file(engine, path)? }),
    })
}
