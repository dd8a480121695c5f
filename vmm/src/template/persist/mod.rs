//! Templates on disk, so that they survive a restart. Each template is two files in the state
//! directory, both mode 0600 and both written atomically (temporary file, fsync, rename, fsync of
//! the directory):
//!
//! - `<id>.<nonce>.mem`: a sparse file of the template's RAM holding only its data (holes stay
//!   holes). For a layered template (frozen from a clone) it holds only the template's own
//!   overlay pages; the state file names the parent template the overlay lies on;
//! - `<id>.state`: magic, format version, payload length, CRC-64 of the payload, then the
//!   payload (JSON): the template id, the captured VM state, the memory file's name, size and
//!   checksum, and for a layered template the parent's id, the parent's memory checksum and the
//!   overlay's runs.
//!
//! The memory checksum (format version 2) covers the logical content page by page, see
//! [`checksum`]; version-1 files are still read and verified by their own rule. Format version 3
//! may hold more than one vCPU in the VM state (up to [`MAX_VCPUS`]); versions 1 and 2 hold
//! exactly one, and a file of those versions claiming more is refused.
//!
//! The state file is the commit point: it is renamed into place last, and a memory file is never
//! overwritten (each save gets a fresh nonce), so a crash at any moment leaves the old template
//! or the new one. Loading copies the data into a new sealed memfd (never maps the file: a file on
//! a disk filesystem may be mapped with large folios, and one copy-on-write would then drop the
//! whole folio), so clones of a reloaded template share pages as before.
//!
//! [`load_all`] is the start-up pass over a state directory: what it refuses is moved into
//! `quarantine/` unchanged, never deleted.

mod checksum;
pub mod counters;
pub mod names;
mod scan;

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::layout::{MAX_MEMORY, MAX_VCPUS, MIN_MEMORY};
use crate::memory::{FrozenMemory, MemoryError, TemplateMemory, MAX_TEMPLATE_RUNS, PAGE_SIZE};
use crate::template::Template;
use crate::vm::VmState;

pub use counters::Counters;
pub use scan::{load_all, Startup};

/// First bytes of every state file.
pub const MAGIC: &[u8; 8] = b"COWVMTPL";
/// The state-file format this cowvm writes.
pub const FORMAT_VERSION: u32 = 3;
/// The oldest format this cowvm still reads (version 1: memory checksum over data extents).
pub const OLDEST_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8 + 8;
/// Largest state file read (the VM state plus at most `MAX_TEMPLATE_RUNS` runs is far smaller).
const MAX_STATE_FILE: u64 = 16 << 20;
/// Bytes copied per read while saving.
const COPY_CHUNK: usize = 1 << 20;

/// Errors of saving or loading a template.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The file does not start with the magic bytes.
    #[error("{0} is not a cowvm template state file (bad magic)")]
    BadMagic(PathBuf),
    /// The format version is not one this cowvm reads.
    #[error("{path} has format version {found}; this cowvm reads versions {OLDEST_VERSION} to {FORMAT_VERSION}")]
    UnknownVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// A checksum does not match.
    #[error("{path}: {what} checksum mismatch (stored {stored:#018x}, computed {computed:#018x})")]
    BadChecksum {
        /// The file.
        path: PathBuf,
        /// Which checksum.
        what: &'static str,
        /// The stored value.
        stored: u64,
        /// The computed value.
        computed: u64,
    },
    /// The payload is malformed or fails validation.
    #[error("{path}: malformed payload: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A file that must be a regular file is something else (never opened, so never blocks).
    #[error("{path} is a {kind}, not a regular file")]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// A layered template's parent is not there (or was refused, or is not the one it was saved on).
    #[error("{path}: its parent template {parent} {why}")]
    Parent {
        /// The state file.
        path: PathBuf,
        /// The parent's id.
        parent: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The state directory itself cannot be used.
    #[error("state directory {path}: {reason}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Building the template memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// What a layered template's state file records about the template it lies on.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ParentRef {
    /// The parent template's id.
    id: String,
    /// The parent's memory checksum when this template was saved.
    memory_crc64: u64,
    /// The runs of this template's memory file mapped over the parent, `[start, end)` bytes.
    runs: Vec<[u64; 2]>,
}

