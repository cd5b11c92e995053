//! Linear memories that start from a snapshot.
//!
//! The interpreter engine (see `interp.rs`) creates every linear memory
//! through [`SnapshotMemories`]. A memory of a call starts as a private,
//! copy-on-write mapping of the runtime's base image (one memfd, shared by
//! every function of that language and every call), with the pages in
//! which the function's own snapshot differs from the base copied over it.
//! Pages a call never writes stay shared with the base; the ones it writes
//! are its own and go away with the call.
//!
//! wasmtime asks the store's resource limiter about a new memory right
//! before it creates it, on the same thread and with no await in between
//! (`vm::Memory::new_dynamic`). The limiter (`host.rs`) therefore leaves
//! the call's [`Plan`] in a thread-local slot and the creator takes it from
//! there: the creator itself sees no store.

#![allow(unsafe_code)]

use std::cell::RefCell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

/// The size of a host page; snapshots differ from their base in whole pages.
pub(crate) const PAGE: usize = 4096;

/// A runtime's memory content at start, in a memfd mapped copy-on-write
/// by every memory created from it, sealed once written: nothing can
/// change it (a private mapping's writes never reach it either).
pub(crate) struct BaseImage {
    memfd: OwnedFd,
    len: usize,
}

impl BaseImage {
    pub(crate) fn new(name: &str, content: &[u8]) -> std::io::Result<Self> {
        let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
        // SAFETY: memfd_create with a valid C string; the returned
        // descriptor is owned here and closed on drop.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let file = std::fs::File::from(memfd.try_clone()?);
        let len = content.len().next_multiple_of(PAGE);
        file.set_len(len as u64)?;
        std::os::unix::fs::FileExt::write_all_at(&file, content, 0)?;
        let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own.
        if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { memfd, len })
    }

    /// The base's bytes, read back (for taking differences from it).
    pub(crate) fn read(&self) -> std::io::Result<Vec<u8>> {
        let file = std::fs::File::from(self.memfd.try_clone()?);
        let mut content = vec![0; self.len];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut content, 0)?;
        Ok(content)
    }
}

/// A memory's starting content: the base, the pages that differ from it,
/// and its size in bytes (a multiple of the wasm page).
pub(crate) struct MemorySnapshot {
    base: Arc<BaseImage>,
    size: usize,
    /// Runs of pages differing from the base (zero beyond it), by offset.
    runs: Vec<(usize, Box<[u8]>)>,
}

impl MemorySnapshot {
    /// The base itself, `size` bytes long.
    pub(crate) fn of_base(base: Arc<BaseImage>, size: usize) -> Self {
        Self { base, size, runs: Vec::new() }
    }

    /// `content` as differences from `base`, whose bytes are `base_bytes`.
    pub(crate) fn diff(base: Arc<BaseImage>, base_bytes: &[u8], content: &[u8]) -> Self {
        let mut runs: Vec<(usize, Box<[u8]>)> = Vec::new();
        let mut run: Option<(usize, Vec<u8>)> = None;
        for (i, page) in content.chunks(PAGE).enumerate() {
            let offset = i * PAGE;
            let same = match base_bytes.get(offset..offset + page.len()) {
                Some(base_page) => base_page == page,
                None => page.iter().all(|&b| b == 0),
            };
            match (&mut run, same) {
                (Some((_, bytes)), false) => bytes.extend_from_slice(page),
                (None, false) => run = Some((offset, page.to_vec())),
                (Some(_), true) => {
                    let (start, bytes) = run.take().expect("matched Some");
                    runs.push((start, bytes.into_boxed_slice()));
                }
                (None, true) => {}
            }
        }
        if let Some((start, bytes)) = run {
            runs.push((start, bytes.into_boxed_slice()));
        }
        Self { base, size: content.len(), runs }
    }

    /// Bytes held by this snapshot alone (the pages differing from the base).
    pub(crate) fn own_bytes(&self) -> usize {
        self.runs.iter().map(|(_, bytes)| bytes.len()).sum()
    }

