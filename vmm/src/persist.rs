//! Templates on disk, so that they survive a restart. Each template is two files in the state
//! directory, both mode 0600 and both written atomically (temporary file, fsync, rename, fsync of
//! the directory):
//!
//! - `<id>.<nonce>.mem`: a sparse copy of the template's RAM holding only its data (holes stay
//!   holes);
//! - `<id>.state`: magic, format version, payload length, CRC-64 of the payload, then the
//!   payload (JSON): the captured VM state, the memory file's name, size and CRC-64.
//!
//! The state file is the commit point: it is renamed into place last, and a memory file is never
//! overwritten (each save gets a fresh nonce), so a crash at any moment leaves the old template
//! or the new one. Loading copies the data into a new sealed memfd (never maps the file: a file on
//! a disk filesystem may be mapped with large folios, and one copy-on-write would then drop the
//! whole folio), so clones of a reloaded template share pages as before.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::memory::{data_extents, FrozenMemory, MemoryError, TemplateMemory};
use crate::template::Template;
use crate::vm::VmState;

/// First bytes of every state file.
pub const MAGIC: &[u8; 8] = b"COWVMTPL";
/// The state-file format this cowvm writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8 + 8;
const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
/// Bytes copied per read while saving or loading.
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
    #[error("{path} has format version {found}; this cowvm reads version {FORMAT_VERSION} only (file left as it is)")]
    UnknownVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// A checksum does not match.
    #[error("{path}: {what} checksum mismatch (stored {stored:#018x}, computed {computed:#018x}); file left as it is")]
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
    /// The payload is malformed.
    #[error("{path}: malformed payload: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Building the template memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

#[derive(Serialize, Deserialize)]
struct Payload<S> {
    id: String,
    memory_file: String,
    memory_size: u64,
    memory_crc64: u64,
    state: S,
}

/// A template read back from disk.
pub struct LoadedTemplate {
    /// The id it was saved under.
    pub id: String,
    /// The template.
    pub template: Template,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PersistError + 'a {
    move |source| PersistError::Io {
        what,
        path: path.to_owned(),
        source,
    }
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
    let ok =
        !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(PersistError::Malformed {
            path: dir.to_owned(),
            reason: format!("template id {id:?} cannot name a file"),
        })
    }
}

/// The state file of template `id` in `dir`.
pub fn state_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.state"))
}

/// Saves `template` under `id` in `dir` (which must exist).
pub fn save(dir: &Path, id: &str, template: &Template) -> Result<(), PersistError> {
    check_id(id, dir)?;
    let nonce = getrandom::u64().unwrap_or_else(|_| std::process::id().into());
    let memory_name = format!("{id}.{nonce:016x}.mem");
    let memory_path = dir.join(&memory_name);
    let memory_tmp = dir.join(format!(".{memory_name}.tmp"));
    let memory_crc64 = write_memory(&memory_tmp, template.memory())?;
    let memory_file = File::open(&memory_tmp).map_err(io_err("open", &memory_tmp))?;
    commit(&memory_tmp, &memory_file, &memory_path, dir)?;

    let payload = Payload {
        id: id.to_owned(),
        memory_file: memory_name,
        memory_size: template.size(),
        memory_crc64,
        state: template.state(),
    };
    let body = serde_json::to_vec(&payload).map_err(|e| PersistError::Malformed {
        path: dir.to_owned(),
        reason: e.to_string(),
    })?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + body.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&CRC.checksum(&body).to_le_bytes());
    bytes.extend_from_slice(&body);
    let state = state_path(dir, id);
    let state_tmp = dir.join(format!(".{id}.state.{nonce:016x}.tmp"));
    let mut file = create_private(&state_tmp)?;
    file.write_all(&bytes).map_err(io_err("write", &state_tmp))?;
    commit(&state_tmp, &file, &state, dir)
}

/// Writes the template's data into a new sparse file at `path`; returns the CRC-64 of the data
/// extents as the file then holds them.
fn write_memory(path: &Path, memory: &TemplateMemory) -> Result<u64, PersistError> {
    let file = create_private(path)?;
    file.set_len(memory.size()).map_err(io_err("size", path))?;
    let mut buffer = vec![0u8; COPY_CHUNK];
    let sources = memory.data_sources().map_err(io_err("find data in template", path))?;
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
    data_crc(&file, memory.size(), path)
}

/// CRC-64 over the data extents of `file` (offsets and bytes).
fn data_crc(file: &File, size: u64, path: &Path) -> Result<u64, PersistError> {
    let mut digest = CRC.digest();
    let mut buffer = vec![0u8; COPY_CHUNK];
    for range in data_extents(file, size).map_err(io_err("find data in", path))? {
        digest.update(&range.start.to_le_bytes());
        let mut offset = range.start;
        while offset < range.end {
            let n = COPY_CHUNK.min((range.end - offset) as usize);
            file.read_exact_at(&mut buffer[..n], offset)
                .map_err(io_err("read", path))?;
            digest.update(&buffer[..n]);
            offset += n as u64;
        }
    }
    Ok(digest.finalize())
}

