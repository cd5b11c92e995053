//! Separating an interpreter runtime's memory content from its code.
//!
//! A runtime component (CPython built by componentize-py, already
//! pre-initialised) carries its starting memory as active data segments.
//! Shoal keeps that content as the runtime's base image instead, mapped
//! copy-on-write into every memory (see `memory.rs`): compiled as it is,
//! wasmtime would copy the segments into every new memory (~11 MB for
//! CPython), since memories made by a custom creator get no image of
//! wasmtime's own. So the component is compiled with every active data
//! segment emptied (made passive, keeping segment indices), and the bytes
//! they held are laid out once, here, as the base image.
//!
//! Supported: exactly one core module defines a memory, every active
//! segment is in that module with a constant offset. Anything else is
//! refused with the reason.

use wasmparser::{Chunk, DataKind, Operator, Parser, Payload, TypeRef};

/// A runtime split into code and memory.
#[derive(Debug)]
pub(crate) struct Stripped {
    /// The component without its memory content.
    pub(crate) component: Vec<u8>,
    /// The content of its one memory at start (its initial size).
    pub(crate) memory: Vec<u8>,
}

const WASM_PAGE: u64 = 64 * 1024;
/// The section ids that hold nested binaries in a component.
const CORE_MODULE_SECTION: u8 = 1;
const COMPONENT_SECTION: u8 = 4;
const DATA_SECTION: u8 = 11;

pub(crate) fn strip(component: &[u8]) -> Result<Stripped, String> {
    let mut memory = None;
    let component = strip_component(component, &mut memory)?;
    let memory = memory.ok_or("no core module of the runtime defines a memory")?;
    Ok(Stripped { component, memory })
}

fn next<'a>(parser: &mut Parser, bytes: &'a [u8], pos: usize) -> Result<(usize, Payload<'a>), String> {
    match parser.parse(&bytes[pos..], true).map_err(|e| format!("parsing the runtime: {e}"))? {
        Chunk::Parsed { consumed, payload } => Ok((consumed, payload)),
        Chunk::NeedMoreData(_) => Err("the runtime's binary is truncated".into()),
    }
}

fn strip_component(bytes: &[u8], memory: &mut Option<Vec<u8>>) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut parser = Parser::new(0);
    let mut pos = 0;
    loop {
        let (consumed, payload) = next(&mut parser, bytes, pos)?;
        match payload {
            Payload::ModuleSection { unchecked_range, .. } => {
                let module = strip_module(&bytes[unchecked_range.clone()], memory)?;
                section(&mut out, CORE_MODULE_SECTION, &module);
                pos = unchecked_range.end;
            }
            Payload::ComponentSection { unchecked_range, .. } => {
                let nested = strip_component(&bytes[unchecked_range.clone()], memory)?;
                section(&mut out, COMPONENT_SECTION, &nested);
                pos = unchecked_range.end;
            }
            Payload::End(_) => break,
            _ => {
                out.extend_from_slice(&bytes[pos..pos + consumed]);
                pos += consumed;
            }
        }
    }
    Ok(out)
}

