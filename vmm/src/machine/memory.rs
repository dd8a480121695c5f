//! Guest RAM: a memfd that a running VM maps `MAP_SHARED`, that can be frozen into a sealed,
//! read-only template, and that clones map `MAP_PRIVATE` so the host kernel copies a page only
//! when a clone writes it.
//!
//! A clone never reads a hole of a template memfd through the memfd: shmem has no zero page for
//! file mappings, so such a read would allocate a page in the sealed template. Instead a clone's
//! RAM is one anonymous private range (holes read as the host's shared zero page, a write gives a
//! private page) with the template's data runs mapped `MAP_FIXED | MAP_PRIVATE` over it from the
//! memfds: one contiguous host range, so one KVM memslot. Holes shorter than [`MIN_ANON_HOLE`]
//! (and, within a byte budget of a quarter of the data, the smallest beyond the
//! [`MAX_ANON_HOLES`] largest) are filled with zeros before sealing so that a fragmented template
//! does not cost every clone thousands of VMAs nor grow towards its RAM size; from then on a
//! template's populated pages never change.
//!
//! The types make a writable shared mapping of frozen memory impossible to obtain: the only
//! `MAP_SHARED` writable mapping is made in [`GuestRam::new_owned`] on a memfd that was just
//! created and is never handed out; [`FrozenMemory`] offers only private or read-only mappings,
//! and the kernel enforces the same through the seals (`F_SEAL_WRITE` refuses `write(2)` and
//! writable shared `mmap(2)`).

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::fixed_map::{self, Fate};
use crate::pagemap::PageMap;

use crate::layout::MIB;
pub use crate::layout::PAGE_SIZE;

/// Holes of a template memfd shorter than this are filled with zeros before sealing (and mapped
/// from the memfd): a shorter anonymous hole would cost each clone two more VMAs for little.
pub const MIN_ANON_HOLE: u64 = 16 * PAGE_SIZE;
/// Most holes of one memfd that clones map anonymously (each costs up to two VMAs per clone); the
/// smaller ones beyond this are filled with zeros before sealing, within [`MAX_FILL_DIVISOR`].
pub const MAX_ANON_HOLES: usize = 4;
/// Filling holes beyond [`MAX_ANON_HOLES`] may add at most the template's data bytes divided by
/// this: a thinly spread template keeps its holes anonymous (more VMAs per clone, a slower shell
/// build) rather than grow towards its RAM size in zeros.
pub const MAX_FILL_DIVISOR: u64 = 4;

/// Seals applied to a frozen memfd: no writes, no size change, no further seals.
const FROZEN_SEALS: libc::c_int = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;

/// Errors from creating, mapping or freezing guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is zero or not a whole number of pages.
    #[error("guest RAM size {0:#x} is not a positive multiple of 4 KiB")]
    InvalidSize(u64),
    /// `memfd_create` failed.
    #[error("memfd_create failed: {0}")]
    CreateMemfd(io::Error),
    /// Setting the memfd's size failed.
    #[error("sizing the guest RAM memfd to {size} bytes failed: {source}")]
    Resize {
        /// Requested size.
        size: u64,
        /// Error from `ftruncate`.
        source: io::Error,
    },
    /// `mmap` failed.
    #[error("mmap of {len} bytes of guest RAM failed: {source}")]
    Map {
        /// Length of the mapping.
        len: u64,
        /// Error from `mmap`.
        source: io::Error,
    },
    /// Adding the seals failed.
    #[error("sealing the guest RAM memfd failed: {0}")]
    Seal(io::Error),
    /// Reading a memfd's seals failed.
    #[error("reading the seals of a memfd failed: {0}")]
    GetSeals(io::Error),
    /// Reading a memfd's size (`fstat`) failed.
    #[error("reading the size of a memfd failed: {0}")]
    Metadata(io::Error),
    /// Duplicating a memfd's descriptor failed.
    #[error("duplicating a memfd descriptor failed: {0}")]
    DupFd(io::Error),
    /// Writing the contents of a new template memfd failed.
    #[error("writing the contents of a template memfd failed: {0}")]
    WriteMemfd(io::Error),
    /// A memfd offered as frozen memory lacks the seals.
    #[error("memfd is not sealed against writes and resizing (seals {0:#x})")]
    NotSealed(libc::c_int),
    /// A layered template would exceed the layer or run limits.
    #[error("a template of {layers} layers and {runs} overlay runs exceeds the limits ({MAX_TEMPLATE_LAYERS} layers, {MAX_TEMPLATE_RUNS} runs)")]
    TooFragmented {
        /// Layers the new template would have.
        layers: usize,
        /// Overlay runs it would have.
        runs: usize,
    },
    /// Finding the data runs of a memfd (`SEEK_DATA`/`SEEK_HOLE`) failed.
    #[error("finding the data runs of a template memfd failed: {0}")]
    Extents(io::Error),
    /// Filling small holes of a memfd with zeros before sealing failed.
    #[error("filling small holes of the template memfd failed: {0}")]
    FillHoles(io::Error),
    /// Reading the host's page tables failed.
    #[error("reading /proc/self/pagemap failed: {0}")]
    PageMap(io::Error),
    /// Dropping private pages failed.
    #[error("madvise(MADV_DONTNEED) on guest RAM failed: {0}")]
    Discard(io::Error),
    /// vm-memory refused the region.
    #[error("vm-memory rejected the guest RAM region: {0}")]
    Region(String),
    /// A `MAP_FIXED` over guest RAM failed after the kernel (before Linux 6.12) had unmapped the
    /// range: the data there is gone and the VM cannot go on.
    #[error("remapping {len} bytes of guest RAM failed ({source}) and the kernel had already unmapped the range: the VM's memory is lost and the VM cannot continue")]
    RamLost {
        /// Length of the range that was to be remapped.
        len: u64,
        /// Error from `mmap`.
        source: io::Error,
    },
}

impl MemoryError {
    /// The OS error number behind the failure, when the host refused something (a memfd, a
    /// mapping, its size or a write).
    pub fn host_errno(&self) -> Option<i32> {
        match self {
            MemoryError::CreateMemfd(io)
            | MemoryError::WriteMemfd(io)
            | MemoryError::Map { source: io, .. }
            | MemoryError::Resize { source: io, .. } => io.raw_os_error(),
            _ => None,
        }
    }
}

