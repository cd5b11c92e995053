//! Compiled artifacts on disk, keyed by the wasm's SHA-256 and the engine's
//! fingerprint, so a restart loads previously deployed functions without
//! compiling them again.
//!
//! They are loaded as executable code, so a torn or altered file must
//! never run: every file is written whole to a temporary name, flushed to
//! disk (`fsync`), renamed into place, and the directory flushed, so a
//! crash leaves the old file, the new one, or none; beside each artifact a
//! `.sum` file holds the SHA-256 of its key and bytes (written first, the
//! same way). A load checks the sum before mapping the code: an artifact
//! that is torn, altered or missing its sum is removed and the wasm
//! compiled again. (The sum guards against the disk and crashes, not
//! against someone who can write the node's data directory.)

#![allow(unsafe_code)]

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use wasmtime::Engine;
use wasmtime::Module;
use wasmtime::component::Component;

use crate::{Declared, DeployError, FunctionKind, RuntimeError};

pub(crate) struct ArtifactCache {
    dir: PathBuf,
    fingerprint: String,
    /// Bytes of the files in `dir`: listed once at open, then kept up to
    /// date by every write and removal here.
    bytes: std::sync::atomic::AtomicU64,
}

/// The size of the file at `path` (0 if there is none).
fn size_of(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
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
        let entries =
            std::fs::read_dir(dir).map_err(|source| RuntimeError::Cache { path: dir.display().to_string(), source })?;
        let bytes = entries.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum();
        Ok(Self {
            dir: dir.to_path_buf(),
            fingerprint: format!("{:016x}", hasher.finish()),
            bytes: std::sync::atomic::AtomicU64::new(bytes),
        })
    }

    /// Bytes the cache holds on disk.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Write `bytes` at `path` durably, keeping the count of bytes held.
    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let before = size_of(path);
        write_durably(path, bytes)?;
        self.account(before, bytes.len() as u64);
        Ok(())
    }

    /// Remove the file at `path`, if any, keeping the count of bytes held.
    fn remove_file(&self, path: &Path) {
        let before = size_of(path);
        if std::fs::remove_file(path).is_ok() {
            self.account(before, 0);
        }
    }

    fn account(&self, before: u64, after: u64) {
        use std::sync::atomic::Ordering;
        let _ = self.bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            Some(n.saturating_sub(before).saturating_add(after))
        });
    }

    /// Remove everything kept under `key` (its compiled code of either
    /// kind, their sums, what it declares, its snapshots): no function
    /// uses it any more.
    /// Returns the bytes freed.
    pub(crate) fn remove(&self, key: &[u8; 32]) -> u64 {
        let before = self.bytes();
        for kind in [FunctionKind::Component, FunctionKind::Command] {
            let path = self.path(key, kind);
            self.remove_file(&Self::sum_path(&path));
            self.remove_file(&path);
        }
        self.remove_file(&self.declared_path(key));
        // Snapshots of functions of language runtimes, one per runtime.
        let prefix = format!("{}-", hex::encode(key));
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(&prefix) && (name.ends_with(".snapshot") || name.ends_with(".snapshot.sum")) {
                    self.remove_file(&entry.path());
                }
            }
        }
        before.saturating_sub(self.bytes())
    }

    fn path(&self, sha256: &[u8; 32], kind: FunctionKind) -> PathBuf {
        let suffix = match kind {
            FunctionKind::Component | FunctionKind::Http | FunctionKind::Python | FunctionKind::JavaScript => {
                "component"
            }
            FunctionKind::Command => "module",
        };
        self.dir.join(format!("{}-{}.{suffix}.cwasm", hex::encode(sha256), self.fingerprint))
    }

    /// The sum beside the file at `path`: its name with `.sum` added.
    fn sum_path(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".sum");
        PathBuf::from(name)
    }

    /// The sum kept beside an artifact: SHA-256 of its key and its bytes.
    fn sum(sha256: &[u8; 32], artifact: &[u8]) -> String {
        hex::encode(Sha256::new().chain_update(sha256).chain_update(artifact).finalize())
    }

    /// The cached artifact for `sha256`, if there is a usable one.
    pub(crate) fn load(&self, engine: &Engine, sha256: &[u8; 32], kind: FunctionKind) -> Option<Compiled> {
        let path = self.path(sha256, kind);
        let bytes = std::fs::read(&path).ok()?;
        let kept = std::fs::read_to_string(Self::sum_path(&path)).unwrap_or_default();
        let loaded = if kept.trim() != Self::sum(sha256, &bytes) {
            Err(wasmtime::Error::msg("its checksum does not match (torn, altered, or written before checksums)"))
        } else {
            deserialize(engine, &path, kind)
        };
        match loaded {
            Ok(compiled) => Some(compiled),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "dropping unusable compiled artifact; compiling again");
                self.remove_file(&path);
                self.remove_file(&Self::sum_path(&path));
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
        let io = |e: std::io::Error| DeployError::Internal(format!("writing {}: {e}", path.display()));
        // The sum first: an artifact is never in place without its sum (a
        // crash between the two leaves a sum that matches nothing, and the
        // artifact is compiled again).
        self.write(&Self::sum_path(&path), Self::sum(sha256, artifact).as_bytes()).map_err(io)?;
        self.write(&path, artifact).map_err(io)?;
        // The engine refuses here what its sandboxes cannot hold (the
        // checks before compiling should have caught it): the module's fault.
        deserialize(engine, &path, kind).map_err(|e| {
            self.remove_file(&path);
            DeployError::InvalidWasm(format!("the module cannot run in this node's sandboxes: {e:#}"))
        })
    }
}

