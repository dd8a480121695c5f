//! Guest RAM: a memfd that a running VM maps `MAP_SHARED`, that can be frozen into a sealed,
//! read-only template, and that clones map `MAP_PRIVATE` so the host kernel copies a page only
//! when a clone writes it.
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
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::pagemap::PageMap;

/// Host page size assumed for guest RAM granularity.
pub const PAGE_SIZE: u64 = 4096;

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
    /// Reading the host's page tables failed.
    #[error("reading /proc/self/pagemap failed: {0}")]
    PageMap(io::Error),
    /// Dropping private pages failed.
    #[error("madvise(MADV_DONTNEED) on guest RAM failed: {0}")]
    Discard(io::Error),
    /// vm-memory refused the region.
    #[error("vm-memory rejected the guest RAM region: {0}")]
    Region(String),
}

/// A host virtual address range this process mapped; unmapped exactly once, on drop.
struct HostMapping {
    addr: NonNull<libc::c_void>,
    len: usize,
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
        Ok(HostMapping { addr, len: size })
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
            return Err(MemoryError::Map {
                len,
                source: io::Error::last_os_error(),
            });
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
        // SAFETY: `addr..addr+len` was mapped by us and is unmapped only here, once.
        unsafe { libc::munmap(self.addr.as_ptr(), self.len) };
    }
}

/// A sealed memfd: guest RAM that will never be written again.
struct SealedMemfd {
    file: File,
    size: u64,
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
        let seals = get_seals(&file).map_err(MemoryError::Seal)?;
        let needed = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK;
        if seals & needed != needed {
            return Err(MemoryError::NotSealed(seals));
        }
        let size = file.metadata().map_err(MemoryError::Seal)?.len();
        Ok(FrozenMemory {
            inner: Arc::new(SealedMemfd { file, size }),
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
        fill(&file).map_err(MemoryError::CreateMemfd)?;
        add_seals(&file, FROZEN_SEALS).map_err(MemoryError::Seal)?;
        FrozenMemory::from_sealed(file)
    }

    /// The byte ranges of the memfd that hold data (`SEEK_DATA`/`SEEK_HOLE`); the rest are holes
    /// that read as zeros.
    pub fn data_extents(&self) -> io::Result<Vec<Range<u64>>> {
        data_extents(&self.inner.file, self.size())
    }

    /// Reads `buf.len()` bytes at `offset` (holes read as zeros without allocating pages).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.file.read_exact_at(buf, offset)
    }

    /// Maps the frozen memory read-only and shared: the view sees the template's own pages.
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

struct Layers {
    base: FrozenMemory,
    overlays: Vec<Overlay>,
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
        TemplateMemory {
            inner: Arc::new(Layers {
                base,
                overlays: Vec::new(),
            }),
        }
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
        overlays.push(overlay);
        Ok(TemplateMemory {
            inner: Arc::new(Layers {
                base: self.inner.base.clone(),
                overlays,
            }),
        })
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

    /// Maps a template privately: reads share the template's pages, writes copy them. A layered
    /// template maps its base, then each overlay run `MAP_FIXED` over it.
    pub fn new_private(template: &TemplateMemory) -> Result<Self, MemoryError> {
        let base = template.base();
        let mapping = HostMapping::map(base.as_fd(), base.size(), RAM_PROT, PRIVATE_FLAGS, None)?;
        for overlay in &template.inner.overlays {
            for run in &overlay.runs {
                mapping.map_over(overlay.memory.as_fd(), run.clone())?;
            }
        }
        let view = mapping.guest_view(RAM_PROT, PRIVATE_FLAGS)?;
        Ok(GuestRam {
            view,
            mapping,
            backing: Backing::Private(template.clone()),
        })
    }

    /// Freezes owned RAM without copying it: remaps the same memfd `MAP_PRIVATE | MAP_FIXED` at
    /// the same host address (KVM's MMU notifier drops its stale translations), then seals the
    /// memfd, which the kernel allows only once no writable shared mapping remains. The VM keeps
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
        let remapped = HostMapping::map(
            file.as_fd(),
            self.size(),
            RAM_PROT,
            PRIVATE_FLAGS,
            Some(self.mapping.addr),
        )?;
        // The old mapping object describes the range that MAP_FIXED just replaced; forgetting it
        // leaves `remapped` as the range's only owner.
        std::mem::forget(std::mem::replace(&mut self.mapping, remapped));
        self.view = self.mapping.guest_view(RAM_PROT, PRIVATE_FLAGS)?;
        add_seals(file, FROZEN_SEALS).map_err(MemoryError::Seal)?;
        let sealed = file.try_clone().map_err(MemoryError::Seal)?;
        let template = TemplateMemory::single(FrozenMemory::from_sealed(sealed)?);
        self.backing = Backing::Private(template.clone());
        Ok(template)
    }

    fn freeze_layer(&self, parent: &TemplateMemory, pagemap: &PageMap) -> Result<TemplateMemory, MemoryError> {
        let runs = self.private_runs(pagemap)?;
        if runs.is_empty() {
            return Ok(parent.clone());
        }
        let file = create_memfd(c"cowvm-template-overlay")?;
        let size = self.size();
        file.set_len(size)
            .map_err(|source| MemoryError::Resize { size, source })?;
        let mut buffer = Vec::new();
        for run in &runs {
            buffer.resize((run.end - run.start) as usize, 0);
            self.view
                .read_slice(&mut buffer, GuestAddress(run.start))
                .map_err(|e| MemoryError::Region(e.to_string()))?;
            file.write_all_at(&buffer, run.start)
                .map_err(MemoryError::CreateMemfd)?;
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
    /// again. `MADV_DONTNEED` on a private file mapping frees the copies, and KVM's MMU notifier
    /// drops its translations of the range.
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

    /// The template this RAM is a private view of, if any.
    pub fn template(&self) -> Option<&TemplateMemory> {
        match &self.backing {
            Backing::Owned(_) => None,
            Backing::Private(frozen) => Some(frozen),
        }
    }
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