/// A host virtual address range this process mapped; unmapped exactly once, on drop, unless a
/// failed `MAP_FIXED` lost part of it to another mapping (see [`crate::fixed_map`]).
struct HostMapping {
    addr: NonNull<libc::c_void>,
    len: usize,
    fate: Fate,
}

// SAFETY: the mapping is plain process memory; the raw pointer is only an address, and access
// through it goes through vm-memory's volatile accessors or KVM.
unsafe impl Send for HostMapping {}
// SAFETY: as above; `HostMapping` itself never dereferences the pointer.
unsafe impl Sync for HostMapping {}

impl HostMapping {
    /// Maps `len` bytes of `fd` from offset 0 with `prot` and `flags`; `fixed_at` replaces an
    /// existing mapping of ours at that address (`MAP_FIXED`).
    fn map(
        fd: BorrowedFd<'_>,
        len: u64,
        prot: libc::c_int,
        flags: libc::c_int,
        fixed_at: Option<NonNull<libc::c_void>>,
    ) -> Result<Self, MemoryError> {
        let map_err = |source| MemoryError::Map { len, source };
        let size = usize::try_from(len).map_err(|_| MemoryError::InvalidSize(len))?;
        let (hint, flags) = match fixed_at {
            Some(addr) => (addr.as_ptr(), flags | libc::MAP_FIXED),
            None => (std::ptr::null_mut(), flags),
        };
        // SAFETY: we map a file we hold open. With MAP_FIXED the caller guarantees `hint` is the
        // start of a mapping of ours of the same length, which this call replaces atomically.
        let addr = unsafe { libc::mmap(hint, size, prot, flags, fd.as_raw_fd(), 0) };
        if addr == libc::MAP_FAILED {
            return Err(map_err(io::Error::last_os_error()));
        }
        let addr = NonNull::new(addr).ok_or_else(|| map_err(io::Error::other("mmap returned NULL")))?;
        if flags & libc::MAP_SHARED != 0 && prot & libc::PROT_WRITE != 0 {
            // A child forked meanwhile (e.g. a cell being started) must not get a writable
            // shared mapping of guest RAM: it would make sealing the memfd (a snapshot) fail
            // with EBUSY until the child execs.
            // SAFETY: madvise on the whole mapping just made; it changes only fork behaviour.
            if unsafe { libc::madvise(addr.as_ptr(), size, libc::MADV_DONTFORK) } != 0 {
                let source = io::Error::last_os_error();
                // SAFETY: unmapping the mapping just made, which nothing else refers to yet.
                unsafe { libc::munmap(addr.as_ptr(), size) };
                return Err(map_err(source));
            }
        }
        Ok(HostMapping {
            addr,
            len: size,
            fate: Fate::default(),
        })
    }

    /// Handles a failed `MAP_FIXED` over `range` (byte offsets) of this mapping: records what
    /// the kernel left there and, if the data is gone, turns the error into
    /// [`MemoryError::RamLost`].
    fn fixed_map_failed(&self, range: Range<usize>, len: u64, source: io::Error) -> MemoryError {
        // SAFETY: `range` lies inside this mapping (callers check), so the address is in bounds.
        let start = unsafe { self.addr.as_ptr().cast::<u8>().add(range.start) };
        let Some(start) = NonNull::new(start.cast::<libc::c_void>()) else {
            return MemoryError::Map { len, source };
        };
        let aftermath = fixed_map::after_failed_fixed_map(start, range.end - range.start);
        self.fate.record(aftermath);
        if aftermath.data_lost() {
            MemoryError::RamLost { len, source }
        } else {
            MemoryError::Map { len, source }
        }
    }

    /// Maps `len` bytes of private anonymous memory (zero until written; reads map the host's
    /// shared zero page); `fixed_at` replaces an existing mapping of ours at that address.
    fn map_anonymous(len: u64, fixed_at: Option<NonNull<libc::c_void>>) -> Result<Self, MemoryError> {
        let map_err = |source| MemoryError::Map { len, source };
        let size = usize::try_from(len).map_err(|_| MemoryError::InvalidSize(len))?;
        let flags = PRIVATE_FLAGS | libc::MAP_ANONYMOUS;
        let addr = match fixed_at {
            // SAFETY: an anonymous mapping touches no file; the caller guarantees `addr` is the
            // start of a mapping of ours of the same length, which this call replaces.
            Some(addr) => unsafe { libc::mmap(addr.as_ptr(), size, RAM_PROT, flags | libc::MAP_FIXED, -1, 0) },
            None => map_low(size, flags),
        };
        if addr == libc::MAP_FAILED {
            return Err(map_err(io::Error::last_os_error()));
        }
        let addr = NonNull::new(addr).ok_or_else(|| map_err(io::Error::other("mmap returned NULL")))?;
        keep_apart(addr, size);
        Ok(HostMapping {
            addr,
            len: size,
            fate: Fate::default(),
        })
    }

    /// Maps every data piece of `template` privately over this mapping, at its own offset.
    fn map_pieces(&self, template: &TemplateMemory) -> Result<(), MemoryError> {
        for piece in &template.inner.pieces {
            self.map_over(piece.memory.as_fd(), piece.range.clone())?;
        }
        Ok(())
    }

    /// Maps `run` of `fd` (file offset = offset in this mapping) privately over the same run of
    /// this mapping. The replaced pages stay owned by this mapping's `Drop`.
    fn map_over(&self, fd: BorrowedFd<'_>, run: Range<u64>) -> Result<(), MemoryError> {
        let len = run.end.saturating_sub(run.start);
        if run.end > self.len as u64 || len == 0 {
            return Err(MemoryError::InvalidSize(run.end));
        }
        // SAFETY: `run` lies inside this live mapping (checked above), so MAP_FIXED replaces only
        // pages we own; the file is a sealed memfd at least `run.end` bytes long.
        let addr = unsafe {
            libc::mmap(
                self.addr.as_ptr().cast::<u8>().add(run.start as usize).cast(),
                len as usize,
                RAM_PROT,
                PRIVATE_FLAGS | libc::MAP_FIXED,
                fd.as_raw_fd(),
                run.start as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            let source = io::Error::last_os_error();
            return Err(self.fixed_map_failed(run.start as usize..run.end as usize, len, source));
        }
        Ok(())
    }

    /// A vm-memory view of this mapping at guest physical address 0.
    fn guest_view(&self, prot: libc::c_int, flags: libc::c_int) -> Result<GuestMemoryMmap, MemoryError> {
        let region_err = |e: &dyn std::fmt::Display| MemoryError::Region(e.to_string());
        // SAFETY: `addr..addr+len` is a live mapping of ours with exactly these `prot` and
        // `flags`. The region does not own it (vm-memory will not unmap it); `GuestRam` keeps the
        // mapping alive for at least as long as the view (the view is dropped first).
        let region = unsafe { MmapRegion::build_raw(self.addr.as_ptr().cast(), self.len, prot, flags) }
            .map_err(|e| region_err(&e))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| MemoryError::Region("region does not fit the guest address space".into()))?;
        GuestMemoryMmap::from_regions(vec![region]).map_err(|e| region_err(&e))
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        if !self.fate.get().may_unmap() {
            // Part of the range now belongs to another mapping: leaking the rest is the only
            // way not to unmap it.
            return;
        }
        // SAFETY: `addr..addr+len` was mapped by us and is unmapped only here, once.
        if unsafe { libc::munmap(self.addr.as_ptr(), self.len) } == 0 {
            super::ram_arena::release(self.addr.as_ptr() as u64);
        }
    }
}