/// Loads the template whose state file is `state_file`.
pub fn load(state_file: &Path) -> Result<LoadedTemplate, PersistError> {
    let bytes = std::fs::read(state_file).map_err(io_err("read", state_file))?;
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(PersistError::BadMagic(state_file.to_owned()));
    }
    let word = |at: usize, n: usize| {
        bytes[at..at + n]
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    };
    let version = word(8, 4) as u32;
    if version != FORMAT_VERSION {
        return Err(PersistError::UnknownVersion {
            path: state_file.to_owned(),
            found: version,
        });
    }
    let len = word(12, 8) as usize;
    let stored = word(20, 8);
    let body = bytes
        .get(HEADER_LEN..HEADER_LEN.saturating_add(len))
        .filter(|b| b.len() == len)
        .ok_or_else(|| PersistError::Malformed {
            path: state_file.to_owned(),
            reason: "payload shorter than its header says".into(),
        })?;
    let computed = CRC.checksum(body);
    if computed != stored {
        return Err(PersistError::BadChecksum {
            path: state_file.to_owned(),
            what: "state",
            stored,
            computed,
        });
    }
    let payload: Payload<VmState> = serde_json::from_slice(body).map_err(|e| PersistError::Malformed {
        path: state_file.to_owned(),
        reason: e.to_string(),
    })?;
    let dir = state_file.parent().unwrap_or(Path::new("."));
    if payload.memory_file.contains('/') || payload.memory_file.starts_with('.') {
        return Err(PersistError::Malformed {
            path: state_file.to_owned(),
            reason: "memory file name".into(),
        });
    }
    let memory_path = dir.join(&payload.memory_file);
    let file = File::open(&memory_path).map_err(io_err("open", &memory_path))?;
    let size = file.metadata().map_err(io_err("stat", &memory_path))?.len();
    if size != payload.memory_size {
        return Err(PersistError::Malformed {
            path: memory_path,
            reason: format!("{size} bytes, the state says {}", payload.memory_size),
        });
    }
    let computed = data_crc(&file, size, &memory_path)?;
    if computed != payload.memory_crc64 {
        return Err(PersistError::BadChecksum {
            path: memory_path,
            what: "memory",
            stored: payload.memory_crc64,
            computed,
        });
    }
    let frozen = FrozenMemory::new_sealed_with(size, |memfd| {
        let mut buffer = vec![0u8; COPY_CHUNK];
        for range in data_extents(&file, size)? {
            let mut offset = range.start;
            while offset < range.end {
                let n = COPY_CHUNK.min((range.end - offset) as usize);
                file.read_exact_at(&mut buffer[..n], offset)?;
                memfd.write_all_at(&buffer[..n], offset)?;
                offset += n as u64;
            }
        }
        Ok(())
    })?;
    Ok(LoadedTemplate {
        id: payload.id,
        template: Template::new(TemplateMemory::single(frozen), payload.state),
    })
}

/// The memory file a state file names, if its payload can be read at all.
fn referenced_memory_file(state: &Path) -> Option<String> {
    let bytes = std::fs::read(state).ok()?;
    let body = bytes.get(HEADER_LEN..)?;
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("memory_file")?.as_str().map(str::to_owned)
}

/// Loads every `*.state` file in `dir`: the templates that loaded, and an error for each that
/// did not (its files are left as they are). Leftovers of saves that never committed — temporary
/// files, and memory files no state file names — are removed.
pub fn load_all(dir: &Path) -> Result<(Vec<LoadedTemplate>, Vec<PersistError>), PersistError> {
    let mut loaded = Vec::new();
    let mut failed = Vec::new();
    let names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io_err("list", dir))?
        .filter_map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
        .collect();
    let mut states: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".state") && !n.starts_with('.'))
        .collect();
    states.sort();
    let referenced: Vec<String> = states
        .iter()
        .filter_map(|n| referenced_memory_file(&dir.join(n)))
        .collect();
    for name in &names {
        let uncommitted = name.starts_with('.') && name.ends_with(".tmp");
        let orphan = name.ends_with(".mem") && !referenced.contains(name);
        if uncommitted || orphan {
            let _ = std::fs::remove_file(dir.join(name));
        }
    }
    for name in states {
        match load(&dir.join(name)) {
            Ok(template) => loaded.push(template),
            Err(e) => failed.push(e),
        }
    }
    Ok((loaded, failed))
}

/// Removes template `id`'s files from `dir` (state file first, so a crash leaves no half).
pub fn remove(dir: &Path, id: &str) -> Result<(), PersistError> {
    check_id(id, dir)?;
    let state = state_path(dir, id);
    let memory_file = referenced_memory_file(&state);
    match std::fs::remove_file(&state) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err("remove", &state)(e)),
        _ => {}
    }
    if let Some(name) = memory_file.filter(|n| !n.contains('/')) {
        let _ = std::fs::remove_file(dir.join(name));
    }
    Ok(())
}