fn strip_module(bytes: &[u8], memory: &mut Option<Vec<u8>>) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut parser = Parser::new(0);
    let mut pos = 0;
    let mut imports_memory = false;
    let mut image: Option<Vec<u8>> = None;
    loop {
        let (consumed, payload) = next(&mut parser, bytes, pos)?;
        match payload {
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import.map_err(|e| e.to_string())?;
                    imports_memory |= matches!(import.ty, TypeRef::Memory(_));
                }
                out.extend_from_slice(&bytes[pos..pos + consumed]);
            }
            Payload::MemorySection(reader) => {
                if reader.count() > 1 || imports_memory || memory.is_some() {
                    return Err("the runtime has more than one memory; only one is supported".into());
                }
                for ty in reader {
                    let ty = ty.map_err(|e| e.to_string())?;
                    if ty.memory64 || ty.shared || ty.page_size_log2.is_some() {
                        return Err("the runtime's memory is 64-bit, shared or has custom pages".into());
                    }
                    let size = ty.initial.checked_mul(WASM_PAGE).ok_or("the runtime's memory is too large")?;
                    image = Some(vec![0; usize::try_from(size).map_err(|e| e.to_string())?]);
                }
                out.extend_from_slice(&bytes[pos..pos + consumed]);
            }
            Payload::DataSection(reader) => {
                let mut contents = Vec::new();
                leb(&mut contents, u64::from(reader.count()));
                for segment in reader {
                    let segment = segment.map_err(|e| e.to_string())?;
                    match segment.kind {
                        DataKind::Passive => {
                            contents.push(0x01);
                            leb(&mut contents, segment.data.len() as u64);
                            contents.extend_from_slice(segment.data);
                        }
                        DataKind::Active { memory_index, offset_expr } => {
                            let Some(image) = image.as_mut().filter(|_| memory_index == 0) else {
                                return Err("a data segment of the runtime initialises an imported memory".into());
                            };
                            let offset = constant_offset(&offset_expr)?;
                            let end = offset
                                .checked_add(segment.data.len())
                                .filter(|&end| end <= image.len())
                                .ok_or("a data segment of the runtime lies outside its memory")?;
                            image[offset..end].copy_from_slice(segment.data);
                            // Emptied but kept, so segment indices stay.
                            contents.extend_from_slice(&[0x01, 0x00]);
                        }
                    }
                }
                section(&mut out, DATA_SECTION, &contents);
            }
            Payload::End(_) => break,
            _ => out.extend_from_slice(&bytes[pos..pos + consumed]),
        }
        pos += consumed;
    }
    if let Some(image) = image {
        *memory = Some(image);
    }
    Ok(out)
}

fn constant_offset(expr: &wasmparser::ConstExpr<'_>) -> Result<usize, String> {
    let mut reader = expr.get_operators_reader();
    let offset = match reader.read().map_err(|e| e.to_string())? {
        Operator::I32Const { value } => u32::from_ne_bytes(value.to_ne_bytes()) as usize,
        _ => return Err("a data segment of the runtime has a computed offset; only constants are supported".into()),
    };
    match reader.read().map_err(|e| e.to_string())? {
        Operator::End => Ok(offset),
        _ => Err("a data segment of the runtime has a computed offset; only constants are supported".into()),
    }
}

fn section(out: &mut Vec<u8>, id: u8, contents: &[u8]) {
    out.push(id);
    leb(out, contents.len() as u64);
    out.extend_from_slice(contents);
}

fn leb(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUNTIME: &str = r#"
        (component
          (core module $m
            (memory (export "memory") 1)
            (data (i32.const 16) "snapshot")
            (data $kept "passive")
            (func (export "peek") (result i32) (i32.load8_u (i32.const 16))))
          (core instance $i (instantiate $m))
          (component $nested
            (core module $n (func (export "f"))))
        )"#;

    #[test]
    fn data_segments_become_the_base_image_and_the_component_stays_valid() {
        let wasm = wat::parse_str(RUNTIME).unwrap();
        let stripped = strip(&wasm).unwrap();
        assert_eq!(stripped.memory.len(), 65536);
        assert_eq!(&stripped.memory[16..24], b"snapshot");
        assert!(stripped.memory[..16].iter().all(|&b| b == 0));
        wasmparser::Validator::new().validate_all(&stripped.component).expect("still a valid component");
        let text = String::from_utf8_lossy(&stripped.component);
        assert!(!text.contains("snapshot"), "the active segment's bytes are gone from the code");
        assert!(text.contains("passive"), "a passive segment is kept as it is");
    }

    #[test]
    fn runtimes_this_cannot_split_are_refused_with_the_reason() {
        let two = wat::parse_str(r#"(component (core module (memory 1)) (core module (memory 1)))"#).unwrap();
        assert!(strip(&two).unwrap_err().contains("more than one memory"));
        let computed = wat::parse_str(
            r#"(component (core module (global $g i32 (i32.const 4)) (memory 1) (data (global.get $g) "x")))"#,
        )
        .unwrap();
        assert!(strip(&computed).unwrap_err().contains("computed offset"));
        let none = wat::parse_str(r#"(component (core module (func)))"#).unwrap();
        assert!(strip(&none).unwrap_err().contains("defines a memory"));
    }
}