#[derive(Serialize, Deserialize)]
struct Payload<S> {
    id: String,
    memory_file: String,
    memory_size: u64,
    memory_crc64: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent: Option<ParentRef>,
    state: S,
}

/// A template read back from disk.
pub struct LoadedTemplate {
    /// The id it was saved under.
    pub id: String,
    /// The template.
    pub template: Template,
    /// The template it is layered on, for a layered template.
    pub parent: Option<String>,
    /// The checksum of its memory file (what children record about it).
    pub memory_crc64: u64,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PersistError + 'a {
    move |source| PersistError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn malformed(path: &Path, reason: impl Into<String>) -> PersistError {
    PersistError::Malformed {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// What kind of file a non-regular file type is, for messages.
fn kind_of(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "directory"
    } else if file_type.is_symlink() {
        "symbolic link"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "device"
    } else {
        "regular file"
    }
}

/// Opens `path` for reading only if it is a regular file: symbolic links are not followed and
/// FIFOs do not block (`O_NOFOLLOW | O_NONBLOCK`, then the type is checked on the open file).
fn open_regular(path: &Path) -> Result<File, PersistError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_file() {
            return Err(PersistError::NotRegular {
                path: path.to_owned(),
                kind: kind_of(meta.file_type()),
            });
        }
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => PersistError::NotRegular {
                path: path.to_owned(),
                kind: "symbolic link",
            },
            _ => io_err("open", path)(e),
        })?;
    let file_type = file.metadata().map_err(io_err("stat", path))?.file_type();
    if !file_type.is_file() {
        return Err(PersistError::NotRegular {
            path: path.to_owned(),
            kind: kind_of(file_type),
        });
    }
    Ok(file)
}

fn create_private(path: &Path) -> Result<File, PersistError> {
    OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("create", path))
}

fn commit(tmp: &Path, file: &File, dest: &Path, dir: &Path) -> Result<(), PersistError> {
    file.sync_all().map_err(io_err("fsync", tmp))?;
    std::fs::rename(tmp, dest).map_err(io_err("rename into place", dest))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Checks that `id` can be part of a file name (letters, digits, '-' and '_').
fn check_id(id: &str, dir: &Path) -> Result<(), PersistError> {
    if names::valid_id(id) {
        Ok(())
    } else {
        Err(malformed(dir, format!("template id {id:?} cannot name a file")))
    }
}

/// The state file of template `id` in `dir`.
pub fn state_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.state"))
}

/// Saves `template` under `id` in `dir` (which must exist), with all its data (flat).
pub fn save(dir: &Path, id: &str, template: &Template) -> Result<(), PersistError> {
    check_id(id, dir)?;
    let sources = template
        .memory()
        .data_sources()
        .map_err(io_err("find data in template", dir))?;
    write_template(dir, id, template, sources, None)
}

/// Saves `template`, which is `parent` (saved as `parent_id` in `dir`) with one more overlay
/// (or `parent`'s memory itself), as that overlay's pages plus a reference to the parent.
pub fn save_layered(
    dir: &Path,
    id: &str,
    template: &Template,
    parent_id: &str,
    parent: &Template,
) -> Result<(), PersistError> {
    check_id(id, dir)?;
    let (memory, parent_memory) = (template.memory(), parent.memory());
    let (sources, runs) = if memory.same_as(parent_memory) {
        (Vec::new(), Vec::new())
    } else if memory.is_layered_on(parent_memory) {
        let (overlay, runs) = memory
            .top_overlay()
            .ok_or_else(|| malformed(dir, "a layered template without an overlay"))?;
        (runs.iter().map(|r| (r.clone(), overlay)).collect(), runs.to_vec())
    } else {
        return Err(malformed(dir, format!("{id} is not layered on {parent_id}")));
    };
    let parent_state = read_state(&state_path(dir, parent_id), parent_id)?;
    let parent_ref = ParentRef {
        id: parent_id.to_owned(),
        memory_crc64: parent_state.payload.memory_crc64,
        runs: runs.iter().map(|r| [r.start, r.end]).collect(),
    };
    write_template(dir, id, template, sources, Some(parent_ref))
}

