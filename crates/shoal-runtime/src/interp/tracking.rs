//! Which pages of a memory a call wrote, as the kernel saw it.
//!
//! A memory kept for reuse (see `memory.rs`) is registered with a
//! userfaultfd in asynchronous write-protect mode: the kernel marks its
//! pages write-protected and, on the first write to one, lifts the mark
//! without involving us. `PAGEMAP_SCAN` (Linux 6.7) then lists the pages
//! whose mark was lifted — every page written since the last scan, by the
//! guest, by the host or by the kernel on their behalf — and marks them
//! again in the same step. Resetting a memory after a call therefore costs
//! one scan and the pages the call wrote, not a new mapping.
//!
//! Kernels without these features (or a seccomp policy that refuses them)
//! make [`Tracker::get`] answer `None`; memories are then made afresh for
//! every call, as they would be without reuse.

#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

use super::memory::PAGE;

// linux/userfaultfd.h and linux/fs.h (the libc crate does not define them).
const UFFD_API: u64 = 0xAA;
/// `userfaultfd` flag: only faults from user mode are delivered. Allowed
/// to unprivileged processes even with vm.unprivileged_userfaultfd = 0;
/// asynchronous write-protection never delivers a fault at all.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// The process's userfaultfd and pagemap, opened once.
pub(crate) struct Tracker {
    uffd: OwnedFd,
    pagemap: File,
}

static TRACKER: OnceLock<Option<Tracker>> = OnceLock::new();

impl Tracker {
    /// The tracker, or `None` where the kernel cannot track writes.
    pub(crate) fn get() -> Option<&'static Tracker> {
        TRACKER
            .get_or_init(|| match Self::open() {
                Ok(tracker) => Some(tracker),
                Err(e) => {
                    tracing::info!(
                        error = %e,
                        "the kernel cannot track which pages a call writes: interpreter memories are made afresh per call"
                    );
                    None
                }
            })
            .as_ref()
    }

    fn open() -> std::io::Result<Self> {
        // SAFETY: a plain syscall; the descriptor it returns is owned below.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned to us and nothing else owns it.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        let mut api =
            UffdioApi { api: UFFD_API, features: UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED, ioctls: 0 };
        // SAFETY: UFFDIO_API with a properly laid-out struct we own.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let pagemap = File::open("/proc/self/pagemap")?;
        let tracker = Self { uffd, pagemap };
        tracker.self_test()?;
        Ok(tracker)
    }

    /// Check on a scratch mapping that a write is reported once and that
    /// the scan needs no privileges this process lacks.
    fn self_test(&self) -> std::io::Result<()> {
        let len = 4 * PAGE;
        let start = scratch_mapping(len)?;
        let result = (|| {
            self.register(start, len)?;
            self.scan(start, len, true, |_, _| {})?;
            // SAFETY: within the mapping made above.
            unsafe { *((start + 2 * PAGE) as *mut u8) = 1 };
            let mut seen = Vec::new();
            self.scan(start, len, true, |from, to| seen.push((from - start, to - start)))?;
            let mut again = 0;
            self.scan(start, len, true, |_, _| again += 1)?;
            if seen != [(2 * PAGE, 3 * PAGE)] || again != 0 {
                return Err(std::io::Error::other("the kernel reported writes that were not made"));
            }
            Ok(())
        })();
        // SAFETY: unmaps the mapping made above.
        unsafe { libc::munmap(start as *mut libc::c_void, len) };
        result
    }

    /// Track writes to `[start, start + len)` (page aligned, mapped).
    pub(crate) fn register(&self, start: usize, len: usize) -> std::io::Result<()> {
        let mut register =
            UffdioRegister { start: start as u64, len: len as u64, mode: UFFDIO_REGISTER_MODE_WP, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER with a properly laid-out struct we own;
        // the kernel checks that the range is mapped.
        if unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_REGISTER, &mut register) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Call `found(from, to)` for every run of pages in the registered
    /// range `[start, start + len)` written since they were last marked,
    /// and, if `mark`, mark them unwritten again. Before the first mark,
    /// all of the range counts as written. Without `mark`, only pages of
    /// the process's own are listed, not pages still of a mapped file
    /// (which nobody wrote: a read may leave them unmarked); marking
    /// covers both.
    pub(crate) fn scan(
        &self,
        start: usize,
        len: usize,
        mark: bool,
        found: impl FnMut(usize, usize),
    ) -> std::io::Result<()> {
        let query = if mark {
            Query { flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, all_of: PAGE_IS_WRITTEN, none_of: 0 }
        } else {
            Query { flags: PM_SCAN_CHECK_WPASYNC, all_of: PAGE_IS_WRITTEN, none_of: PAGE_IS_FILE }
        };
        self.walk(start, len, query, found)
    }

    /// Call `found(from, to)` for every run of pages in `[start, start +
    /// len)` mapped from a file (present and not the process's own); the
    /// range need not be registered.
    pub(crate) fn file_pages(&self, start: usize, len: usize, found: impl FnMut(usize, usize)) -> std::io::Result<()> {
        self.walk(start, len, Query { flags: 0, all_of: PAGE_IS_FILE | PAGE_IS_PRESENT, none_of: 0 }, found)
    }

    fn walk(&self, start: usize, len: usize, query: Query, mut found: impl FnMut(usize, usize)) -> std::io::Result<()> {
        let end = start + len;
        let mut regions = [PageRegion::default(); 64];
        let mut from = start;
        while from < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: query.flags,
                start: from as u64,
                end: end as u64,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                // Pages with every category in `all_of | none_of`, those
                // of `none_of` inverted: i.e. all of one, none of the other.
                category_mask: query.all_of | query.none_of,
                category_inverted: query.none_of,
                return_mask: query.all_of,
                ..PmScanArg::default()
            };
            // SAFETY: PAGEMAP_SCAN on our own pagemap; the kernel writes at
            // most `vec_len` regions into `regions`.
            let n = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            for region in &regions[..n as usize] {
                found(region.start as usize, region.end as usize);
            }
            let walked = arg.walk_end as usize;
            if walked <= from {
                return Err(std::io::Error::other("the page scan made no progress"));
            }
            from = walked;
        }
        Ok(())
    }
}

