//! Loading a 64-bit ELF guest kernel (the built-in one or a user's) with linux-loader.

use std::fs::File;
use std::io::{Cursor, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

impl LoadError {
    /// The error as a client should see it: the kernel named by its file name (never a host path).
    pub fn client_message(&self) -> String {
        let file_name = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        match self {
            LoadError::Open { path, source } => format!("cannot open kernel {:?}: {}", file_name(path), source.kind()),
            LoadError::Elf { name, source } => format!(
                "kernel {:?} is not a 64-bit ELF whose segments load at or above {:#x} inside the guest's RAM ({source})",
                file_name(Path::new(name)),
                KERNEL_START.0
            ),
        }
    }
}

/// A kernel image held in memory, e.g. read by a cell from the sealed memfd its supervisor
/// sent (a cell opens no files). Cheap to clone.
#[derive(Clone, PartialEq, Eq)]
pub struct KernelImage {
    name: String,
    bytes: Arc<[u8]>,
}

impl KernelImage {
    /// The image `bytes`, named `name` in errors (the path it was read from).
    pub fn new(name: impl Into<String>, bytes: impl Into<Arc<[u8]>>) -> Self {
        KernelImage {
            name: name.into(),
            bytes: bytes.into(),
        }
    }

    /// The name errors give it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The image.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl std::fmt::Debug for KernelImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelImage")
            .field("name", &self.name)
            .field("len", &self.bytes.len())
            .finish()
    }
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

/// Loads an ELF image held in memory.
pub fn load_bytes(mem: &GuestMemoryMmap, image: &KernelImage) -> Result<LoadedKernel, LoadError> {
    load_image(mem, image.name(), &mut Cursor::new(image.bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_an_image_in_memory_loads_where_the_same_bytes_from_a_file_would() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("guest memory");
        let builtin = load_builtin(&mem).expect("built-in guest");
        let image = KernelImage::new("guest.elf", cowvm_guest::GUEST_ELF.to_vec());
        let in_memory = load_bytes(&mem, &image).expect("the same image from memory");
        assert_eq!((builtin.entry, builtin.end), (in_memory.entry, in_memory.end));
    }

    #[test]
    fn test_a_bad_image_is_named_by_its_file_name_only() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("guest memory");
        let junk = KernelImage::new("/srv/kernels/junk.elf", b"not an ELF".to_vec());
        let message = load_bytes(&mem, &junk).expect_err("junk").client_message();
        assert!(message.contains("\"junk.elf\""), "{message}");
        assert!(!message.contains("/srv"), "{message}");
    }
}
