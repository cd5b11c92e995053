//! A deployed function's code: validated, compiled and pre-linked once, then
//! instantiated afresh for every call. Deploy-time checks live here: the
//! kind of binary, what it imports (only WASI and `shoal:function`) and
//! what it exports.

use std::sync::Arc;

use wasmtime::Engine;
use wasmtime::InstancePre;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::DeployError;
use crate::artifact_cache::Compiled;
use crate::host::{CommandCtx, ComponentCtx, FunctionPre, Linkers};
use crate::interp::memory::MemorySnapshot;
use crate::source::{Language, SourceBundle};

/// The two kinds of function Shoal runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FunctionKind {
    /// A component of the `shoal:function` world.
    Component,
    /// A component of the `wasi:http/proxy` world: an HTTP handler.
    Http,
    /// A WASI preview-1 command module: stdin in, stdout out.
    Command,
    /// Python source, run by the shared Python runtime.
    Python,
    /// JavaScript source, run by the shared JavaScript runtime.
    JavaScript,
}

impl FunctionKind {
    pub fn detect(wasm: &[u8]) -> Result<Self, DeployError> {
        if SourceBundle::is_bundle(wasm) {
            Ok(match SourceBundle::decode(wasm)?.language {
                Language::Python => Self::Python,
                Language::JavaScript => Self::JavaScript,
            })
        } else if wasmparser::Parser::is_component(wasm) {
            Ok(Self::Component)
        } else if wasmparser::Parser::is_core_wasm(wasm) {
            Ok(Self::Command)
        } else {
            Err(DeployError::InvalidWasm("not a WebAssembly module or component: bad magic number or version".into()))
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Component => "component",
            Self::Http => "http",
            Self::Command => "command",
            Self::Python => "python",
            Self::JavaScript => "javascript",
        }
    }
}

/// What a binary asks for before running any code: the initial sizes of
/// the memories and tables it defines (in every core module of a
/// component). Checked before compiling, so a module that declares a
/// 4 GiB memory or a table of millions of elements costs nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Declared {
    /// All defined memories' initial sizes together.
    pub memory_bytes: u64,
    pub largest_memory_bytes: u64,
    pub largest_table_elements: u64,
    /// The most memories, and tables, any one core module defines.
    pub most_memories_in_a_module: u32,
    pub most_tables_in_a_module: u32,
}

impl Declared {
    /// Read the memory and table sections; None if the binary does not
    /// parse (the compiler then reports why, with the validator's words).
    pub fn of(wasm: &[u8]) -> Option<Self> {
        use wasmparser::{Parser, Payload};
        let mut declared = Self::default();
        for payload in Parser::new(0).parse_all(wasm) {
            match payload.ok()? {
                Payload::MemorySection(reader) => {
                    declared.most_memories_in_a_module = declared.most_memories_in_a_module.max(reader.count());
                    for memory in reader {
                        let memory = memory.ok()?;
                        let page = 1u64 << memory.page_size_log2.unwrap_or(16).min(16);
                        let bytes = memory.initial.saturating_mul(page);
                        declared.memory_bytes = declared.memory_bytes.saturating_add(bytes);
                        declared.largest_memory_bytes = declared.largest_memory_bytes.max(bytes);
                    }
                }
                Payload::TableSection(reader) => {
                    declared.most_tables_in_a_module = declared.most_tables_in_a_module.max(reader.count());
                    for table in reader {
                        declared.largest_table_elements = declared.largest_table_elements.max(table.ok()?.ty.initial);
                    }
                }
                _ => {}
            }
        }
        Some(declared)
    }
}

/// Validate and compile (on the compile pool's thread).
pub(crate) fn precompile(engine: &Engine, kind: FunctionKind, wasm: &[u8]) -> Result<Vec<u8>, DeployError> {
    match kind {
        FunctionKind::Component | FunctionKind::Http => engine.precompile_component(wasm),
        FunctionKind::Command => engine.precompile_module(wasm),
        FunctionKind::Python | FunctionKind::JavaScript => {
            return Err(DeployError::Internal("source is not compiled".into()));
        }
    }
    .map_err(|e| DeployError::InvalidWasm(format!("{e:#}")))
}

pub(crate) enum ImagePre {
    Component(FunctionPre<ComponentCtx>),
    /// An HTTP function.
    Http(ProxyPre<ComponentCtx>),
    Command(InstancePre<CommandCtx>),
    /// A shared runtime's code (compiled on the interpreter engine) and
    /// this function's snapshot of its memory; `proxy` for an HTTP
    /// function (its calls go to the runtime's incoming handler).
    Interpreted {
        pre: FunctionPre<ComponentCtx>,
        proxy: Option<ProxyPre<ComponentCtx>>,
        snapshot: Arc<MemorySnapshot>,
        language: FunctionKind,
        /// The runtime, kept while any of its functions is loaded (held,
        /// never read: its code and base image are in `pre` and `snapshot`).
        _runtime: Arc<crate::interp::SharedRuntime>,
    },
}

