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
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

use super::tracking::Tracker;

/// The size of a host page; snapshots differ from their base in whole pages.
pub(crate) const PAGE: usize = 4096;

/// A runtime's memory content at start, in a memfd mapped copy-on-write
/// by every memory created from it, sealed once written: nothing can
/// change it (a private mapping's writes never reach it either).
pub(crate) struct BaseImage {
    memfd: OwnedFd,
    len: usize,
    /// The memfd mapped shared and read-only, to restore pages from.
    view: usize,
}

impl Drop for BaseImage {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps the view made in `new`.
            unsafe { libc::munmap(self.view as *mut libc::c_void, self.len) };
        }
    }
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
        let view = if len == 0 {
            0
        } else {
            // SAFETY: a new shared read-only mapping of the sealed memfd,
            // owned by the returned value and unmapped on drop.
            let at = unsafe {
                libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, memfd.as_raw_fd(), 0)
            };
            if at == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            at as usize
        };
        Ok(Self { memfd, len, view })
    }

    /// The base's bytes in [from, to) (zeros past its end).
    fn copy_to(&self, from: usize, to: usize, dest: *mut u8) {
        let end = to.min(self.len);
        let from_base: &[u8] = if from < end { &self.bytes()[from..end] } else { &[] };
        // SAFETY: `dest` has room for `to - from` bytes (the caller's
        // memory range), of which `from_base` fills the start.
        unsafe {
            std::ptr::copy_nonoverlapping(from_base.as_ptr(), dest, from_base.len());
            std::ptr::write_bytes(dest.add(from_base.len()), 0, to - from - from_base.len());
        }
    }

    /// A private read-write mapping of the base (as a memory's start),
    /// which the caller unmaps.
    #[cfg(test)]
    pub(crate) fn map_private_for_test(&self) -> std::io::Result<usize> {
        // SAFETY: a new private mapping of our memfd at an address the
        // kernel picks.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                self.memfd.as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(at as usize)
    }

    /// The base's bytes (its shared read-only view).
    pub(crate) fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `view` maps `len` bytes of the sealed memfd read-only
        // for as long as `self` lives; nothing can change them.
        unsafe { std::slice::from_raw_parts(self.view as *const u8, self.len) }
    }
}

/// A memory's starting content: the base, the pages that differ from it,
/// and its size in bytes (a multiple of the wasm page).
pub(crate) struct MemorySnapshot {
    base: Arc<BaseImage>,
    size: usize,
    /// Runs of pages differing from the base (zero beyond it), by offset.
    runs: Vec<(usize, Box<[u8]>)>,
    /// Names this snapshot's idle memories (never reused for another).
    id: u64,
    /// The idle memories this snapshot's were given to, if any: emptied
    /// of them when the snapshot goes.
    kept_in: Mutex<Option<std::sync::Weak<IdleMemories>>>,
}

static NEXT_SNAPSHOT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Drop for MemorySnapshot {
    fn drop(&mut self) {
        let kept_in = self.kept_in.get_mut().map(|kept| kept.take()).unwrap_or_default();
        if let Some(idle) = kept_in.and_then(|weak| weak.upgrade()) {
            idle.forget(self.id);
        }
    }
}

impl MemorySnapshot {
    /// The base itself, `size` bytes long.
    pub(crate) fn of_base(base: Arc<BaseImage>, size: usize) -> Self {
        Self::new(base, size, Vec::new())
    }

    /// `content` as differences from `base`.
    pub(crate) fn diff(base: Arc<BaseImage>, content: &[u8]) -> Self {
        let base_bytes = base.bytes();
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
        Self::new(base, content.len(), runs)
    }

    fn new(base: Arc<BaseImage>, size: usize, runs: Vec<(usize, Box<[u8]>)>) -> Self {
        let id = NEXT_SNAPSHOT_ID.fetch_add(1, Ordering::Relaxed);
        Self { base, size, runs, id, kept_in: Mutex::default() }
    }

    /// Split [from, to) into pieces with their snapshot content: `Some`
    /// with the bytes where the snapshot has its own pages, `None` where
    /// it is the base's (or zero past it).
    fn pieces(&self, from: usize, to: usize, mut piece: impl FnMut(usize, usize, Option<&[u8]>)) {
        let mut at = from;
        // The first run that ends after `from`.
        let first = self.runs.partition_point(|(offset, bytes)| offset + bytes.len() <= from);
        for (offset, bytes) in &self.runs[first..] {
            if at >= to || *offset >= to {
                break;
            }
            if *offset > at {
                piece(at, offset - at, None);
                at = *offset;
            }
            let end = (offset + bytes.len()).min(to);
            piece(at, end - at, Some(&bytes[at - offset..end - offset]));
            at = end;
        }
        if at < to {
            piece(at, to - at, None);
        }
    }