/// Maps `size` bytes of anonymous memory with `flags` at the lowest free address of the RAM
/// arena ([`super::ram_arena`]), or where the kernel chooses if the arena has no room or
/// something is mapped there already. Returns what `mmap` returns.
fn map_low(size: usize, flags: libc::c_int) -> *mut libc::c_void {
    if let Some(at) = super::ram_arena::take(size as u64) {
        // SAFETY: MAP_FIXED_NOREPLACE never replaces a mapping: it fails with EEXIST instead.
        let addr = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                size,
                RAM_PROT,
                flags | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if addr as u64 == at {
            return addr;
        }
        if addr != libc::MAP_FAILED {
            // A kernel before 4.17 took the flag for a hint and mapped elsewhere: keep that (the
            // arena range stays taken; its drop releases nothing).
            return addr;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
            // Not a conflict (e.g. ENOMEM at vm.max_map_count): the range stays free for later,
            // and the kernel's own choice below fails the same way if it must.
            super::ram_arena::release(at);
        }
        // EEXIST: something else is there; that arena range stays taken (never tried again).
    }
    // SAFETY: an anonymous mapping where the kernel chooses touches nothing of ours.
    unsafe { libc::mmap(std::ptr::null_mut(), size, RAM_PROT, flags, -1, 0) }
}

/// A sealed memfd: guest RAM that will never be written again.
struct SealedMemfd {
    file: File,
    size: u64,
    /// The data runs when it was adopted (sealed, so they stay the same).
    extents: Vec<Range<u64>>,
}

/// Frozen guest RAM: a memfd sealed against writes and resizing. Cheap to clone (shared handle);
/// it can only be mapped privately (copy-on-write) or read-only.
#[derive(Clone)]
pub struct FrozenMemory {
    inner: Arc<SealedMemfd>,
}

impl FrozenMemory {
    /// Adopts a memfd that already carries the write, grow and shrink seals.
    pub fn from_sealed(file: File) -> Result<Self, MemoryError> {
        let seals = get_seals(&file).map_err(MemoryError::GetSeals)?;
        let needed = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK;
        if seals & needed != needed {
            return Err(MemoryError::NotSealed(seals));
        }
        let size = file.metadata().map_err(MemoryError::Metadata)?.len();
        let extents = data_extents(&file, size).map_err(MemoryError::Extents)?;
        Ok(FrozenMemory {
            inner: Arc::new(SealedMemfd { file, size, extents }),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The seals on the memfd (`F_GET_SEALS`).
    pub fn seals(&self) -> io::Result<libc::c_int> {
        get_seals(&self.inner.file)
    }

    /// Creates `size` bytes of new frozen memory: a fresh memfd that `fill` may write (the only
    /// writer it ever has), then sealed.
    pub fn new_sealed_with(size: u64, fill: impl FnOnce(&File) -> io::Result<()>) -> Result<Self, MemoryError> {
        let file = create_memfd(c"cowvm-template")?;
        file.set_len(size)
            .map_err(|source| MemoryError::Resize { size, source })?;
        fill(&file).map_err(MemoryError::WriteMemfd)?;
        fill_small_holes(&file, size).map_err(MemoryError::FillHoles)?;
        add_seals(&file, FROZEN_SEALS).map_err(MemoryError::Seal)?;
        FrozenMemory::from_sealed(file)
    }

    /// The byte ranges of the memfd that hold data, asked of the kernel now
    /// (`SEEK_DATA`/`SEEK_HOLE`); the rest are holes that read as zeros.
    pub fn data_extents(&self) -> io::Result<Vec<Range<u64>>> {
        data_extents(&self.inner.file, self.size())
    }

    /// Bytes the memfd holds now (the sum of [`FrozenMemory::data_extents`]).
    pub fn populated_bytes(&self) -> io::Result<u64> {
        Ok(self.data_extents()?.iter().map(|r| r.end - r.start).sum())
    }

    /// Reads `buf.len()` bytes at `offset` (holes read as zeros without allocating pages).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.file.read_exact_at(buf, offset)
    }

    /// Maps the frozen memory read-only and shared: the view sees the template's own pages.
    /// Like any file mapping of shmem, reading a hole through it allocates a page in the memfd,
    /// so read only data pages through it (tests compare clones' pages with these).
    pub fn map_read_only(&self) -> Result<ReadOnlyView, MemoryError> {
        let mapping = HostMapping::map(
            self.as_fd(),
            self.size(),
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            None,
        )?;
        Ok(ReadOnlyView {
            mapping,
            _frozen: self.clone(),
        })
    }
}

impl AsFd for FrozenMemory {
    /// The sealed memfd. The kernel refuses writes and writable shared mappings through it.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.file.as_fd()
    }
}

/// A read-only shared mapping of frozen memory (for comparing a clone's pages with the template's).
pub struct ReadOnlyView {
    mapping: HostMapping,
    _frozen: FrozenMemory,
}

impl ReadOnlyView {
    /// Host virtual address of byte 0.
    pub fn host_address(&self) -> u64 {
        self.mapping.addr.as_ptr() as u64
    }