fn write_template(
    dir: &Path,
    id: &str,
    template: &Template,
    sources: Vec<(Range<u64>, &FrozenMemory)>,
    parent: Option<ParentRef>,
) -> Result<(), PersistError> {
    let nonce = getrandom::u64().unwrap_or_else(|_| std::process::id().into());
    let memory_name = names::memory_name(id, nonce);
    let memory_path = dir.join(&memory_name);
    let memory_tmp = dir.join(format!(".{memory_name}.tmp"));
    let memory_crc64 = write_memory(&memory_tmp, template.size(), sources)?;
    let memory_file = File::open(&memory_tmp).map_err(io_err("open", &memory_tmp))?;
    commit(&memory_tmp, &memory_file, &memory_path, dir)?;

    let payload = Payload {
        id: id.to_owned(),
        memory_file: memory_name,
        memory_size: template.size(),
        memory_crc64,
        parent,
        state: template.state(),
    };
    let body = serde_json::to_vec(&payload).map_err(|e| malformed(dir, e.to_string()))?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + body.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&checksum::bytes_crc(&body).to_le_bytes());
    bytes.extend_from_slice(&body);
    let state = state_path(dir, id);
    let state_tmp = dir.join(format!(".{id}.state.{nonce:016x}.tmp"));
    let mut file = create_private(&state_tmp)?;
    file.write_all(&bytes).map_err(io_err("write", &state_tmp))?;
    commit(&state_tmp, &file, &state, dir)
}

/// Writes `sources` (later ones win) into a new sparse file of `size` bytes at `path`; returns
/// the content checksum of the file as written.
fn write_memory(path: &Path, size: u64, sources: Vec<(Range<u64>, &FrozenMemory)>) -> Result<u64, PersistError> {
    let file = create_private(path)?;
    file.set_len(size).map_err(io_err("size", path))?;
    let mut buffer = vec![0u8; COPY_CHUNK];
    for (range, source) in sources {
        let mut offset = range.start;
        while offset < range.end {
            let n = COPY_CHUNK.min((range.end - offset) as usize);
            source
                .read_at(&mut buffer[..n], offset)
                .map_err(io_err("read template", path))?;
            file.write_all_at(&buffer[..n], offset).map_err(io_err("write", path))?;
            offset += n as u64;
        }
    }
    checksum::content_crc(&file, size).map_err(io_err("read back", path))
}

/// A state file read and validated, its memory not loaded yet.
struct StateFile {
    path: PathBuf,
    version: u32,
    payload: Payload<VmState>,
}

fn le(bytes: &[u8]) -> u64 {
    bytes.iter().rev().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

/// Reads and validates the state file at `path`, which must be template `id`'s.
fn read_state(path: &Path, id: &str) -> Result<StateFile, PersistError> {
    let file = open_regular(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_STATE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("read", path))?;
    if bytes.len() as u64 > MAX_STATE_FILE {
        return Err(malformed(path, format!("larger than {MAX_STATE_FILE} bytes")));
    }
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(PersistError::BadMagic(path.to_owned()));
    }
    let version = le(&bytes[8..12]) as u32;
    if !(OLDEST_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(PersistError::UnknownVersion {
            path: path.to_owned(),
            found: version,
        });
    }
    let (len, stored) = (le(&bytes[12..20]), le(&bytes[20..28]));
    let body = &bytes[HEADER_LEN..];
    if (body.len() as u64) < len {
        return Err(malformed(path, "truncated: payload shorter than its header says"));
    }
    if body.len() as u64 > len {
        return Err(malformed(
            path,
            format!("{} trailing bytes after the payload", body.len() as u64 - len),
        ));
    }
    let computed = checksum::bytes_crc(body);
    if computed != stored {
        return Err(PersistError::BadChecksum {
            path: path.to_owned(),
            what: "state",
            stored,
            computed,
        });
    }
    let payload: Payload<VmState> = serde_json::from_slice(body).map_err(|e| malformed(path, e.to_string()))?;
    validate(path, id, version, &payload)?;
    Ok(StateFile {
        path: path.to_owned(),
        version,
        payload,
    })
}