    /// Bytes held by this snapshot alone (the pages differing from the base).
    pub(crate) fn own_bytes(&self) -> usize {
        self.runs.iter().map(|(_, bytes)| bytes.len()).sum()
    }

    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// The snapshot as bytes to keep on disk (its base is not in them):
    /// its size, its number of runs, then each run's offset, length and
    /// pages, the numbers as little-endian u64.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.runs.len() * 16 + self.own_bytes());
        out.extend_from_slice(&(self.size as u64).to_le_bytes());
        out.extend_from_slice(&(self.runs.len() as u64).to_le_bytes());
        for (offset, bytes) in &self.runs {
            out.extend_from_slice(&(*offset as u64).to_le_bytes());
            out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        out
    }

    /// A snapshot of `base` from [`MemorySnapshot::encode`]'s bytes, or
    /// `None` if they do not describe one: runs of whole pages, in order,
    /// not overlapping, inside a size of whole wasm pages.
    pub(crate) fn decode(base: Arc<BaseImage>, bytes: &[u8]) -> Option<Self> {
        const WASM_PAGE: usize = 64 << 10;
        fn number(rest: &mut &[u8]) -> Option<usize> {
            let (head, tail) = rest.split_first_chunk::<8>()?;
            *rest = tail;
            usize::try_from(u64::from_le_bytes(*head)).ok()
        }
        let mut rest = bytes;
        let size = number(&mut rest)?;
        let n_runs = number(&mut rest)?;
        if size % WASM_PAGE != 0 || n_runs > size / PAGE {
            return None;
        }
        let mut runs = Vec::with_capacity(n_runs);
        let mut end_of_last = 0;
        for _ in 0..n_runs {
            let (offset, len) = (number(&mut rest)?, number(&mut rest)?);
            let end = offset.checked_add(len)?;
            if offset % PAGE != 0 || len == 0 || len % PAGE != 0 || end > size || offset < end_of_last {
                return None;
            }
            let (pages, tail) = rest.split_at_checked(len)?;
            rest = tail;
            runs.push((offset, Box::from(pages)));
            end_of_last = end;
        }
        rest.is_empty().then(|| Self::new(base, size, runs))
    }
}

/// What the next memory created on this thread starts from, and where to
/// leave a handle on it (to read it back after a deploy's initialisation).
#[derive(Clone)]
pub(crate) struct Plan {
    pub(crate) snapshot: Arc<MemorySnapshot>,
    pub(crate) capture: Option<Arc<Mutex<Option<MemoryView>>>>,
    /// The calling tenant: a call's memory is kept for that tenant's next
    /// call of the same snapshot only (a memory's content is reset, but
    /// which of its pages are resident says what the last call touched,
    /// which a call could time). `None` (a deploy): kept only through
    /// `adopt`.
    pub(crate) tenant: Option<Arc<str>>,
    /// A deploy's: where it leaves the snapshot it took of this memory
    /// before dropping the store. The memory then holds exactly that
    /// snapshot and is kept for its first call, by any tenant (what is
    /// resident says only what loading the source touched, the same for
    /// every deploy of it).
    pub(crate) adopt: Option<AdoptSlot>,
    /// Whose deploy a kept deploy's memory counts against (the calling
    /// tenant's memories count against it).
    pub(crate) owner: Option<Arc<str>>,
}

/// Where a deploy leaves the snapshot it took of its memory.
pub(crate) type AdoptSlot = Arc<Mutex<Option<Arc<MemorySnapshot>>>>;

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

/// Creates the memories of the interpreter engine, reusing the memories
/// of earlier calls of the same function where it can.
pub(crate) struct SnapshotMemories {
    idle: Arc<IdleMemories>,
}

impl SnapshotMemories {
    /// Keeping at most `idle_limit` idle memories (0: none).
    pub(crate) fn new(idle_limit: usize) -> Self {
        Self {
            idle: Arc::new(IdleMemories {
                limit: idle_limit,
                list: Mutex::default(),
                #[cfg(test)]
                restored_pages: AtomicUsize::new(0),
            }),
        }
    }
}

/// Idle memories kept per snapshot and tenant: enough for a function
/// called twice at once without holding more than it uses.
const IDLE_PER_SNAPSHOT: usize = 2;

// SAFETY: every memory is a reservation of `reserved + guard` bytes with
// only the accessible part readable and writable, so the guard the
// compiled code relies on is never mapped; a reused memory is reset to
// exactly what a fresh one would hold (see `SnapMemory::reset`).
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
        // A call's memory may be reused by the function's next call; a
        // deploy's (captured to take the snapshot) only through `adopt`.
        let size = plan.snapshot.size;
        let tenant = plan
            .tenant
            .clone()
            .filter(|_| plan.capture.is_none() && self.idle.limit > 0 && size > 0 && size % PAGE == 0);
        let tracked = match (tenant, Tracker::get()) {
            (Some(tenant), Some(tracker)) => {
                let pool = Pool { snapshot: plan.snapshot.clone(), tenant, idle: self.idle.clone() };
                match pool.take(reserved, guard) {
                    Some(area) => SnapMemory::reused(tracker, area, pool, minimum, maximum),
                    None => SnapMemory::fresh(&plan.snapshot, minimum, maximum, reserved, guard, Some((tracker, pool))),
                }
                .inspect_err(|e| tracing::debug!(error = %e, "a memory to reuse could not be set up: made afresh"))
                .ok()
            }
            _ => None,
        };
        let mut memory = match tracked {
            Some(memory) => memory,
            None => SnapMemory::fresh(&plan.snapshot, minimum, maximum, reserved, guard, None)
                .map_err(|e| format!("creating a linear memory: {e}"))?,
        };
        if self.idle.limit > 0 {
            memory.adopt = plan.adopt.map(|slot| (slot, self.idle.clone(), plan.owner.clone()));
        }
        if let Some(capture) = plan.capture {
            let view = MemoryView { ptr: memory.ptr, size: memory.size.clone() };
            *capture.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(view);
        }
        Ok(Box::new(memory))
    }
}