    /// Reads the little-endian u64 at `offset`, or `None` past the end.
    pub fn read_u64(&self, offset: u64) -> Option<u64> {
        let end = offset.checked_add(8)?;
        if end > self.mapping.len as u64 || !offset.is_multiple_of(8) {
            return None;
        }
        // SAFETY: `offset + 8` lies inside the live read-only mapping and is 8-aligned.
        Some(unsafe {
            std::ptr::read_volatile(
                self.mapping
                    .addr
                    .as_ptr()
                    .cast::<u8>()
                    .add(offset as usize)
                    .cast::<u64>(),
            )
        })
    }
}

/// Most layers a template may stack (base plus overlays).
pub const MAX_TEMPLATE_LAYERS: usize = 16;
/// Most overlay runs all layers of a template may hold; each becomes one or two VMAs in every
/// clone, and a process has at most `vm.max_map_count` (65530 by default).
pub const MAX_TEMPLATE_RUNS: usize = 16 * 1024;

/// One overlay of a layered template: a sealed memfd holding a VM's private pages at their own
/// offsets (the rest is holes), and the runs of it that are mapped over the layers below.
struct Overlay {
    memory: FrozenMemory,
    runs: Vec<Range<u64>>,
}

/// A run of a template's RAM that clones map from one layer's memfd.
struct Piece {
    range: Range<u64>,
    memory: FrozenMemory,
}

struct Layers {
    base: FrozenMemory,
    overlays: Vec<Overlay>,
    /// Where each run of data comes from, sorted and disjoint; the rest is holes (anonymous).
    pieces: Vec<Piece>,
    /// [`TemplateMemory::data_runs`], found once (the layers never change).
    data_runs: OnceLock<Arc<Vec<Range<u64>>>>,
}

/// The memory of a template: a sealed base memfd plus, for templates frozen from clones, sealed
/// overlays whose runs are mapped over it in order. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct TemplateMemory {
    inner: Arc<Layers>,
}

impl TemplateMemory {
    /// A template of one layer.
    pub fn single(base: FrozenMemory) -> Self {
        let pieces = base
            .inner
            .extents
            .iter()
            .map(|r| Piece {
                range: r.clone(),
                memory: base.clone(),
            })
            .collect();
        TemplateMemory {
            inner: Arc::new(Layers {
                base,
                overlays: Vec::new(),
                pieces,
                data_runs: OnceLock::new(),
            }),
        }
    }

    /// Every layer's memory, base first.
    pub fn layers(&self) -> Vec<&FrozenMemory> {
        std::iter::once(&self.inner.base)
            .chain(self.inner.overlays.iter().map(|o| &o.memory))
            .collect()
    }

    /// The topmost layer: the one this template added (its base, for a single-layer template).
    pub fn own_layer(&self) -> &FrozenMemory {
        self.inner.overlays.last().map_or(&self.inner.base, |o| &o.memory)
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.base.size()
    }

    /// Number of layers (1 for a template frozen from a VM that owned its RAM).
    pub fn depth(&self) -> usize {
        1 + self.inner.overlays.len()
    }

    /// Overlay runs mapped over the base, over all layers.
    pub fn overlay_runs(&self) -> usize {
        self.inner.overlays.iter().map(|o| o.runs.len()).sum()
    }

    /// Data pieces a clone maps from the memfds (`MAP_FIXED` over its anonymous range): its RAM
    /// is at most 2 × this + 1 mappings (each piece, and the anonymous holes between them).
    pub fn mapped_pieces(&self) -> usize {
        self.inner.pieces.len()
    }

    /// The base layer.
    pub fn base(&self) -> &FrozenMemory {
        &self.inner.base
    }

    /// Where the template's data lives, in the order to apply it: the base's data extents, then
    /// each overlay's runs (later entries win where they overlap earlier ones).
    pub fn data_sources(&self) -> io::Result<Vec<(Range<u64>, &FrozenMemory)>> {
        let base = &self.inner.base;
        let mut sources: Vec<(Range<u64>, &FrozenMemory)> =
            base.data_extents()?.into_iter().map(|r| (r, base)).collect();
        for overlay in &self.inner.overlays {
            sources.extend(overlay.runs.iter().map(|r| (r.clone(), &overlay.memory)));
        }
        Ok(sources)
    }

    /// The overlays in the order they are mapped: each sealed memfd with the runs (byte ranges)
    /// of it mapped over the layers below.
    pub fn overlays(&self) -> impl Iterator<Item = (&FrozenMemory, &[Range<u64>])> {
        self.inner.overlays.iter().map(|o| (&o.memory, o.runs.as_slice()))
    }

    /// Rebuilds a layered template from its parts (e.g. memfds received from another process),
    /// with the same limits as freezing one.
    pub fn layered(base: FrozenMemory, overlays: Vec<(FrozenMemory, Vec<Range<u64>>)>) -> Result<Self, MemoryError> {
        let mut memory = TemplateMemory::single(base);
        for (overlay, runs) in overlays {
            if runs.iter().any(|r| r.start > r.end || r.end > memory.size()) {
                return Err(MemoryError::InvalidSize(memory.size()));
            }
            memory = memory.with_overlay(Overlay { memory: overlay, runs })?;
        }
        Ok(memory)
    }

    /// The ranges of [`TemplateMemory::data_sources`] without their sources, listed on the first
    /// call and kept: `SEEK_DATA`/`SEEK_HOLE` costs about 0.7 µs per run, too much to repeat for
    /// every clone of a template with thousands of runs.
    pub fn data_runs(&self) -> io::Result<Arc<Vec<Range<u64>>>> {
        if let Some(runs) = self.inner.data_runs.get() {
            return Ok(Arc::clone(runs));
        }
        let runs = Arc::new(self.data_sources()?.into_iter().map(|(run, _)| run).collect());
        Ok(Arc::clone(self.inner.data_runs.get_or_init(|| runs)))
    }

    fn with_overlay(&self, overlay: Overlay) -> Result<Self, MemoryError> {
        let layers = self.depth() + 1;
        let runs = self.overlay_runs() + overlay.runs.len();
        if layers > MAX_TEMPLATE_LAYERS || runs > MAX_TEMPLATE_RUNS {
            return Err(MemoryError::TooFragmented { layers, runs });
        }
        let mut overlays: Vec<Overlay> = self
            .inner
            .overlays
            .iter()
            .map(|o| Overlay {
                memory: o.memory.clone(),
                runs: o.runs.clone(),
            })
            .collect();
        let mut runs = overlay.runs.clone();
        runs.sort_by_key(|r| r.start);
        let pieces = overlay_pieces(&self.inner.pieces, &runs, &overlay.memory);
        overlays.push(overlay);
        Ok(TemplateMemory {
            inner: Arc::new(Layers {
                base: self.inner.base.clone(),
                overlays,
                pieces,
                data_runs: OnceLock::new(),
            }),
        })
    }
}