/// The checks a payload must pass before anything is loaded from it.
fn validate(path: &Path, id: &str, version: u32, payload: &Payload<VmState>) -> Result<(), PersistError> {
    let fail = |reason: String| Err(malformed(path, reason));
    if payload.id != id {
        return fail(format!(
            "it claims template id {:?} but is named {id}.state",
            payload.id
        ));
    }
    if names::memory_id(&payload.memory_file) != Some(id) {
        return fail(format!(
            "memory file name {:?} is not {id}.<16 hex digits>.mem",
            payload.memory_file
        ));
    }
    let size = payload.memory_size;
    if size != payload.state.memory_size {
        return fail(format!(
            "memory_size {size} differs from the VM state's {}",
            payload.state.memory_size
        ));
    }
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&size) || !size.is_multiple_of(PAGE_SIZE) {
        return fail(format!(
            "memory_size {size} is not a page multiple in {MIN_MEMORY}..={MAX_MEMORY}"
        ));
    }
    if payload.state.vcpus.is_empty() || payload.state.protected_end > size {
        return fail("the VM state has no vCPU or protects memory beyond its RAM".into());
    }
    let vcpus = payload.state.vcpus.len();
    if vcpus > MAX_VCPUS || (version < 3 && vcpus != 1) {
        return fail(format!(
            "{vcpus} vCPUs in a version-{version} file (version 3 allows 1..={MAX_VCPUS}, earlier versions 1)"
        ));
    }
    if let Some(parent) = &payload.parent {
        if version < 2 {
            return fail("a version-1 file cannot be layered".into());
        }
        if !names::valid_id(&parent.id) || parent.id == id {
            return fail(format!("parent id {:?}", parent.id));
        }
        if parent.runs.len() > MAX_TEMPLATE_RUNS {
            return fail(format!(
                "{} overlay runs (at most {MAX_TEMPLATE_RUNS})",
                parent.runs.len()
            ));
        }
        let mut end = 0;
        for &[start, stop] in &parent.runs {
            if start < end || stop <= start || stop > size || start % PAGE_SIZE != 0 || stop % PAGE_SIZE != 0 {
                return fail(format!("overlay run {start:#x}..{stop:#x}"));
            }
            end = stop;
        }
    }
    Ok(())
}

