//! The exact names cowvm gives its files in a state directory. Only files whose names fit one of
//! these patterns are ever removed or moved, and only by the rules in [`super::scan`].

use std::path::Path;

/// The file that keeps id counters across restarts.
pub const COUNTERS_FILE: &str = "cowvm-ids.json";
/// The folder damaged or refused files are moved to, unchanged.
pub const QUARANTINE_DIR: &str = "quarantine";

/// What a name in the state directory is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Name {
    /// `<id>.state`: a template's state file (the commit point).
    State(String),
    /// `<id>.<16 hex digits>.mem`: a template's memory file.
    Memory(String),
    /// `.<id>.<16 hex>.mem.tmp`, `.<id>.state.<16 hex>.tmp` or `.cowvm-ids.json.<16 hex>.tmp`:
    /// a file of a save that never committed; carries the id it was for, if any.
    Uncommitted(Option<String>),
    /// [`COUNTERS_FILE`].
    Counters,
    /// [`QUARANTINE_DIR`].
    Quarantine,
    /// Anything else: not cowvm's, never touched.
    Other,
}

/// Checks that `id` can be part of a file name (letters, digits, '-' and '_', at most 64).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn nonce(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The number at the end of an id like `tpl-12`, if it has one.
pub fn id_number(id: &str) -> Option<u64> {
    id.rsplit('-').next().and_then(|n| n.parse().ok())
}

/// The name of template `id`'s memory file for a save with `nonce`.
pub fn memory_name(id: &str, nonce: u64) -> String {
    format!("{id}.{nonce:016x}.mem")
}

/// The id a memory-file name belongs to, if it fits `<id>.<16 hex>.mem` exactly.
pub fn memory_id(name: &str) -> Option<&str> {
    let (id, hex) = name.strip_suffix(".mem")?.rsplit_once('.')?;
    (valid_id(id) && nonce(hex)).then_some(id)
}

/// Classifies a file name.
pub fn classify(name: &str) -> Name {
    if name == COUNTERS_FILE {
        return Name::Counters;
    }
    if name == QUARANTINE_DIR {
        return Name::Quarantine;
    }
    if let Some(id) = name.strip_suffix(".state").filter(|id| valid_id(id)) {
        return Name::State(id.to_owned());
    }
    if let Some(id) = memory_id(name) {
        return Name::Memory(id.to_owned());
    }
    if let Some(inner) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) {
        if let Some(id) = memory_id(inner) {
            return Name::Uncommitted(Some(id.to_owned()));
        }
        if let Some((id, hex)) = inner.split_once(".state.") {
            if valid_id(id) && nonce(hex) {
                return Name::Uncommitted(Some(id.to_owned()));
            }
        }
        if inner
            .strip_prefix(COUNTERS_FILE)
            .and_then(|r| r.strip_prefix('.'))
            .is_some_and(nonce)
        {
            return Name::Uncommitted(None);
        }
    }
    Name::Other
}

/// The id a name in the state directory or its quarantine carries (quarantined copies may have
/// a `.N` suffix added), for keeping ids out of use.
pub fn carried_id(name: &str) -> Option<String> {
    let mut name = name;
    loop {
        match classify(name) {
            Name::State(id) | Name::Memory(id) | Name::Uncommitted(Some(id)) => return Some(id),
            _ => {}
        }
        let (rest, suffix) = name.rsplit_once('.')?;
        if suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        name = rest;
    }
}

/// The file name of `path` as UTF-8, if it has one.
pub fn file_name(path: &Path) -> Option<&str> {
    path.file_name().and_then(|n| n.to_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_only_exact_cowvm_names_are_classified_as_cowvm_files() {
        assert_eq!(classify("tpl-7.state"), Name::State("tpl-7".into()));
        assert_eq!(classify("tpl-7.0123456789abcdef.mem"), Name::Memory("tpl-7".into()));
        assert_eq!(
            classify(".tpl-7.0123456789abcdef.mem.tmp"),
            Name::Uncommitted(Some("tpl-7".into()))
        );
        assert_eq!(
            classify(".tpl-7.state.0123456789abcdef.tmp"),
            Name::Uncommitted(Some("tpl-7".into()))
        );
        assert_eq!(
            classify(".cowvm-ids.json.0123456789abcdef.tmp"),
            Name::Uncommitted(None)
        );
        for other in [
            "backup-disk.mem",
            ".editor.swp.tmp",
            "tpl-7.0123456789ABCDEF.mem",
            "tpl 7.state",
            ".tpl-7.state.tmp",
            "tpl-7.state.bak",
            "notes.txt",
        ] {
            assert_eq!(classify(other), Name::Other, "{other}");
        }
        assert_eq!(carried_id("tpl-9.state.2").as_deref(), Some("tpl-9"));
        assert_eq!(carried_id("notes.txt"), None);
    }
}