/// Layer access for persistence: a layered template is saved as its top overlay plus a
/// reference to the template it was layered on, and rebuilt the same way.
impl TemplateMemory {
    /// Whether `self` and `other` are the same memory (one shared handle).
    pub fn same_as(&self, other: &TemplateMemory) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Whether `self` is `parent` with exactly one overlay on top (the same memfds below it).
    pub fn is_layered_on(&self, parent: &TemplateMemory) -> bool {
        let (mine, theirs) = (&self.inner, &parent.inner);
        mine.overlays.len() == theirs.overlays.len() + 1
            && Arc::ptr_eq(&mine.base.inner, &theirs.base.inner)
            && mine
                .overlays
                .iter()
                .zip(&theirs.overlays)
                .all(|(a, b)| Arc::ptr_eq(&a.memory.inner, &b.memory.inner))
    }

    /// The top overlay (its memory and the runs of it that are mapped), if there is one.
    pub fn top_overlay(&self) -> Option<(&FrozenMemory, &[Range<u64>])> {
        self.inner.overlays.last().map(|o| (&o.memory, o.runs.as_slice()))
    }

    /// `self` with `memory`'s `runs` mapped over it as a new top layer. The runs must be
    /// page-aligned, sorted, disjoint and inside the memory; the layer limits apply.
    pub fn with_layer(&self, memory: FrozenMemory, runs: Vec<Range<u64>>) -> Result<Self, MemoryError> {
        let mut end = 0;
        for run in &runs {
            let aligned = run.start.is_multiple_of(PAGE_SIZE) && run.end.is_multiple_of(PAGE_SIZE);
            if !aligned || run.start < end || run.end <= run.start || run.end > self.size() {
                return Err(MemoryError::InvalidSize(run.end));
            }
            end = run.end;
        }
        if memory.size() != self.size() {
            return Err(MemoryError::InvalidSize(memory.size()));
        }
        self.with_overlay(Overlay { memory, runs })
    }
}

/// Where a VM's RAM comes from.
enum Backing {
    /// The VM owns the memfd and maps it shared and writable.
    Owned(File),
    /// The VM maps a frozen template privately; its writes become private anonymous pages.
    Private(TemplateMemory),
}

/// The RAM of one VM: a host mapping at a fixed address plus the vm-memory view of it.
pub struct GuestRam {
    // Field order is drop order: the view goes before the mapping it points into.
    view: GuestMemoryMmap,
    mapping: HostMapping,
    backing: Backing,
}

const RAM_PROT: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;
const PRIVATE_FLAGS: libc::c_int = libc::MAP_PRIVATE | libc::MAP_NORESERVE;