/// What a page scan looks for.
struct Query {
    flags: u64,
    /// Categories every page listed has.
    all_of: u64,
    /// Categories no page listed has.
    none_of: u64,
}

/// A fresh private anonymous read-write mapping of `len` bytes; the caller
/// unmaps it.
fn scratch_mapping(len: usize) -> std::io::Result<usize> {
    // SAFETY: a new anonymous mapping at an address the kernel picks.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ptr as usize)
}

/// Whether this machine is expected to track writes: CI sets
/// `SHOAL_EXPECT_WRITE_TRACKING=1` (its kernel has PAGEMAP_SCAN and allows
/// userfaultfd), so the tests that fall back without tracking fail there
/// instead.
#[cfg(test)]
pub(crate) fn expected() -> bool {
    std::env::var_os("SHOAL_EXPECT_WRITE_TRACKING").is_some_and(|v| v == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_reported_until_marked_including_the_kernels() {
        let Some(tracker) = Tracker::get() else {
            // Older kernels (or a policy refusing userfaultfd) fall back to
            // fresh memories, which the memory tests check.
            assert!(!expected(), "this machine should track writes");
            eprintln!("no write tracking here: nothing to test");
            return;
        };
        let len = 400 * PAGE;
        let ptr = scratch_mapping(len).unwrap();
        tracker.register(ptr, len).unwrap();
        tracker.scan(ptr, len, true, |_, _| {}).unwrap();
        // SAFETY: within the mapping.
        unsafe {
            *((ptr + 3 * PAGE + 7) as *mut u8) = 1;
            *((ptr + 10 * PAGE) as *mut u8) = 1;
            *((ptr + 11 * PAGE) as *mut u8) = 1;
        }
        // The kernel writes into page 40 (read from a file).
        let file = File::open("/proc/self/stat").unwrap();
        // SAFETY: reads 16 bytes into page 40 of the mapping.
        let read = unsafe { libc::pread(file.as_raw_fd(), (ptr + 40 * PAGE) as *mut libc::c_void, 16, 0) };
        assert_eq!(read, 16);
        let pages = |mark: bool| {
            let mut seen = Vec::new();
            tracker.scan(ptr, len, mark, |from, to| seen.push(((from - ptr) / PAGE, (to - ptr) / PAGE))).unwrap();
            seen
        };
        assert_eq!(pages(false), vec![(3, 4), (10, 12), (40, 41)]);
        assert_eq!(pages(true), vec![(3, 4), (10, 12), (40, 41)], "a scan that does not mark changes nothing");
        assert_eq!(pages(true), vec![], "marked pages are reported again only when written again");
        // More runs than one scan call returns (64): the scan goes on.
        let many: Vec<(usize, usize)> = (100..400).step_by(2).map(|page| (page, page + 1)).collect();
        for (page, _) in &many {
            // SAFETY: within the mapping.
            unsafe { *((ptr + page * PAGE) as *mut u8) = 1 };
        }
        assert_eq!(pages(false), many);
        assert_eq!(pages(true), many);
        assert_eq!(pages(true), vec![]);
        // SAFETY: unmaps the mapping made above.
        unsafe { libc::munmap(ptr as *mut libc::c_void, len) };
    }

    #[test]
    fn file_pages_are_the_mapped_and_unwritten_pages_of_a_file() {
        let Some(tracker) = Tracker::get() else {
            assert!(!expected(), "this machine should track writes");
            return;
        };
        let len = 8 * PAGE;
        let base = super::super::memory::BaseImage::new("test", &vec![7u8; len]).unwrap();
        let ptr = base.map_private_for_test().unwrap();
        // SAFETY: within the private mapping of the base: pages 1 and 2
        // read, page 2 then written (now the process's own), 5 read.
        unsafe {
            let _ = std::ptr::read_volatile((ptr + PAGE) as *const u8);
            let _ = std::ptr::read_volatile((ptr + 2 * PAGE) as *const u8);
            *((ptr + 2 * PAGE) as *mut u8) = 1;
            let _ = std::ptr::read_volatile((ptr + 5 * PAGE) as *const u8);
        }
        // Reads may map neighbouring pages too (fault-around): check only
        // that the written page is never listed and the read ones are.
        let mut file = Vec::new();
        tracker.file_pages(ptr, len, |from, to| file.extend(((from - ptr) / PAGE)..((to - ptr) / PAGE))).unwrap();
        assert!(file.contains(&1) && file.contains(&5), "{file:?}");
        assert!(!file.contains(&2), "a written page is the process's own: {file:?}");
        // SAFETY: unmaps the mapping made above.
        unsafe { libc::munmap(ptr as *mut libc::c_void, len) };
    }
}