impl ArtifactCache {
    fn blob_path(&self, key: &[u8; 32], what: &str) -> PathBuf {
        self.dir.join(format!("{}-{}.{what}", hex::encode(key), self.fingerprint))
    }

    /// Keep `bytes` under `key` as `what` (a runtime's memory image, read
    /// back with [`ArtifactCache::load_blob`]), written and summed as an
    /// artifact is.
    pub(crate) fn store_blob(&self, key: &[u8; 32], what: &str, bytes: &[u8]) -> std::io::Result<()> {
        let path = self.blob_path(key, what);
        self.write(&Self::sum_path(&path), Self::sum(key, bytes).as_bytes())?;
        self.write(&path, bytes)
    }

    /// The bytes kept under `key` as `what`, if they are there whole (a
    /// file that does not match its sum is removed).
    pub(crate) fn load_blob(&self, key: &[u8; 32], what: &str) -> Option<Vec<u8>> {
        let path = self.blob_path(key, what);
        let bytes = std::fs::read(&path).ok()?;
        let kept = std::fs::read_to_string(Self::sum_path(&path)).unwrap_or_default();
        if kept.trim() == Self::sum(key, &bytes) {
            return Some(bytes);
        }
        tracing::warn!(path = %path.display(), "dropping a cached file that does not match its checksum");
        self.remove_file(&path);
        self.remove_file(&Self::sum_path(&path));
        None
    }

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
        if let Err(e) = self.write(&self.declared_path(key), text.as_bytes()) {
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

/// Replace `path` with `bytes` so that a crash at any point leaves the old
/// file or the new one, whole: a temporary file of its own (two compiles of
/// the same bytes may store at once), flushed, renamed over `path`, and the
/// directory flushed so the rename itself is durable.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static N_WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N_WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn deserialize(engine: &Engine, path: &Path, kind: FunctionKind) -> wasmtime::Result<Compiled> {
    // SAFETY: `deserialize_file` trusts the file to be an artifact this
    // engine produced. Only `ArtifactCache::store` writes into the cache
    // directory, which belongs to the node's data directory; `load` checks
    // the file's sum first; and the file name carries the engine
    // fingerprint, so an artifact from another engine configuration is
    // never picked up.
    Ok(match kind {
        FunctionKind::Component | FunctionKind::Http | FunctionKind::Python | FunctionKind::JavaScript => {
            Compiled::Component(unsafe { Component::deserialize_file(engine, path)? })
        }
        FunctionKind::Command => Compiled::Module(unsafe { Module::deserialize_file(engine, path)? }),
    })
}