impl StateFile {
    /// Loads the memory (onto `parent`'s for a layered template) and builds the template.
    fn load(self, parent: Option<&LoadedTemplate>) -> Result<LoadedTemplate, PersistError> {
        let payload = self.payload;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let memory_path = dir.join(&payload.memory_file);
        let file = open_regular(&memory_path)?;
        let size = file.metadata().map_err(io_err("stat", &memory_path))?.len();
        if size != payload.memory_size {
            return Err(malformed(
                &memory_path,
                format!("{size} bytes, the state says {}", payload.memory_size),
            ));
        }
        let bad_sum = |computed| PersistError::BadChecksum {
            path: memory_path.clone(),
            what: "memory",
            stored: payload.memory_crc64,
            computed,
        };
        if self.version == 1 {
            let computed = checksum::extent_crc(&file, size).map_err(io_err("read", &memory_path))?;
            if computed != payload.memory_crc64 {
                return Err(bad_sum(computed));
            }
        }
        let mut computed = 0;
        let frozen = FrozenMemory::new_sealed_with(size, |memfd| {
            computed = checksum::scan_content(&file, size, |at, page| memfd.write_all_at(page, at))?;
            Ok(())
        })?;
        if self.version >= 2 && computed != payload.memory_crc64 {
            return Err(bad_sum(computed));
        }
        let memory = match (&payload.parent, parent) {
            (None, _) => TemplateMemory::single(frozen),
            (Some(wanted), Some(parent)) => {
                let why = if parent.id != wanted.id {
                    Some("is not the one given")
                } else if parent.memory_crc64 != wanted.memory_crc64 {
                    Some("has other memory than when this template was saved")
                } else if parent.template.size() != size {
                    Some("has another RAM size")
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(PersistError::Parent {
                        path: self.path,
                        parent: wanted.id.clone(),
                        why,
                    });
                }
                let base = parent.template.memory();
                if wanted.runs.is_empty() {
                    base.clone()
                } else {
                    base.with_layer(frozen, wanted.runs.iter().map(|&[a, b]| a..b).collect())?
                }
            }
            (Some(wanted), None) => {
                return Err(PersistError::Parent {
                    path: self.path,
                    parent: wanted.id.clone(),
                    why: "is not loaded",
                })
            }
        };
        Ok(LoadedTemplate {
            parent: payload.parent.map(|p| p.id),
            memory_crc64: payload.memory_crc64,
            id: payload.id,
            template: Template::new(memory, payload.state),
        })
    }
}

/// The id a state-file path is named for.
fn id_of(state_file: &Path) -> Result<String, PersistError> {
    names::file_name(state_file)
        .and_then(|n| n.strip_suffix(".state"))
        .filter(|id| names::valid_id(id))
        .map(str::to_owned)
        .ok_or_else(|| malformed(state_file, "not named <id>.state"))
}

/// Loads the template whose state file is `state_file` (a flat one; a layered template needs its
/// parent and loads with [`load_all`]).
pub fn load(state_file: &Path) -> Result<LoadedTemplate, PersistError> {
    read_state(state_file, &id_of(state_file)?)?.load(None)
}

/// The ids of templates saved in `dir` that are layered on template `id`.
pub fn dependents(dir: &Path, id: &str) -> Result<Vec<String>, PersistError> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err("list", dir))?.flatten() {
        let name = entry.file_name();
        let Some(names::Name::State(child)) = name.to_str().map(names::classify) else {
            continue;
        };
        if let Ok(state) = read_state(&entry.path(), &child) {
            if state.payload.parent.is_some_and(|p| p.id == id) {
                children.push(child);
            }
        }
    }
    children.sort();
    Ok(children)
}

/// Removes template `id`'s files from `dir`: its number is recorded as used first, then the state
/// file goes (so a crash leaves no half), then its memory files. Only regular files named by
/// cowvm's scheme for this id are removed; returns the paths removed.
pub fn remove(dir: &Path, id: &str) -> Result<Vec<PathBuf>, PersistError> {
    check_id(id, dir)?;
    if let Some(number) = names::id_number(id) {
        counters::reserve_template(dir, number)?;
    }
    let mut removed = Vec::new();
    let mut remove_regular = |path: PathBuf| -> Result<(), PersistError> {
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_file() => {
                std::fs::remove_file(&path).map_err(io_err("remove", &path))?;
                removed.push(path);
                Ok(())
            }
            _ => Ok(()),
        }
    };
    remove_regular(state_path(dir, id))?;
    for entry in std::fs::read_dir(dir).map_err(io_err("list", dir))?.flatten() {
        let name = entry.file_name();
        if name.to_str().and_then(names::memory_id) == Some(id) {
            remove_regular(entry.path())?;
        }
    }
    Ok(removed)
}