impl GuestRam {
    /// Creates `size` bytes of zeroed RAM in a new sealable memfd, mapped shared and writable.
    pub fn new_owned(size: u64) -> Result<Self, MemoryError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::InvalidSize(size));
        }
        let file = create_memfd(c"cowvm-guest-ram")?;
        file.set_len(size)
            .map_err(|source| MemoryError::Resize { size, source })?;
        let flags = libc::MAP_SHARED | libc::MAP_NORESERVE;
        let mapping = HostMapping::map(file.as_fd(), size, RAM_PROT, flags, None)?;
        let view = mapping.guest_view(RAM_PROT, flags)?;
        Ok(GuestRam {
            view,
            mapping,
            backing: Backing::Owned(file),
        })
    }

    /// Maps a template privately: reads share the template's pages, writes copy them. The range
    /// is anonymous private memory (holes read as the zero page and allocate nothing in the
    /// template) with each data run of each layer mapped `MAP_FIXED | MAP_PRIVATE` over it.
    pub fn new_private(template: &TemplateMemory) -> Result<Self, MemoryError> {
        let mapping = HostMapping::map_anonymous(template.size(), None)?;
        mapping.map_pieces(template)?;
        let view = mapping.guest_view(RAM_PROT, PRIVATE_FLAGS)?;
        Ok(GuestRam {
            view,
            mapping,
            backing: Backing::Private(template.clone()),
        })
    }

    /// Freezes owned RAM without copying it: fills the memfd's small holes with zeros, replaces
    /// the shared mapping at the same host address by the template layout (anonymous holes, the
    /// memfd's data runs `MAP_PRIVATE | MAP_FIXED`; KVM's MMU notifier drops its stale
    /// translations) and seals the memfd, which the kernel allows only once no writable shared
    /// mapping remains. The VM keeps
    /// running on the private mapping; its later writes become private pages.
    ///
    /// RAM that is already a private view of a template is frozen into a layered template: its
    /// private pages (and only those) are copied into a new sealed overlay memfd, and the new
    /// template maps that overlay over the parent template's layers. The VM keeps its mapping.
    ///
    /// No vCPU of the VM may run during the call (the caller holds it exclusively).
    pub fn freeze(&mut self, pagemap: &PageMap) -> Result<TemplateMemory, MemoryError> {
        let file = match &self.backing {
            Backing::Owned(file) => file,
            Backing::Private(template) => return self.freeze_layer(template, pagemap),
        };
        fill_small_holes(file, self.size()).map_err(MemoryError::FillHoles)?;
        let remapped = match HostMapping::map_anonymous(self.size(), Some(self.mapping.addr)) {
            Ok(remapped) => remapped,
            Err(MemoryError::Map { len, source }) => {
                return Err(self.mapping.fixed_map_failed(0..self.mapping.len, len, source));
            }
            Err(e) => return Err(e),
        };
        // The old mapping object describes the range that MAP_FIXED just replaced; forgetting it
        // leaves `remapped` as the range's only owner.
        std::mem::forget(std::mem::replace(&mut self.mapping, remapped));
        let laid_out = (|| {
            add_seals(file, FROZEN_SEALS).map_err(MemoryError::Seal)?;
            let sealed = file.try_clone().map_err(MemoryError::DupFd)?;
            let template = TemplateMemory::single(FrozenMemory::from_sealed(sealed)?);
            self.mapping.map_pieces(&template)?;
            Ok(template)
        })();
        let template = match laid_out {
            Ok(template) => template,
            Err(e) => {
                // Never leave the VM on zeros: map the whole memfd privately instead (its holes
                // then allocate on read, as before the layout existed).
                let whole = HostMapping::map(
                    file.as_fd(),
                    self.size(),
                    RAM_PROT,
                    PRIVATE_FLAGS,
                    Some(self.mapping.addr),
                )?;
                std::mem::forget(std::mem::replace(&mut self.mapping, whole));
                self.view = self.mapping.guest_view(RAM_PROT, PRIVATE_FLAGS)?;
                return Err(e);
            }
        };
        self.view = self.mapping.guest_view(RAM_PROT, PRIVATE_FLAGS)?;
        self.backing = Backing::Private(template.clone());
        Ok(template)
    }

    /// Copies this clone's private pages into a new sealed overlay over `parent`. The layer and
    /// run limits are checked before anything is allocated or copied, and the copy goes through
    /// a buffer of at most [`FREEZE_CHUNK`] bytes whatever the size of a run.
    fn freeze_layer(&self, parent: &TemplateMemory, pagemap: &PageMap) -> Result<TemplateMemory, MemoryError> {
        let runs = self.private_runs(pagemap)?;
        if runs.is_empty() {
            return Ok(parent.clone());
        }
        check_overlay_limits(parent, runs.len())?;
        let file = create_memfd(c"cowvm-template-overlay")?;
        let size = self.size();
        file.set_len(size)
            .map_err(|source| MemoryError::Resize { size, source })?;
        let largest = runs.iter().map(|r| r.end - r.start).max().unwrap_or(0);
        let mut buffer = vec![0u8; largest.min(FREEZE_CHUNK) as usize];
        for run in &runs {
            for chunk in chunks(run.clone(), FREEZE_CHUNK) {
                let bytes = &mut buffer[..(chunk.end - chunk.start) as usize];
                self.view
                    .read_slice(bytes, GuestAddress(chunk.start))
                    .map_err(|e| MemoryError::Region(e.to_string()))?;
                file.write_all_at(bytes, chunk.start).map_err(MemoryError::WriteMemfd)?;
            }
        }
        add_seals(&file, FROZEN_SEALS).map_err(MemoryError::Seal)?;
        let memory = FrozenMemory::from_sealed(file)?;
        parent.with_overlay(Overlay { memory, runs })
    }

    /// Runs of private (copied-on-write) pages, as guest offsets, from the host's page tables.
    pub fn private_runs(&self, pagemap: &PageMap) -> Result<Vec<Range<u64>>, MemoryError> {
        let base = self.host_address();
        let runs = pagemap.private_runs(base, self.size()).map_err(MemoryError::PageMap)?;
        Ok(runs.into_iter().map(|r| r.start - base..r.end - base).collect())
    }

    /// Drops the private pages in `runs` (guest offsets): later accesses map the template's pages
    /// again. `MADV_DONTNEED` on a private file mapping frees the copies (on an anonymous hole the
    /// page reads as zero again), and KVM's MMU notifier drops its translations of the range.
    pub fn discard(&self, runs: &[Range<u64>]) -> Result<(), MemoryError> {
        for run in runs {
            if run.end > self.size() || run.start > run.end {
                return Err(MemoryError::InvalidSize(run.end));
            }
            // SAFETY: the range lies inside our live mapping; MADV_DONTNEED only drops pages,
            // which the private file mapping refills from the template on the next access.
            let rc = unsafe {
                libc::madvise(
                    self.mapping.addr.as_ptr().cast::<u8>().add(run.start as usize).cast(),
                    (run.end - run.start) as usize,
                    libc::MADV_DONTNEED,
                )
            };
            if rc != 0 {
                return Err(MemoryError::Discard(io::Error::last_os_error()));
            }
        }
        Ok(())
    }

    /// The vm-memory view of guest physical memory (starting at guest address 0).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.view
    }

    /// Host virtual address of guest physical address 0.
    pub fn host_address(&self) -> u64 {
        self.mapping.addr.as_ptr() as u64
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.mapping.len as u64
    }

    /// Whether a failed `MAP_FIXED` lost this RAM's data (kernels before 6.12 can leave the
    /// range unmapped; see `fixed_map.rs`): the VM must not run or be read again, only dropped.
    pub fn is_lost(&self) -> bool {
        self.mapping.fate.get().data_lost()
    }

    /// Test aid: leaves the RAM as a failed `MAP_FIXED` leaves it before Linux 6.12 (the whole
    /// range unmapped) and hands that to the same failure handling a real failure gets.
    #[cfg(test)]
    pub(crate) fn fail_remap_as_before_6_12(&self) -> MemoryError {
        // SAFETY: the range is ours; the caller holds the VM, so nothing reads the range before
        // the handler below has taken the hole back or marked the range lost.
        unsafe { libc::munmap(self.mapping.addr.as_ptr(), self.mapping.len) };
        let source = io::Error::from_raw_os_error(libc::ENOMEM);
        self.mapping.fixed_map_failed(0..self.mapping.len, self.size(), source)
    }

    /// The template this RAM is a private view of, if any.
    pub fn template(&self) -> Option<&TemplateMemory> {
        match &self.backing {
            Backing::Owned(_) => None,
            Backing::Private(frozen) => Some(frozen),
        }
    }
}

/// Most bytes a layered freeze copies at once (the size of its copy buffer).
pub const FREEZE_CHUNK: u64 = MIB;

/// Fails with [`MemoryError::TooFragmented`] if an overlay of `new_runs` runs on `parent` would
/// exceed the layer or run limits.
fn check_overlay_limits(parent: &TemplateMemory, new_runs: usize) -> Result<(), MemoryError> {
    let layers = parent.depth() + 1;
    let runs = parent.overlay_runs().saturating_add(new_runs);
    if layers > MAX_TEMPLATE_LAYERS || runs > MAX_TEMPLATE_RUNS {
        return Err(MemoryError::TooFragmented { layers, runs });
    }
    Ok(())
}

/// `range` cut into consecutive pieces of at most `chunk` bytes.
fn chunks(range: Range<u64>, chunk: u64) -> impl Iterator<Item = Range<u64>> {
    let chunk = chunk.max(1);
    (range.start..range.end)
        .step_by(chunk as usize)
        .map(move |start| start..start.saturating_add(chunk).min(range.end))
}

