//! Loading a 64-bit ELF guest kernel (the built-in one or a user's) with linux-loader.

use std::fs::File;
use std::io::{Cursor, Read, Seek};
use std::path::{Path, PathBuf};

use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryMmap, ReadVolatile};

use crate::layout::KERNEL_START;

/// Errors from loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The kernel file could not be opened.
    #[error("cannot open kernel {path}: {source}")]
    Open {
        /// Path given.
        path: PathBuf,
        /// Error from `open(2)`.
        source: std::io::Error,
    },
    /// linux-loader refused the image (not a 64-bit ELF, segments below 1 MiB or outside RAM…).
    #[error("cannot load kernel {name} as a 64-bit ELF at or above {KERNEL_START:#x?}: {source}")]
    Elf {
        /// The kernel's name (path or "built-in").
        name: String,
        /// linux-loader's error.
        source: linux_loader::loader::Error,
    },
}

/// Where a kernel landed.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Entry point (guest physical = virtual, identity mapped).
    pub entry: GuestAddress,
    /// First byte after the highest loaded segment.
    pub end: GuestAddress,
}

fn load_image<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    name: &str,
    image: &mut F,
) -> Result<LoadedKernel, LoadError> {
    let result = Elf::load(mem, None, image, Some(KERNEL_START)).map_err(|source| LoadError::Elf {
        name: name.to_owned(),
        source,
    })?;
    Ok(LoadedKernel {
        entry: result.kernel_load,
        end: GuestAddress(result.kernel_end),
    })
}

/// Loads cowvm's built-in guest.
pub fn load_builtin(mem: &GuestMemoryMmap) -> Result<LoadedKernel, LoadError> {
    load_image(mem, "built-in", &mut Cursor::new(cowvm_guest::GUEST_ELF))
}

/// Loads the ELF at `path`.
pub fn load_file(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, LoadError> {
    let mut file = File::open(path).map_err(|source| LoadError::Open {
        path: path.to_owned(),
        source,
    })?;
    load_image(mem, &path.display().to_string(), &mut file)
}