    pub(crate) fn size(&self) -> usize {
        self.size
    }
}

/// What the next memory created on this thread starts from, and where to
/// leave a handle on it (to read it back after a deploy's initialisation).
#[derive(Clone)]
pub(crate) struct Plan {
    pub(crate) snapshot: Arc<MemorySnapshot>,
    pub(crate) capture: Option<Arc<Mutex<Option<MemoryView>>>>,
}

thread_local! {
    static NEXT: RefCell<Option<Plan>> = const { RefCell::new(None) };
}

/// Set what the memory about to be created on this thread starts from.
/// Called by the store's limiter as it allows a memory to be created;
/// the creator takes it (once).
pub(crate) fn plan_next(plan: Option<Plan>) {
    NEXT.with(|next| *next.borrow_mut() = plan);
}

/// Where a live memory is, for reading it back while its store is idle.
#[derive(Clone)]
pub(crate) struct MemoryView {
    ptr: usize,
    size: Arc<AtomicUsize>,
}

impl MemoryView {
    /// A copy of the memory's bytes.
    ///
    /// # Safety
    /// The memory must still be alive (its store not dropped) and nothing
    /// may be running in its store.
    pub(crate) unsafe fn read(&self) -> Vec<u8> {
        // SAFETY: per the caller's promise, `ptr` is the live memory's
        // mapping, accessible for its current size.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.size.load(Ordering::Acquire)).to_vec() }
    }
}

/// Creates the memories of the interpreter engine.
pub(crate) struct SnapshotMemories;

// SAFETY: every memory is a fresh reservation of `reserved + guard` bytes
// with only the accessible part readable and writable, so the guard the
// compiled code relies on is unmapped; see `SnapMemory`.
unsafe impl MemoryCreator for SnapshotMemories {
    fn new_memory(
        &self,
        ty: MemoryType,
        minimum: usize,
        maximum: Option<usize>,
        reserved: Option<usize>,
        guard: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        // Every store of this engine has a limiter that leaves a plan
        // right before wasmtime creates a memory; without one, refuse
        // rather than guess what the memory should hold.
        let plan = NEXT.with(|next| next.borrow_mut().take()).ok_or("no snapshot planned for this memory")?;
        if ty.is_shared() || ty.is_64() {
            return Err("shared and 64-bit memories are not supported in interpreter sandboxes".into());
        }
        let reserved = reserved.unwrap_or(4 << 30);
        let memory = SnapMemory::new(Some(&plan.snapshot), minimum, maximum, reserved, guard)
            .map_err(|e| format!("creating a linear memory: {e}"))?;
        if let Some(capture) = plan.capture {
            let view = MemoryView { ptr: memory.ptr, size: memory.size.clone() };
            *capture.lock().expect("capture slot lock is never poisoned") = Some(view);
        }
        Ok(Box::new(memory))
    }
}

struct SnapMemory {
    ptr: usize,
    /// Accessible bytes; shared so a `MemoryView` can follow growth.
    size: Arc<AtomicUsize>,
    maximum: Option<usize>,
    reserved: usize,
    mapped: usize,
}