/// Address space reserved for one linear memory, unmapped on drop.
struct Area {
    ptr: usize,
    reserved: usize,
    guard: usize,
}

impl Area {
    fn new(reserved: usize, guard: usize) -> std::io::Result<Self> {
        // SAFETY: a fresh anonymous reservation, no access; owned by the
        // returned value and unmapped on drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserved + guard,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { ptr: base as usize, reserved, guard })
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the reservation made in `new`.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.reserved + self.guard);
        }
    }
}

/// Memories of finished calls, each reset to its snapshot, least
/// recently used first: the next call of the same function takes one; a
/// memory given back past the limit pushes out the oldest.
pub(crate) struct IdleMemories {
    limit: usize,
    list: Mutex<std::collections::VecDeque<Idle>>,
    /// Pages restored by resets so far (for tests).
    #[cfg(test)]
    restored_pages: AtomicUsize,
}

/// A kept memory: the snapshot it holds, the tenant it is kept for.
struct Idle {
    snapshot: u64,
    /// `None`: a deploy's memory, for the first call of any tenant.
    tenant: Option<Arc<str>>,
    /// Whose it counts as: the calling tenant's, or the deploying one's.
    owner: Option<Arc<str>>,
    area: Area,
}

impl IdleMemories {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Idle>> {
        self.list.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keep `area`, which holds `snapshot`, for `tenant`'s next call of it
    /// (any tenant's: `None`), counted as `owner`'s, unless that many are
    /// kept already. Past its owner's share (a quarter of the limit) the
    /// owner's least recently kept memory goes; past the limit, that of
    /// the owner keeping the most: one tenant's many functions push out
    /// its own memories, never all of everyone else's.
    fn keep(
        self: &Arc<Self>,
        snapshot: &Arc<MemorySnapshot>,
        tenant: Option<Arc<str>>,
        owner: Option<Arc<str>>,
        area: Area,
    ) {
        let id = snapshot.id;
        let mut list = self.lock();
        let same = list.iter().filter(|kept| kept.snapshot == id && kept.tenant == tenant).count();
        let dropped = if same >= IDLE_PER_SNAPSHOT {
            Some(area)
        } else {
            list.push_back(Idle { snapshot: id, tenant, owner: owner.clone(), area });
            let share = (self.limit / 4).max(IDLE_PER_SNAPSHOT);
            let owned = |list: &std::collections::VecDeque<Idle>, owner: &Option<Arc<str>>| {
                list.iter().filter(|kept| kept.owner == *owner).count()
            };
            let evict = if owned(&list, &owner) > share {
                Some(owner)
            } else if list.len() > self.limit {
                let mut counts: HashMap<Option<Arc<str>>, usize> = HashMap::new();
                for kept in list.iter() {
                    *counts.entry(kept.owner.clone()).or_default() += 1;
                }
                // The oldest memory of an owner keeping the most.
                let most = counts.values().copied().max().unwrap_or(0);
                list.iter().find(|kept| counts[&kept.owner] == most).map(|kept| kept.owner.clone())
            } else {
                None
            };
            evict.and_then(|owner| {
                let at = list.iter().position(|kept| kept.owner == owner)?;
                list.remove(at).map(|kept| kept.area)
            })
        };
        drop(list);
        drop(dropped); // unmapped outside the lock
        // A snapshot belongs to one runtime, so to one list of idle memories.
        let mut kept_in = snapshot.kept_in.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept_in.is_none() {
            *kept_in = Some(Arc::downgrade(self));
        }
    }

    /// Drop the memories kept for snapshot `id` (it is gone).
    fn forget(&self, id: u64) {
        let mut list = self.lock();
        let mut gone = Vec::new();
        let mut at = 0;
        while at < list.len() {
            if list[at].snapshot == id {
                gone.extend(list.remove(at));
            } else {
                at += 1;
            }
        }
        drop(list);
        drop(gone); // unmapped outside the lock
    }

    #[cfg(test)]
    fn count(&self, id: Option<u64>) -> usize {
        self.lock().iter().filter(|kept| id.is_none_or(|id| kept.snapshot == id)).count()
    }
}

/// Where a call's memory goes back to after the call.
struct Pool {
    snapshot: Arc<MemorySnapshot>,
    tenant: Arc<str>,
    idle: Arc<IdleMemories>,
}

impl Pool {
    fn take(&self, reserved: usize, guard: usize) -> Option<Area> {
        let mut list = self.idle.lock();
        let at = list.iter().rposition(|kept| {
            kept.snapshot == self.snapshot.id
                && kept.tenant.as_ref().is_none_or(|tenant| *tenant == self.tenant)
                && kept.area.reserved == reserved
                && kept.area.guard == guard
        })?;
        list.remove(at).map(|kept| kept.area)
    }

