//! Functions deployed as source for a shared interpreter runtime.
//!
//! A deploy of a Python or JavaScript function uploads its source: one file (taken as
//! the entry file) or a tar archive of a small folder. Shoal stores it as
//! a [`SourceBundle`], a canonical encoding (files sorted by path) that
//! starts with a magic no wasm binary has, so everything that stores and
//! shares wasm by content (the registry, a cluster's Redis, the images
//! loaded) stores and shares bundles the same way, and the same source
//! always has the same hash.

use crate::DeployError;

/// The languages with a shared runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Language {
    Python,
    JavaScript,
}

impl Language {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Python => "python",
            Self::JavaScript => "javascript",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "python" | "py" => Some(Self::Python),
            "javascript" | "js" => Some(Self::JavaScript),
            _ => None,
        }
    }

    /// The file a function's runtime starts from.
    pub fn entry_file(self) -> &'static str {
        match self {
            Self::Python => "app.py",
            Self::JavaScript => "app.js",
        }
    }
}

/// The most files a function's source may have.
pub const MAX_SOURCE_FILES: usize = 256;
/// The longest path of a source file.
const MAX_PATH_BYTES: usize = 255;

const MAGIC: &[u8] = b"\0shoal-source\n";

/// A function's source files, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceBundle {
    pub language: Language,
    /// `(path, contents)`, sorted by path; paths relative, `/`-separated.
    pub files: Vec<(String, Vec<u8>)>,
}

fn invalid(message: impl Into<String>) -> DeployError {
    DeployError::InvalidSource(message.into())
}

impl SourceBundle {
    /// Check and sort `files`.
    pub fn new(language: Language, mut files: Vec<(String, Vec<u8>)>) -> Result<Self, DeployError> {
        if files.len() > MAX_SOURCE_FILES {
            return Err(invalid(format!(
                "{} files; a function's source may have at most {MAX_SOURCE_FILES}",
                files.len()
            )));
        }
        for (path, _) in &files {
            check_path(path)?;
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(pair) = files.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            return Err(invalid(format!("the file {} appears twice", pair[0].0)));
        }
        let entry = language.entry_file();
        if !files.iter().any(|(path, _)| path == entry) {
            let names: Vec<&str> = files.iter().map(|(path, _)| path.as_str()).collect();
            return Err(invalid(format!(
                "a {} function needs an entry file {entry} (files: {})",
                language.as_str(),
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            )));
        }
        Ok(Self { language, files })
    }

    /// An upload: a tar archive of the function's folder, or else one
    /// source file, which becomes the entry file.
    pub fn from_upload(language: Language, body: &[u8]) -> Result<Self, DeployError> {
        if is_tar(body) {
            return Self::new(language, untar(body)?);
        }
        if body.is_empty() {
            return Err(invalid("the source is empty"));
        }
        if wasmparser::Parser::is_component(body) || wasmparser::Parser::is_core_wasm(body) {
            return Err(invalid(format!(
                "this is WebAssembly, not {} source: deploy it without `language`",
                language.as_str()
            )));
        }
        Self::new(language, vec![(language.entry_file().to_string(), body.to_vec())])
    }

    pub fn is_bundle(bytes: &[u8]) -> bool {
        bytes.starts_with(MAGIC)
    }