fn create_memfd(name: &CStr) -> Result<File, MemoryError> {
    // SAFETY: `name` is a valid NUL-terminated string; the call has no memory side effects.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(MemoryError::CreateMemfd(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh file descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The data (non-hole) ranges of the first `size` bytes of `file`.
pub fn data_extents(file: &File, size: u64) -> io::Result<Vec<Range<u64>>> {
    let seek = |offset: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        // SAFETY: lseek on an fd we hold; no memory is passed.
        let at = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
        if at >= 0 {
            return Ok(Some(at as u64));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(err)
        }
    };
    let mut extents = Vec::new();
    let mut offset = 0;
    while offset < size {
        let Some(start) = seek(offset, libc::SEEK_DATA)? else {
            break;
        };
        if start >= size {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        extents.push(start..end);
        offset = end;
    }
    Ok(extents)
}

/// Marks an anonymous RAM range `MADV_DONTFORK` (a forked child gets no guest RAM). Besides
/// sparing a fork the copy, the flag keeps the range's VMAs from merging with the heap's or a
/// thread arena's anonymous memory, so each VM's RAM keeps VMAs of its own. Best effort: if the
/// kernel refuses, only the merging differs.
fn keep_apart(addr: NonNull<libc::c_void>, len: usize) {
    // SAFETY: madvise on our own mapping `addr..addr+len`; MADV_DONTFORK changes no contents.
    unsafe { libc::madvise(addr.as_ptr(), len, libc::MADV_DONTFORK) };
}

/// The holes of `0..size` between `extents` (sorted, disjoint).
fn holes(extents: &[Range<u64>], size: u64) -> Vec<Range<u64>> {
    let mut holes = Vec::new();
    let mut at = 0;
    for extent in extents {
        if extent.start > at {
            holes.push(at..extent.start);
        }
        at = at.max(extent.end);
    }
    if at < size {
        holes.push(at..size);
    }
    holes
}

/// The holes to fill with zeros so that clones map few holes anonymously: every hole shorter
/// than [`MIN_ANON_HOLE`], then, beyond the [`MAX_ANON_HOLES`] largest, the smallest ones while
/// the zeros added stay within the data bytes / [`MAX_FILL_DIVISOR`].
fn holes_to_fill(extents: &[Range<u64>], size: u64) -> Vec<Range<u64>> {
    let (mut fill, mut keep): (Vec<_>, Vec<_>) = holes(extents, size)
        .into_iter()
        .partition(|h| h.end - h.start < MIN_ANON_HOLE);
    if keep.len() > MAX_ANON_HOLES {
        // Largest first; of equal ones the higher (RAM's top is where guests leave holes).
        keep.sort_by_key(|h| std::cmp::Reverse((h.end - h.start, h.start)));
        let data: u64 = extents.iter().map(|e| e.end - e.start).sum();
        let mut budget = data / MAX_FILL_DIVISOR;
        for hole in keep.drain(MAX_ANON_HOLES..).rev() {
            let len = hole.end - hole.start;
            if len > budget {
                break;
            }
            budget -= len;
            fill.push(hole);
        }
    }
    fill.sort_by_key(|h| h.start);
    fill
}

/// Writes zeros into the holes [`holes_to_fill`] picks (before sealing; they become data).
fn fill_small_holes(file: &File, size: u64) -> io::Result<()> {
    const CHUNK: usize = MIB as usize;
    let zeros = vec![0u8; CHUNK];
    for hole in holes_to_fill(&data_extents(file, size)?, size) {
        let mut at = hole.start;
        while at < hole.end {
            let n = CHUNK.min((hole.end - at) as usize);
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
    }
    Ok(())
}

/// The pieces of a template whose layer `top` maps `runs` (sorted, disjoint) over `below`.
fn overlay_pieces(below: &[Piece], runs: &[Range<u64>], top: &FrozenMemory) -> Vec<Piece> {
    let mut out = Vec::with_capacity(below.len() + runs.len());
    let mut first = 0;
    for piece in below {
        while first < runs.len() && runs[first].end <= piece.range.start {
            first += 1;
        }
        let mut start = piece.range.start;
        let mut i = first;
        while i < runs.len() && runs[i].start < piece.range.end {
            if runs[i].start > start {
                out.push(Piece {
                    range: start..runs[i].start,
                    memory: piece.memory.clone(),
                });
            }
            start = start.max(runs[i].end);
            i += 1;
        }
        if start < piece.range.end {
            out.push(Piece {
                range: start..piece.range.end,
                memory: piece.memory.clone(),
            });
        }
    }
    out.extend(runs.iter().map(|r| Piece {
        range: r.clone(),
        memory: top.clone(),
    }));
    out.sort_by_key(|p| p.range.start);
    out
}

fn add_seals(file: &File, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS on an fd we own; no memory is passed.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn get_seals(file: &File) -> io::Result<libc::c_int> {
    // SAFETY: F_GET_SEALS on an fd we own; no memory is passed.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(seals)
}

#[cfg(test)]
mod freeze_and_remap_tests {
    use super::*;

    #[test]
    fn test_ram_freezes_while_a_child_forked_meanwhile_has_not_exec_yet() {
        // A process that starts cells forks them; between fork and exec the child must not hold
        // a writable shared mapping of guest RAM, or sealing the memfd fails with EBUSY.
        let mut ram = GuestRam::new_owned(16 * PAGE_SIZE).expect("guest RAM");
        let pagemap = PageMap::open().expect("pagemap");
        let mut pipe = [0; 2];
        // SAFETY: pipe writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: the child only calls async-signal-safe read and _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let mut byte = 0u8;
            // SAFETY: closes its copy of the write end, blocks until the parent closes its
            // own, then leaves.
            unsafe {
                libc::close(pipe[1]);
                libc::read(pipe[0], (&mut byte as *mut u8).cast(), 1);
                libc::_exit(0);
            }
        }
        assert!(pid > 0, "fork: {}", io::Error::last_os_error());
        let frozen = ram.freeze(&pagemap);
        // SAFETY: closing our pipe ends releases the child; then it is reaped.
        unsafe {
            libc::close(pipe[0]);
            libc::close(pipe[1]);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        frozen.expect("frozen while a forked child exists");
    }

    fn template_of_depth(depth: usize, runs_per_overlay: usize) -> TemplateMemory {
        let base = FrozenMemory::new_sealed_with(64 * PAGE_SIZE, |_| Ok(())).expect("base");
        let overlays = (1..depth)
            .map(|_| Overlay {
                memory: base.clone(),
                runs: (0..runs_per_overlay as u64)
                    .map(|i| i * 2 * PAGE_SIZE..(i * 2 + 1) * PAGE_SIZE)
                    .collect(),
            })
            .collect();
        TemplateMemory {
            inner: Arc::new(Layers {
                base,
                overlays,
                pieces: Vec::new(),
                data_runs: OnceLock::new(),
            }),
        }
    }

    #[test]
    fn test_overlay_limits_refuse_one_layer_too_many_and_one_run_too_many() {
        let full_depth = template_of_depth(MAX_TEMPLATE_LAYERS, 0);
        assert!(matches!(
            check_overlay_limits(&full_depth, 1),
            Err(MemoryError::TooFragmented { layers, .. }) if layers == MAX_TEMPLATE_LAYERS + 1
        ));
        let room = template_of_depth(MAX_TEMPLATE_LAYERS - 1, 0);
        assert!(check_overlay_limits(&room, MAX_TEMPLATE_RUNS).is_ok());
        assert!(matches!(
            check_overlay_limits(&room, MAX_TEMPLATE_RUNS + 1),
            Err(MemoryError::TooFragmented { runs, .. }) if runs == MAX_TEMPLATE_RUNS + 1
        ));
        let some_runs = template_of_depth(2, 10);
        assert!(check_overlay_limits(&some_runs, MAX_TEMPLATE_RUNS - 10).is_ok());
        assert!(check_overlay_limits(&some_runs, MAX_TEMPLATE_RUNS - 9).is_err());
    }

    #[test]
    fn test_a_mapping_that_lost_its_range_to_another_mapping_does_not_unmap_it_on_drop() {
        let file = create_memfd(c"cowvm-test").expect("memfd");
        file.set_len(4 * PAGE_SIZE).expect("size");
        let mapping = HostMapping::map(file.as_fd(), 4 * PAGE_SIZE, RAM_PROT, PRIVATE_FLAGS, None).expect("map");
        let base = mapping.addr;
        // A failed MAP_FIXED before 6.12 leaves the range unmapped; another mmap lands in it.
        // SAFETY: the range is the test's own mapping, not used again until the check below.
        unsafe { libc::munmap(base.as_ptr(), mapping.len) };
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE;
        // SAFETY: NOREPLACE into the hole the test just made; the page is the "other" mapping.
        let other = unsafe { libc::mmap(base.as_ptr(), PAGE_SIZE as usize, RAM_PROT, flags, -1, 0) };
        assert_eq!(other, base.as_ptr());
        let error = mapping.fixed_map_failed(
            0..mapping.len,
            4 * PAGE_SIZE,
            io::Error::from_raw_os_error(libc::ENOMEM),
        );
        assert!(matches!(error, MemoryError::RamLost { .. }));
        drop(mapping);
        assert!(
            fixed_map::range_is_mapped(base, PAGE_SIZE as usize),
            "dropping the lost mapping left the other mapping alone"
        );
        // SAFETY: the other mapping is the test's own page.
        unsafe { libc::munmap(other, PAGE_SIZE as usize) };
    }

    #[test]
    fn test_a_run_larger_than_the_chunk_is_cut_into_whole_consecutive_chunks() {
        let run = 3 * PAGE_SIZE..3 * PAGE_SIZE + 2 * FREEZE_CHUNK + 5 * PAGE_SIZE;
        let pieces: Vec<_> = chunks(run.clone(), FREEZE_CHUNK).collect();
        assert_eq!(pieces.len(), 3);
        assert!(pieces
            .iter()
            .all(|p| p.end - p.start <= FREEZE_CHUNK && p.start < p.end));
        assert_eq!(pieces[0].start, run.start);
        assert_eq!(pieces[2].end, run.end);
        assert!(pieces.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(
            chunks(0..PAGE_SIZE, FREEZE_CHUNK).collect::<Vec<_>>(),
            vec![0..PAGE_SIZE]
        );
        assert_eq!(chunks(0..0, FREEZE_CHUNK).count(), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    #[test]
    fn test_short_holes_are_filled_and_long_ones_kept() {
        let extents = vec![P..2 * P, 3 * P..4 * P, 100 * P..101 * P];
        let fill = holes_to_fill(&extents, 200 * P);
        assert_eq!(fill, vec![0..P, 2 * P..3 * P]);
    }

    #[test]
    fn test_holes_beyond_the_limit_are_filled_smallest_first() {
        let gap = MIN_ANON_HOLE;
        let data = 8 * gap;
        let extents: Vec<Range<u64>> = (0..MAX_ANON_HOLES as u64 + 2)
            .map(|i| {
                let start = i * (data + gap) + gap + if i == 0 { 0 } else { i * P };
                start..start + data
            })
            .collect();
        let size = extents.last().map_or(0, |e| e.end);
        let fill = holes_to_fill(&extents, size);
        assert_eq!(holes(&extents, size).len() - fill.len(), MAX_ANON_HOLES);
        assert!(fill.iter().all(|h| h.end - h.start <= gap + P), "{fill:?}");
    }

    #[test]
    fn test_a_thinly_spread_template_keeps_its_holes_rather_than_grow_towards_its_ram_size() {
        // One data page per MiB of a 64 MiB guest: filling all but 4 holes would add ~60 MiB.
        let extents: Vec<Range<u64>> = (0..64u64).map(|i| i * 256 * P..i * 256 * P + P).collect();
        let size = 64 * 256 * P;
        let filled: u64 = holes_to_fill(&extents, size).iter().map(|h| h.end - h.start).sum();
        assert!(filled <= 64 * P / MAX_FILL_DIVISOR, "filled {filled} bytes");
    }

    #[test]
    fn test_overlay_runs_split_the_pieces_below() {
        let base = FrozenMemory::new_sealed_with(64 * P, |f| f.write_all_at(&[1], 0)).expect("memfd");
        let top = FrozenMemory::new_sealed_with(64 * P, |_| Ok(())).expect("memfd");
        let below = vec![Piece {
            range: 0..32 * P,
            memory: base.clone(),
        }];
        let pieces = overlay_pieces(&below, &[2 * P..4 * P, 30 * P..40 * P], &top);
        let ranges: Vec<_> = pieces.iter().map(|p| p.range.clone()).collect();
        assert_eq!(ranges, vec![0..2 * P, 2 * P..4 * P, 4 * P..30 * P, 30 * P..40 * P]);
        assert!(Arc::ptr_eq(&pieces[1].memory.inner, &top.inner));
        assert!(Arc::ptr_eq(&pieces[2].memory.inner, &base.inner));
    }
}