impl SnapMemory {
    fn new(
        snapshot: Option<&MemorySnapshot>,
        minimum: usize,
        maximum: Option<usize>,
        reserved: usize,
        guard: usize,
    ) -> std::io::Result<Self> {
        let size = snapshot.map_or(minimum, |s| s.size.max(minimum));
        if size > reserved || maximum.is_some_and(|max| size > max) {
            return Err(std::io::Error::other("the snapshot is larger than the memory may be"));
        }
        let mapped = reserved + guard;
        // SAFETY: a fresh anonymous reservation, no access; owned by the
        // returned value and unmapped on drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let memory = Self { ptr: base as usize, size: Arc::new(AtomicUsize::new(size)), maximum, reserved, mapped };
        let mut zero_from = 0;
        if let Some(snapshot) = snapshot {
            let image = &snapshot.base;
            let shared = image.len.min(size);
            if shared > 0 {
                // SAFETY: maps the memfd over the start of our own
                // reservation (MAP_FIXED within it), private: writes stay ours.
                let at = unsafe {
                    libc::mmap(
                        base,
                        shared,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_FIXED,
                        image.memfd.as_raw_fd(),
                        0,
                    )
                };
                if at == libc::MAP_FAILED {
                    return Err(std::io::Error::last_os_error());
                }
            }
            zero_from = shared;
        }
        memory.protect(zero_from, size)?;
        if let Some(snapshot) = snapshot {
            for (offset, bytes) in &snapshot.runs {
                let end = (offset + bytes.len()).min(size);
                if *offset >= end {
                    continue;
                }
                // SAFETY: [offset, end) lies within the accessible part,
                // mapped read-write above.
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), (memory.ptr + offset) as *mut u8, end - offset);
                }
            }
        }
        Ok(memory)
    }

    /// Make [from, to) of the reservation readable and writable (zeros).
    fn protect(&self, from: usize, to: usize) -> std::io::Result<()> {
        if to <= from {
            return Ok(());
        }
        // SAFETY: the range lies within our reservation.
        let rc = unsafe {
            libc::mprotect((self.ptr + from) as *mut libc::c_void, to - from, libc::PROT_READ | libc::PROT_WRITE)
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for SnapMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the reservation made in `new`.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.mapped);
        }
    }
}

// SAFETY: the memory is only touched through wasmtime, which synchronises
// access to a store's memories.
unsafe impl LinearMemory for SnapMemory {
    fn byte_size(&self) -> usize {
        self.size.load(Ordering::Acquire)
    }

    fn byte_capacity(&self) -> usize {
        self.reserved
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        if new_size > self.reserved || self.maximum.is_some_and(|max| new_size > max) {
            wasmtime::bail!("memory cannot grow to {new_size} bytes");
        }
        self.protect(self.byte_size(), new_size)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn as_ptr(&self) -> *mut u8 {
        self.ptr as *mut u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diff_keeps_only_the_pages_that_differ_from_the_base() {
        let mut base_bytes = vec![0u8; 8 * PAGE];
        base_bytes[PAGE] = 1;
        let base = Arc::new(BaseImage::new("test", &base_bytes).unwrap());
        assert_eq!(base.read().unwrap(), base_bytes);
        let mut content = base_bytes.clone();
        content.extend(vec![0u8; 4 * PAGE]);
        content[3 * PAGE + 5] = 7; // one page
        content[4 * PAGE] = 8; // next to it: the same run
        content[10 * PAGE] = 9; // beyond the base
        let snapshot = MemorySnapshot::diff(base.clone(), &base_bytes, &content);
        let offsets: Vec<(usize, usize)> = snapshot.runs.iter().map(|(o, b)| (*o, b.len())).collect();
        assert_eq!(offsets, vec![(3 * PAGE, 2 * PAGE), (10 * PAGE, PAGE)]);
        assert_eq!(snapshot.own_bytes(), 3 * PAGE);

        let memory = SnapMemory::new(Some(&snapshot), 8 * PAGE, None, 1 << 30, 1 << 16).unwrap();
        assert_eq!(memory.byte_size(), content.len());
        let view = MemoryView { ptr: memory.ptr, size: memory.size.clone() };
        // SAFETY: the memory is alive and used by nothing else.
        assert_eq!(unsafe { view.read() }, content, "the memory starts as the snapshot");
        // SAFETY: as above; a write to the private mapping.
        unsafe { *(memory.ptr as *mut u8).add(PAGE) = 42 };
        assert_eq!(base.read().unwrap()[PAGE], 1, "writes never reach the shared base");
        let second = SnapMemory::new(Some(&snapshot), 8 * PAGE, None, 1 << 30, 1 << 16).unwrap();
        let view = MemoryView { ptr: second.ptr, size: second.size.clone() };
        // SAFETY: as above.
        assert_eq!(unsafe { view.read() }[PAGE], 1, "nor another memory of the same snapshot");
    }
}
