//! Id counters that survive restarts, in [`COUNTERS_FILE`] (JSON, written atomically):
//!
//! - `next_template`: the lowest template number not yet handed out. A deleted template's
//!   number is recorded before its files go, so no id is ever given out twice;
//! - `generation_block`: generation ids are `block << 32 | n`; every start of a server takes the
//!   next block, so ids from different runs never collide (2^32 per run); so does every cell
//!   a server starts ([`take_block`]), so cells' ids never collide either.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::names::COUNTERS_FILE;
use super::{commit, create_private, io_err, open_regular, PersistError};

/// Generation ids of one run share the block number in their top 32 bits.
pub const GENERATION_BLOCK_SHIFT: u32 = 32;

/// Serialises read-modify-write of the counters file within the process.
static LOCK: Mutex<()> = Mutex::new(());

/// The counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Lowest template number never handed out.
    pub next_template: u64,
    /// Generation block of the latest run.
    pub generation_block: u64,
}

/// Reads the counters of `dir` (all zero when the file does not exist yet).
pub fn read(dir: &Path) -> Result<Counters, PersistError> {
    let path = dir.join(COUNTERS_FILE);
    let mut file = match open_regular(&path) {
        Err(PersistError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Counters::default())
        }
        other => other?,
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text).map_err(io_err("read", &path))?;
    serde_json::from_str(&text).map_err(|e| PersistError::Malformed {
        path,
        reason: e.to_string(),
    })
}

/// Replaces the counters of `dir` atomically.
pub fn write(dir: &Path, counters: &Counters) -> Result<(), PersistError> {
    let nonce = getrandom::u64().unwrap_or_else(|_| std::process::id().into());
    let tmp = dir.join(format!(".{COUNTERS_FILE}.{nonce:016x}.tmp"));
    let text = serde_json::to_vec(counters).map_err(|e| PersistError::Malformed {
        path: tmp.clone(),
        reason: e.to_string(),
    })?;
    let mut file: File = create_private(&tmp)?;
    file.write_all(&text).map_err(io_err("write", &tmp))?;
    commit(&tmp, &file, &dir.join(COUNTERS_FILE), dir)
}

/// Records that template number `number` was handed out (so it never is again).
pub fn reserve_template(dir: &Path, number: u64) -> Result<(), PersistError> {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut counters = read(dir)?;
    if counters.next_template > number {
        return Ok(());
    }
    counters.next_template = number + 1;
    write(dir, &counters)
}

/// Takes the next generation block for a process of this run that hands out generation ids
/// of its own (a cell): records it, so that no later run takes it again, and returns its first
/// id.
pub fn take_block(dir: &Path) -> Result<u64, PersistError> {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut counters = read(dir)?;
    counters.generation_block = counters.generation_block.saturating_add(1);
    write(dir, &counters)?;
    Ok(counters.generation_block << GENERATION_BLOCK_SHIFT)
}

/// Records the counters of a new run: template numbers below `next_template` are taken, and the
/// run uses the generation block after the last one. Returns what was written.
pub fn start_run(dir: &Path, base: Counters, next_template: u64) -> Result<Counters, PersistError> {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let counters = Counters {
        next_template: base.next_template.max(next_template),
        generation_block: base.generation_block.saturating_add(1),
    };
    write(dir, &counters)?;
    Ok(counters)
}