    fn give_back(&self, area: Area) {
        self.idle.keep(&self.snapshot, Some(self.tenant.clone()), Some(self.tenant.clone()), area);
    }
}

struct SnapMemory {
    ptr: usize,
    /// Accessible bytes; shared so a `MemoryView` can follow growth.
    size: Arc<AtomicUsize>,
    maximum: Option<usize>,
    /// `None` only while being dropped.
    area: Option<Area>,
    /// Set for a memory whose writes are tracked: reset and kept for the
    /// snapshot's next call when dropped.
    reuse: Option<(&'static Tracker, Pool)>,
    /// Whether the memory was ever grown (or tried to be) past its start.
    grew: bool,
    /// A deploy's memory: the slot its snapshot may be left in, and where
    /// to keep it then.
    adopt: Option<(AdoptSlot, Arc<IdleMemories>, Option<Arc<str>>)>,
}

impl SnapMemory {
    /// A new memory holding `snapshot`, its writes tracked if `reuse` says
    /// where it goes after the call.
    fn fresh(
        snapshot: &MemorySnapshot,
        minimum: usize,
        maximum: Option<usize>,
        reserved: usize,
        guard: usize,
        reuse: Option<(&'static Tracker, Pool)>,
    ) -> std::io::Result<Self> {
        let size = snapshot.size.max(minimum);
        if size > reserved || maximum.is_some_and(|max| size > max) {
            return Err(std::io::Error::other("the snapshot is larger than the memory may be"));
        }
        let area = Area::new(reserved, guard)?;
        let mut memory = Self {
            ptr: area.ptr,
            size: Arc::new(AtomicUsize::new(size)),
            maximum,
            area: Some(area),
            reuse: None,
            grew: size > snapshot.size,
            adopt: None,
        };
        let image = &snapshot.base;
        let shared = image.len.min(size);
        if shared > 0 {
            // SAFETY: maps the memfd over the start of our own
            // reservation (MAP_FIXED within it), private: writes stay ours.
            let at = unsafe {
                libc::mmap(
                    memory.ptr as *mut libc::c_void,
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
        memory.protect(shared, size)?;
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
        if let Some((tracker, pool)) = reuse {
            // From here on every write to the snapshot's extent is seen;
            // the first scan marks it all (what it reports is the snapshot).
            tracker.register(memory.ptr, snapshot.size)?;
            tracker.scan(memory.ptr, snapshot.size, true, |_, _| {})?;
            memory.reuse = Some((tracker, pool));
        }
        Ok(memory)
    }

    /// An idle memory of `pool`'s snapshot, reset when it was given back.
    fn reused(
        tracker: &'static Tracker,
        area: Area,
        pool: Pool,
        minimum: usize,
        maximum: Option<usize>,
    ) -> std::io::Result<Self> {
        let kept = pool.snapshot.size;
        let size = kept.max(minimum);
        if size > area.reserved || maximum.is_some_and(|max| size > max) {
            return Err(std::io::Error::other("the snapshot is larger than the memory may be"));
        }
        let memory = Self {
            ptr: area.ptr,
            size: Arc::new(AtomicUsize::new(size)),
            maximum,
            area: Some(area),
            reuse: Some((tracker, pool)),
            grew: size > kept,
            adopt: None,
        };
        memory.protect(kept, size)?;
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

    /// After any growth, make [kept, reserved) a fresh inaccessible
    /// mapping, releasing what was grown (all of it: even a growth that
    /// failed half-way).
    fn release_growth(&self, kept: usize, reserved: usize) -> std::io::Result<()> {
        if !self.grew {
            return Ok(());
        }
        // SAFETY: replaces [kept, reserved) of our own reservation.
        let at = unsafe {
            libc::mmap(
                (self.ptr + kept) as *mut libc::c_void,
                reserved - kept,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// A deploy's memory, which holds exactly `snapshot`: track its writes
    /// from now on.
    fn adopt(&self, tracker: &Tracker, snapshot: &MemorySnapshot, reserved: usize) -> std::io::Result<()> {
        let size = snapshot.size;
        if size == 0 || !size.is_multiple_of(PAGE) || self.byte_size() != size {
            return Err(std::io::Error::other("the memory is not the snapshot's size"));
        }
        self.release_growth(size, reserved)?;
        // Loading read much of the runtime's image, all of it still mapped:
        // unmapped again (it shows the same base when next read), so a kept
        // memory maps only what calls use.
        let mut read = Vec::new();
        tracker.file_pages(self.ptr, size, |from, to| read.push((from, to)))?;
        for (from, to) in read {
            // SAFETY: drops the mapping of pages of our own memory that are
            // still the base file's (not written): their content stays.
            if unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_DONTNEED) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        tracker.register(self.ptr, size)?;
        tracker.scan(self.ptr, size, true, |_, _| {})
    }

    /// Bring the memory back to exactly its snapshot: what lies beyond
    /// the snapshot's size is unmapped (inaccessible, and zero when next
    /// made accessible); within it, every page written since the last
    /// scan gets its snapshot content back, copied from the snapshot's
    /// own pages or the base (zeros past it). Written pages stay this
    /// memory's own, so the next call does not fault on them again.
    /// `reserved`: the bytes of its area. Returns the pages restored.
    fn reset(&self, tracker: &Tracker, snapshot: &MemorySnapshot, reserved: usize) -> std::io::Result<usize> {
        let kept = snapshot.size;
        self.release_growth(kept, reserved)?;
        // Written pages are the memory's own (anonymous); a page still of
        // the base's file holds the base, which is what the snapshot has
        // there (its own pages were copied in, so are never the file's).
        let mut written = Vec::new();
        tracker.scan(self.ptr, kept, false, |from, to| written.push((from - self.ptr, to - self.ptr)))?;
        let restored = written.iter().map(|(from, to)| (to - from) / PAGE).sum();
        for (from, to) in written {
            snapshot.pieces(from, to, |offset, len, own| {
                let dest = (self.ptr + offset) as *mut u8;
                match own {
                    // SAFETY: [offset, offset + len) lies within the
                    // snapshot's extent, mapped read-write.
                    Some(bytes) => unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dest, len) },
                    None => snapshot.base.copy_to(offset, offset + len, dest),
                }
            });
        }
        // Only now mark the pages unwritten: restoring wrote them too.
        tracker.scan(self.ptr, kept, true, |_, _| {})?;
        self.size.store(kept, Ordering::Release);
        Ok(restored)
    }
}

impl Drop for SnapMemory {
    fn drop(&mut self) {
        let Some(area) = self.area.take() else { return };
        if let Some((tracker, pool)) = self.reuse.take() {
            match self.reset(tracker, &pool.snapshot, area.reserved) {
                Ok(_restored) => {
                    #[cfg(test)]
                    pool.idle.restored_pages.fetch_add(_restored, Ordering::Relaxed);
                    pool.give_back(area);
                }
                Err(e) => tracing::debug!(error = %e, "a memory could not be reset: dropped"),
            }
        } else if let Some((slot, idle, owner)) = self.adopt.take() {
            let snapshot = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            if let (Some(snapshot), Some(tracker)) = (snapshot, Tracker::get()) {
                match self.adopt(tracker, &snapshot, area.reserved) {
                    Ok(()) => idle.keep(&snapshot, None, owner, area),
                    Err(e) => tracing::debug!(error = %e, "a deploy's memory could not be kept: dropped"),
                }
            }
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
        self.area.as_ref().map_or(0, |area| area.reserved)
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        if new_size > self.byte_capacity() || self.maximum.is_some_and(|max| new_size > max) {
            wasmtime::bail!("memory cannot grow to {new_size} bytes");
        }
        self.grew = true;
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
    use super::super::tracking;
    use super::*;
    use std::os::fd::AsRawFd;

    fn read_all(memory: &dyn LinearMemory) -> Vec<u8> {
        // SAFETY: the memory is alive, accessible for its byte size and
        // used by nothing else.
        unsafe { std::slice::from_raw_parts(memory.as_ptr(), memory.byte_size()).to_vec() }
    }

    #[test]
    fn a_diff_keeps_only_the_pages_that_differ_from_the_base() {
        let mut base_bytes = vec![0u8; 8 * PAGE];
        base_bytes[PAGE] = 1;
        let base = Arc::new(BaseImage::new("test", &base_bytes).unwrap());
        assert_eq!(base.bytes(), &base_bytes[..]);
        let mut content = base_bytes.clone();
        content.extend(vec![0u8; 4 * PAGE]);
        content[3 * PAGE + 5] = 7; // one page
        content[4 * PAGE] = 8; // next to it: the same run
        content[10 * PAGE] = 9; // beyond the base
        let snapshot = MemorySnapshot::diff(base.clone(), &content);
        let offsets: Vec<(usize, usize)> = snapshot.runs.iter().map(|(o, b)| (*o, b.len())).collect();
        assert_eq!(offsets, vec![(3 * PAGE, 2 * PAGE), (10 * PAGE, PAGE)]);
        assert_eq!(snapshot.own_bytes(), 3 * PAGE);

        let memory = SnapMemory::fresh(&snapshot, 8 * PAGE, None, 1 << 30, 1 << 16, None).unwrap();
        assert_eq!(memory.byte_size(), content.len());
        assert_eq!(read_all(&memory), content, "the memory starts as the snapshot");
        // SAFETY: as above; a write to the private mapping.
        unsafe { *(memory.ptr as *mut u8).add(PAGE) = 42 };
        assert_eq!(base.bytes()[PAGE], 1, "writes never reach the shared base");
        let second = SnapMemory::fresh(&snapshot, 8 * PAGE, None, 1 << 30, 1 << 16, None).unwrap();
        assert_eq!(read_all(&second)[PAGE], 1, "nor another memory of the same snapshot");
    }

    #[test]
    fn a_snapshot_kept_on_disk_reads_back_the_same_and_nonsense_is_refused() {
        let base = Arc::new(BaseImage::new("test", &vec![1u8; 8 * PAGE]).unwrap());
        let mut content = vec![1u8; 8 * PAGE];
        content.extend(vec![0u8; 8 * PAGE]); // 64 KiB: one wasm page
        content[2 * PAGE + 9] = 5;
        content[12 * PAGE] = 6;
        let snapshot = MemorySnapshot::diff(base.clone(), &content);
        let encoded = snapshot.encode();
        let back = MemorySnapshot::decode(base.clone(), &encoded).expect("reads back");
        assert_eq!((back.size(), back.runs.len(), back.own_bytes()), (16 * PAGE, 2, 2 * PAGE));
        let memory = SnapMemory::fresh(&back, 16 * PAGE, None, 1 << 30, 1 << 16, None).unwrap();
        assert_eq!(read_all(&memory), content, "the same memory as the snapshot it was taken from");
        // Truncated, trailing bytes, a run past the size, runs out of order.
        assert!(MemorySnapshot::decode(base.clone(), &encoded[..encoded.len() - 1]).is_none());
        assert!(MemorySnapshot::decode(base.clone(), &[encoded.as_slice(), &[0]].concat()).is_none());
        let mut past = encoded.clone();
        past[0..8].copy_from_slice(&(8 * PAGE as u64).to_le_bytes());
        assert!(MemorySnapshot::decode(base.clone(), &past).is_none(), "size 32 KiB: not whole wasm pages");
        let mut swapped = encoded.clone();
        let second = 16 + 16 + PAGE;
        swapped[16..24].copy_from_slice(&(12 * PAGE as u64).to_le_bytes());
        swapped[second..second + 8].copy_from_slice(&(2 * PAGE as u64).to_le_bytes());
        assert!(MemorySnapshot::decode(base, &swapped).is_none(), "runs out of order");
    }

    /// Where `found` first differs from `expected` (lengths included).
    fn first_difference(found: &[u8], expected: &[u8]) -> Option<usize> {
        found
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .or_else(|| (found.len() != expected.len()).then_some(found.len().min(expected.len())))
    }

    /// A memory from `creator` for `tenant`'s call of `snapshot`, at least
    /// `minimum` bytes.
    fn memory_for(
        creator: &SnapshotMemories,
        snapshot: &Arc<MemorySnapshot>,
        tenant: &str,
        minimum: usize,
    ) -> Box<dyn LinearMemory> {
        plan_next(Some(Plan {
            snapshot: snapshot.clone(),
            capture: None,
            tenant: Some(Arc::from(tenant)),
            adopt: None,
            owner: None,
        }));
        creator.new_memory(MemoryType::new(1, None), minimum, None, Some(1 << 30), 1 << 16).unwrap()
    }

    fn call_memory(creator: &SnapshotMemories, snapshot: &Arc<MemorySnapshot>) -> Box<dyn LinearMemory> {
        memory_for(creator, snapshot, "t", PAGE)
    }

    /// A 32-page snapshot over a 16-page base, with its own pages 3, 4, 10
    /// and 20 (past the base).
    fn test_snapshot() -> (Arc<MemorySnapshot>, Vec<u8>) {
        let base_bytes: Vec<u8> = (0..16 * PAGE).map(|i| (i / PAGE) as u8 + 1).collect();
        let base = Arc::new(BaseImage::new("test", &base_bytes).unwrap());
        let mut content = base_bytes.clone();
        content.extend(vec![0u8; 16 * PAGE]); // 32 pages: 2 wasm pages
        for page in [3, 4, 10, 20] {
            content[page * PAGE..(page + 1) * PAGE].fill(0xA0 + page as u8);
        }
        (Arc::new(MemorySnapshot::diff(base, &content)), content)
    }

    #[test]
    fn a_reused_memory_holds_exactly_its_snapshot_again() {
        // Reuse needs the kernel's write tracking (Linux 6.7, userfaultfd
        // allowed); without it every memory is fresh, and the same checks
        // hold. CI says it has it.
        let tracked = tracking::Tracker::get().is_some();
        assert!(tracked || !tracking::expected(), "this machine should track writes");
        let (snapshot, content) = test_snapshot();
        assert_eq!(snapshot.runs.len(), 3);
        let creator = SnapshotMemories::new(8);
        let source = std::fs::File::open("/proc/self/stat").unwrap();

        let mut first_ptr = None;
        // Each round writes somewhere else: a base page, a page of the
        // snapshot's own, one past the base, the kernel (read into a page),
        // and memory grown past the snapshot.
        for (round, pages) in [[1usize, 3, 17], [4, 10, 31], [0, 20, 16]].into_iter().enumerate() {
            let mut memory = call_memory(&creator, &snapshot);
            assert_eq!(memory.byte_size(), content.len(), "round {round}: the snapshot's size");
            let differs = first_difference(&read_all(&*memory), &content);
            assert_eq!(differs, None, "round {round}: the memory holds the snapshot (first difference at that offset)");
            match first_ptr {
                None => first_ptr = Some(memory.as_ptr() as usize),
                Some(ptr) => assert_eq!(tracked, memory.as_ptr() as usize == ptr, "round {round}: reused iff tracked"),
            }
            for page in pages {
                // SAFETY: within the accessible part of the memory.
                unsafe { memory.as_ptr().add(page * PAGE + round).write_bytes(0xEE, 100) };
            }
            // SAFETY: reads 16 bytes from a file into page 12 of the memory.
            let read = unsafe {
                libc::pread(source.as_raw_fd(), memory.as_ptr().add(12 * PAGE + round) as *mut libc::c_void, 16, 0)
            };
            assert_eq!(read, 16);
            memory.grow_to(content.len() + 4 * PAGE).unwrap();
            // SAFETY: within the grown part.
            unsafe { memory.as_ptr().add(content.len() + PAGE).write_bytes(0xDD, 10) };
            drop(memory);
            let idle = creator.idle.count(Some(snapshot.id));
            assert_eq!(idle, usize::from(tracked), "round {round}: the memory is kept for the next call");
        }
        // Memory grown by an earlier call starts as zeros again.
        let mut memory = call_memory(&creator, &snapshot);
        memory.grow_to(content.len() + 4 * PAGE).unwrap();
        let all = read_all(&*memory);
        assert_eq!(first_difference(&all[..content.len()], &content), None);
        assert!(all[content.len()..].iter().all(|&b| b == 0), "grown memory starts zeroed");
    }

    #[test]
    fn a_reset_restores_only_the_pages_written_and_sizes_come_back() {
        if tracking::Tracker::get().is_none() {
            assert!(!tracking::expected(), "this machine should track writes");
            return;
        }
        let (snapshot, content) = test_snapshot();
        let creator = SnapshotMemories::new(8);
        let restored = || creator.idle.restored_pages.swap(0, Ordering::Relaxed);
        // The first use: every page counts as written (the memory is new).
        drop(call_memory(&creator, &snapshot));
        restored();
        // Reading every page restores none.
        let memory = call_memory(&creator, &snapshot);
        assert_eq!(first_difference(&read_all(&*memory), &content), None);
        drop(memory);
        assert_eq!(restored(), 0, "reads restore nothing");
        // Writing every other page (base pages, own pages, pages past the
        // base): exactly those come back.
        let memory = call_memory(&creator, &snapshot);
        let written: Vec<usize> = (0..32).step_by(2).collect();
        for page in &written {
            // SAFETY: within the memory.
            unsafe { *memory.as_ptr().add(page * PAGE) = 0xEE };
        }
        drop(memory);
        assert_eq!(restored(), written.len());
        let memory = call_memory(&creator, &snapshot);
        assert_eq!(first_difference(&read_all(&*memory), &content), None);
        drop(memory);
        // A function whose memory starts larger than its snapshot (a
        // module's declared minimum) gets zeros past the snapshot, reused.
        for _ in 0..2 {
            let memory = memory_for(&creator, &snapshot, "t", content.len() + 8 * PAGE);
            assert_eq!(memory.byte_size(), content.len() + 8 * PAGE);
            let all = read_all(&*memory);
            assert_eq!(first_difference(&all[..content.len()], &content), None);
            assert!(all[content.len()..].iter().all(|&b| b == 0));
            // SAFETY: within the memory, past the snapshot.
            unsafe { memory.as_ptr().add(content.len() + PAGE).write_bytes(0xCC, 8) };
        }
    }

    #[test]
    fn a_deploys_memory_is_kept_for_the_first_call_of_its_snapshot() {
        if tracking::Tracker::get().is_none() {
            assert!(!tracking::expected(), "this machine should track writes");
            return;
        }
        let base_bytes: Vec<u8> = (0..16 * PAGE).map(|i| (i / PAGE) as u8 + 1).collect();
        let base = Arc::new(BaseImage::new("test", &base_bytes).unwrap());
        let from_base = Arc::new(MemorySnapshot::of_base(base.clone(), 16 * PAGE));
        let creator = SnapshotMemories::new(8);
        // A deploy: the memory starts as the base, the load writes to it
        // and grows it; the snapshot is taken of what it then holds.
        let adopt = Arc::new(Mutex::new(None));
        let capture = Arc::new(Mutex::new(None));
        plan_next(Some(Plan {
            snapshot: from_base,
            capture: Some(capture.clone()),
            tenant: None,
            adopt: Some(adopt.clone()),
            owner: None,
        }));
        let mut memory = creator.new_memory(MemoryType::new(1, None), PAGE, None, Some(1 << 30), 1 << 16).unwrap();
        memory.grow_to(32 * PAGE).unwrap();
        for page in [2usize, 9, 20] {
            // SAFETY: within the memory.
            unsafe { memory.as_ptr().add(page * PAGE).write_bytes(0x5A, 64) };
        }
        // A page written and then set back to the base's bytes: the
        // process's own, yet no part of the snapshot.
        // SAFETY: within the memory.
        unsafe {
            let byte = memory.as_ptr().add(7 * PAGE);
            let was = *byte;
            *byte = was ^ 0xFF;
            *byte = was;
        }
        let deployed_at = memory.as_ptr() as usize;
        let content = read_all(&*memory);
        let snapshot = Arc::new(MemorySnapshot::diff(base.clone(), &content));
        *adopt.lock().unwrap() = Some(snapshot.clone());
        drop(memory);
        assert_eq!(creator.idle.count(Some(snapshot.id)), 1, "kept for the snapshot's first call");
        // Any tenant's first call takes it; it holds the snapshot exactly.
        let first = memory_for(&creator, &snapshot, "u", PAGE);
        assert_eq!(first.as_ptr() as usize, deployed_at);
        assert_eq!(first_difference(&read_all(&*first), &content), None);
        // SAFETY: within the memory.
        unsafe { first.as_ptr().add(5 * PAGE).write_bytes(0x77, 8) };
        drop(first);
        let again = memory_for(&creator, &snapshot, "u", PAGE);
        assert_eq!(again.as_ptr() as usize, deployed_at);
        assert_eq!(first_difference(&read_all(&*again), &content), None, "and is reset like any other");
        drop(again);
        // Once a call had it, it is that tenant's: another gets its own.
        let other = memory_for(&creator, &snapshot, "v", PAGE);
        assert_ne!(other.as_ptr() as usize, deployed_at);
        assert_eq!(first_difference(&read_all(&*other), &content), None);
        drop(other);
        let again = memory_for(&creator, &snapshot, "u", PAGE);
        assert_eq!(again.as_ptr() as usize, deployed_at, "u's own, again");
        let kept = creator.idle.count(None);
        // A deploy whose snapshot was never left (it failed): not kept.
        plan_next(Some(Plan {
            snapshot: Arc::new(MemorySnapshot::of_base(base, 16 * PAGE)),
            capture: Some(capture),
            tenant: None,
            adopt: Some(Arc::new(Mutex::new(None))),
            owner: None,
        }));
        let failed = creator.new_memory(MemoryType::new(1, None), PAGE, None, Some(1 << 30), 1 << 16).unwrap();
        drop(failed);
        assert_eq!(creator.idle.count(None), kept, "a failed deploy's memory is not kept");
    }

    #[test]
    fn idle_memories_are_kept_per_tenant_and_bounded_per_snapshot_and_in_all() {
        if tracking::Tracker::get().is_none() {
            assert!(!tracking::expected(), "this machine should track writes");
            return;
        }
        let base = Arc::new(BaseImage::new("test", &vec![1u8; 16 * PAGE]).unwrap());
        let snapshot = |fill: u8| {
            let content = vec![fill; 16 * PAGE];
            Arc::new(MemorySnapshot::diff(base.clone(), &content))
        };
        let (a, b) = (snapshot(2), snapshot(3));
        let creator = SnapshotMemories::new(3);
        let idle = |id: Option<u64>| creator.idle.count(id);
        // Another tenant's call of the same snapshot gets a memory of its own.
        let first = memory_for(&creator, &a, "t", PAGE);
        let ptr = first.as_ptr() as usize;
        drop(first);
        let other = memory_for(&creator, &a, "u", PAGE);
        assert_ne!(other.as_ptr() as usize, ptr, "never another tenant's memory");
        drop(other);
        assert_eq!(memory_for(&creator, &a, "t", PAGE).as_ptr() as usize, ptr, "the tenant's own, again");
        assert_eq!(idle(Some(a.id)), 2);

        let memories: Vec<_> = (0..3).map(|_| call_memory(&creator, &b)).collect();
        drop(memories);
        assert_eq!(idle(Some(b.id)), IDLE_PER_SNAPSHOT, "at most two per snapshot and tenant");
        assert_eq!((idle(Some(a.id)), idle(None)), (1, 3), "at most three in all: the oldest went");
        drop(a);
        assert_eq!(idle(None), 2, "a dropped snapshot's memories go with it");
        // A reused memory leaves the list while in use.
        let memory = call_memory(&creator, &b);
        assert_eq!(idle(None), 1);
        drop(memory);
        assert_eq!(idle(None), 2);
    }

    #[test]
    fn one_tenant_keeping_many_memories_pushes_out_its_own_first() {
        if tracking::Tracker::get().is_none() {
            assert!(!tracking::expected(), "this machine should track writes");
            return;
        }
        let base = Arc::new(BaseImage::new("test", &vec![1u8; 16 * PAGE]).unwrap());
        let snapshot = |fill: u8| Arc::new(MemorySnapshot::diff(base.clone(), &vec![fill; 16 * PAGE]));
        // Eight kept in all: two per tenant (a quarter).
        let creator = SnapshotMemories::new(8);
        let victims = snapshot(2);
        drop(memory_for(&creator, &victims, "victim", PAGE));
        // A tenant calling six functions keeps two memories, its newest.
        let many: Vec<_> = (0..6).map(|i| snapshot(10 + i)).collect();
        for s in &many {
            drop(memory_for(&creator, s, "hostile", PAGE));
        }
        assert_eq!(creator.idle.count(Some(victims.id)), 1, "the victim's memory is still kept");
        assert_eq!(creator.idle.count(None), 3);
        assert_eq!((creator.idle.count(Some(many[4].id)), creator.idle.count(Some(many[5].id))), (1, 1));
    }
}