/// Compiled, pre-linked code of one wasm binary. Shared by every function
/// deployed with the same bytes.
pub struct FunctionImage {
    sha256: [u8; 32],
    declared: Declared,
    pub(crate) pre: ImagePre,
    /// Calls start from a pre-initialised snapshot.
    pub(crate) snapshot: bool,
}

impl std::fmt::Debug for FunctionImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionImage").field("sha256", &self.sha256_hex()).field("kind", &self.kind()).finish()
    }
}

const COMMAND_IMPORT_MODULE: &str = "wasi_snapshot_preview1";

impl FunctionImage {
    pub(crate) fn link(
        linkers: &Linkers,
        sha256: [u8; 32],
        declared: Declared,
        compiled: Compiled,
    ) -> Result<Self, DeployError> {
        let pre = match compiled {
            Compiled::Component(component) => {
                let engine = component.engine().clone();
                for (name, _) in component.component_type().imports(&engine) {
                    if !(name.starts_with("wasi:") || name.starts_with("shoal:function/")) {
                        return Err(DeployError::InvalidWasm(format!(
                            "import `{name}` is not provided by Shoal: a function may import only WASI 0.2 and shoal:function interfaces"
                        )));
                    }
                }
                let instance_pre = linkers
                    .component
                    .instantiate_pre(&component)
                    .map_err(|e| DeployError::InvalidWasm(format!("{e:#}")))?;
                match FunctionPre::new(instance_pre.clone()) {
                    Ok(pre) => ImagePre::Component(pre),
                    Err(function) => match ProxyPre::new(instance_pre) {
                        Ok(pre) => ImagePre::Http(pre),
                        Err(proxy) => {
                            return Err(DeployError::InvalidWasm(format!(
                                "a component must export shoal:function/handler@0.1.0 (`handle`) or wasi:http/incoming-handler@0.2 (`handle`): {function:#}; {proxy:#}"
                            )));
                        }
                    },
                }
            }
            Compiled::Module(module) => {
                for import in module.imports() {
                    if import.module() != COMMAND_IMPORT_MODULE {
                        return Err(DeployError::InvalidWasm(format!(
                            "import `{}::{}` is not provided by Shoal: a command module may import only {COMMAND_IMPORT_MODULE}",
                            import.module(),
                            import.name()
                        )));
                    }
                }
                if !matches!(module.get_export("_start"), Some(wasmtime::ExternType::Func(_))) {
                    return Err(DeployError::InvalidWasm(
                        "module exports no `_start` function: a core module must be a WASI command".into(),
                    ));
                }
                let pre =
                    linkers.command.instantiate_pre(&module).map_err(|e| DeployError::InvalidWasm(format!("{e:#}")))?;
                ImagePre::Command(pre)
            }
        };
        Ok(Self { sha256, declared, pre, snapshot: false })
    }

    /// Whether calls start from a snapshot taken at deploy (a component
    /// loaded with `snapshot`, and every function of a shared runtime).
    pub fn is_snapshot(&self) -> bool {
        self.snapshot
    }

    /// SHA-256 of the binary (or source bundle) deployed.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }

    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }

    /// The memories and tables the binary asks for at start.
    pub fn declared(&self) -> Declared {
        self.declared
    }

    pub fn kind(&self) -> FunctionKind {
        match &self.pre {
            ImagePre::Component(_) => FunctionKind::Component,
            ImagePre::Http(_) => FunctionKind::Http,
            ImagePre::Command(_) => FunctionKind::Command,
            ImagePre::Interpreted { proxy: Some(_), .. } => FunctionKind::Http,
            ImagePre::Interpreted { language, .. } => *language,
        }
    }

    /// The language of a function of a shared runtime (`Python` or
    /// `JavaScript`), also when its kind is `Http`.
    pub fn language(&self) -> Option<FunctionKind> {
        match &self.pre {
            ImagePre::Interpreted { language, .. } => Some(*language),
            _ => None,
        }
    }

    /// A function of a shared runtime: its code is the runtime's, its
    /// memory starts from `snapshot`; an HTTP function when `proxy` is set.
    pub(crate) fn interpreted(
        sha256: [u8; 32],
        language: FunctionKind,
        runtime: Arc<crate::interp::SharedRuntime>,
        http: bool,
        snapshot: Arc<MemorySnapshot>,
    ) -> Self {
        let pre = runtime.pre.clone();
        let proxy = http.then(|| runtime.proxy.clone());
        let size = snapshot.size() as u64;
        let declared = Declared {
            memory_bytes: size,
            largest_memory_bytes: size,
            most_memories_in_a_module: 1,
            ..Declared::default()
        };
        Self {
            sha256,
            declared,
            pre: ImagePre::Interpreted { pre, proxy, snapshot, language, _runtime: runtime },
            snapshot: true,
        }
    }

    /// Bytes of memory this function holds alone: for a function of a
    /// shared runtime, the pages of its snapshot that differ from the
    /// runtime's; for others, none (their code and image are shared
    /// through the compiled file).
    pub fn snapshot_bytes(&self) -> usize {
        match &self.pre {
            ImagePre::Interpreted { snapshot, .. } => snapshot.own_bytes(),
            _ => 0,
        }
    }
}