    /// The canonical bytes: magic, language, then each file's path and
    /// length on a line and its contents.
    pub fn encode(&self) -> Vec<u8> {
        let size: usize = self.files.iter().map(|(p, c)| p.len() + c.len() + 24).sum();
        let mut out = Vec::with_capacity(MAGIC.len() + 16 + size);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(self.language.as_str().as_bytes());
        out.push(b'\n');
        for (path, contents) in &self.files {
            out.extend_from_slice(format!("{path}\n{}\n", contents.len()).as_bytes());
            out.extend_from_slice(contents);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DeployError> {
        let mut rest = bytes.strip_prefix(MAGIC).ok_or_else(|| invalid("not a source bundle"))?;
        let line = |rest: &mut &[u8]| -> Result<String, DeployError> {
            let end = rest.iter().position(|&b| b == b'\n').ok_or_else(|| invalid("a source bundle is truncated"))?;
            let text = std::str::from_utf8(&rest[..end]).map_err(|_| invalid("a source bundle is corrupt"))?;
            *rest = &rest[end + 1..];
            Ok(text.to_string())
        };
        let language = Language::parse(&line(&mut rest)?).ok_or_else(|| invalid("unknown language in bundle"))?;
        let mut files = Vec::new();
        while !rest.is_empty() {
            let path = line(&mut rest)?;
            let len: usize = line(&mut rest)?.parse().map_err(|_| invalid("a source bundle is corrupt"))?;
            if len > rest.len() {
                return Err(invalid("a source bundle is truncated"));
            }
            files.push((path, rest[..len].to_vec()));
            rest = &rest[len..];
        }
        Self::new(language, files)
    }
}

fn check_path(path: &str) -> Result<(), DeployError> {
    let ok = !path.is_empty()
        && path.len() <= MAX_PATH_BYTES
        && !path.starts_with('/')
        && path.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
        && path.chars().all(|c| !c.is_control() && c != '\\');
    if ok { Ok(()) } else { Err(invalid(format!("{path:?} is not a relative path inside the function's folder"))) }
}

fn is_tar(body: &[u8]) -> bool {
    body.len() >= 512 && &body[257..262] == b"ustar"
}

/// Regular files of a tar archive (directories skipped, a leading `./`
/// dropped); links and devices are refused.
fn untar(body: &[u8]) -> Result<Vec<(String, Vec<u8>)>, DeployError> {
    use std::io::Read;
    let mut archive = tar::Archive::new(body);
    let mut files = Vec::new();
    let entries = archive.entries().map_err(|e| invalid(format!("reading the tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| invalid(format!("reading the tar archive: {e}")))?;
        let kind = entry.header().entry_type();
        let path = entry.path().map_err(|e| invalid(format!("a path in the tar archive: {e}")))?;
        let path = path.to_string_lossy().trim_start_matches("./").trim_end_matches('/').to_string();
        if kind.is_dir() || path.is_empty() {
            continue;
        }
        if !kind.is_file() {
            return Err(invalid(format!("{path} in the tar archive is not a regular file")));
        }
        if files.len() == MAX_SOURCE_FILES {
            return Err(invalid(format!("a function's source may have at most {MAX_SOURCE_FILES} files")));
        }
        let mut contents = Vec::new();
        entry.read_to_end(&mut contents).map_err(|e| invalid(format!("reading {path} from the tar archive: {e}")))?;
        files.push((path, contents));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, contents) in files {
            let mut header = tar::Header::new_ustar();
            header.set_size(contents.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, path, *contents).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn an_upload_becomes_one_canonical_bundle_whatever_the_file_order() {
        let a = tar_of(&[("./app.py", b"import util"), ("util.py", b"X = 1")]);
        let b = tar_of(&[("util.py", b"X = 1"), ("app.py", b"import util")]);
        let a = SourceBundle::from_upload(Language::Python, &a).unwrap();
        let b = SourceBundle::from_upload(Language::Python, &b).unwrap();
        assert_eq!(a.encode(), b.encode(), "the same source has the same bytes");
        assert!(SourceBundle::is_bundle(&a.encode()));
        assert_eq!(SourceBundle::decode(&a.encode()).unwrap(), a);
        let single = SourceBundle::from_upload(Language::Python, b"def handle(x): return x").unwrap();
        assert_eq!(single.files, vec![("app.py".to_string(), b"def handle(x): return x".to_vec())]);
    }

    #[test]
    fn bad_uploads_are_refused_with_the_reason() {
        let no_entry = tar_of(&[("util.py", b"")]);
        let error = SourceBundle::from_upload(Language::Python, &no_entry).unwrap_err().to_string();
        assert!(error.contains("entry file app.py") && error.contains("util.py"), "{error}");
        let escape = vec![("app.py".to_string(), vec![]), ("../x.py".to_string(), vec![])];
        assert!(SourceBundle::new(Language::Python, escape).is_err());
        assert!(SourceBundle::new(Language::Python, vec![("/app.py".into(), vec![])]).is_err());
        assert!(SourceBundle::new(Language::Python, vec![("a/./app.py".into(), vec![])]).is_err());
        let wasm = wat::parse_str("(module)").unwrap();
        let error = SourceBundle::from_upload(Language::Python, &wasm).unwrap_err().to_string();
        assert!(error.contains("WebAssembly"), "{error}");
        assert!(SourceBundle::from_upload(Language::Python, b"").is_err());
        let mut truncated = SourceBundle::from_upload(Language::Python, b"x = 1").unwrap().encode();
        truncated.pop();
        assert!(SourceBundle::decode(&truncated).is_err());
    }
}
