//! The start-up pass over a state directory.
//!
//! - The directory must be a directory that neither group nor others can write.
//! - Every template whose state file is valid loads (a layered one after its parent).
//! - Whatever is refused — a damaged, truncated or foreign state file, a memory file that is
//!   missing, damaged or not a regular file, a layered template whose parent is missing — is
//!   moved, unchanged, into `quarantine/` together with the memory files named for its id, and
//!   reported with the reason. Nothing of it is deleted.
//! - Files that are not regular files (FIFOs, sockets, devices, symbolic links) are never opened.
//! - Only leftovers cowvm itself wrote, by its exact naming scheme ([`super::names`]), are
//!   removed: temporary files of saves that never committed, and memory files whose id has no
//!   state file or which their template's state file does not name. Each removal is reported.
//! - Every template number seen (in names here and in the quarantine, and in the counters file)
//!   stays out of use, and the run takes a new generation block.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::counters::{self, Counters, GENERATION_BLOCK_SHIFT};
use super::names::{self, Name, QUARANTINE_DIR};
use super::{io_err, kind_of, read_state, LoadedTemplate, PersistError, StateFile};

/// What the start-up pass found and did.
#[derive(Default)]
pub struct Startup {
    /// Templates that loaded, each after the template it is layered on.
    pub loaded: Vec<LoadedTemplate>,
    /// One line per refused template or file: which, why, and where it was moved.
    pub refused: Vec<String>,
    /// One line per file removed.
    pub removed: Vec<String>,
    /// Files left alone because they are not cowvm's.
    pub ignored: Vec<String>,
    /// The lowest template number that may be handed out.
    pub next_template: u64,
    /// The lowest generation id this run may hand out.
    pub generation_floor: u64,
}

struct Pass<'a> {
    dir: &'a Path,
    quarantine: PathBuf,
    startup: Startup,
    /// Memory files by the id their name carries.
    memories: BTreeMap<String, Vec<String>>,
    /// Ids whose state file was refused.
    refused: BTreeSet<String>,
    /// Memory files that loaded templates use.
    used: BTreeSet<String>,
    highest: u64,
}

/// Checks the directory itself: a directory, not writable by group or others.
fn check_dir(dir: &Path) -> Result<(), PersistError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |reason: String| {
        Err(PersistError::StateDir {
            path: dir.to_owned(),
            reason,
        })
    };
    let meta = std::fs::metadata(dir).map_err(io_err("stat", dir))?;
    if !meta.is_dir() {
        return fail("not a directory".into());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return fail(format!(
            "mode {mode:03o} lets group or others write it; cowvm needs 0700 (run `chmod 700` on it)"
        ));
    }
    Ok(())
}

/// Loads every template saved in `dir`; see the module documentation for the rules.
pub fn load_all(dir: &Path) -> Result<Startup, PersistError> {
    check_dir(dir)?;
    let quarantine = dir.join(QUARANTINE_DIR);
    if let Ok(meta) = std::fs::symlink_metadata(&quarantine) {
        if !meta.is_dir() {
            return Err(PersistError::StateDir {
                path: dir.to_owned(),
                reason: format!("{QUARANTINE_DIR} is a {}, not a directory", kind_of(meta.file_type())),
            });
        }
    }
    let mut pass = Pass {
        dir,
        quarantine,
        startup: Startup::default(),
        memories: BTreeMap::new(),
        refused: BTreeSet::new(),
        used: BTreeSet::new(),
        highest: 0,
    };
    pass.note_quarantined_ids();
    let states = pass.sort_entries()?;
    let parsed = pass.parse(states);
    pass.load_in_order(parsed);
    pass.sweep_memory_files();
    pass.start_run()?;
    Ok(pass.startup)
}

impl Pass<'_> {
    fn note_id(&mut self, id: &str) {
        if let Some(n) = names::id_number(id) {
            self.highest = self.highest.max(n);
        }
    }

    fn note_quarantined_ids(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.quarantine) else {
            return;
        };
        for entry in entries.flatten() {
            if let Some(id) = entry.file_name().to_str().and_then(names::carried_id) {
                self.note_id(&id);
            }
        }
    }

    /// Lists the directory: removes uncommitted leftovers, quarantines non-regular files with
    /// cowvm names, collects memory files, and returns the state files' ids.
    fn sort_entries(&mut self) -> Result<Vec<String>, PersistError> {
        let mut states = Vec::new();
        let mut entries: Vec<_> = std::fs::read_dir(self.dir)
            .map_err(io_err("list", self.dir))?
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                self.startup.ignored.push(format!("{}", entry.path().display()));
                continue;
            };
            let Ok(file_type) = entry.file_type() else { continue };
            let class = names::classify(&name);
            if let Some(id) = names::carried_id(&name) {
                self.note_id(&id);
            }
            let regular = file_type.is_file();
            match class {
                Name::Other => self.startup.ignored.push(name),
                Name::Quarantine | Name::Counters => {}
                _ if !regular => {
                    if let Name::State(id) = &class {
                        self.refused.insert(id.clone());
                    }
                    let why = format!(
                        "it is a {}; cowvm's files are regular files (it was not opened)",
                        kind_of(file_type)
                    );
                    self.quarantine(&name, &why);
                }
                Name::Uncommitted(_) => self.remove(&name, "left by a save that never committed"),
                Name::Memory(id) => self.memories.entry(id).or_default().push(name),
                Name::State(id) => states.push(id),
            }
        }
        Ok(states)
    }

    /// Reads and validates each state file; quarantines those that fail.
    fn parse(&mut self, ids: Vec<String>) -> Vec<StateFile> {
        let mut parsed = Vec::new();
        for id in ids {
            match read_state(&super::state_path(self.dir, &id), &id) {
                Ok(state) => parsed.push(state),
                Err(e) => self.refuse(&id, &e.to_string()),
            }
        }
        parsed
    }

    /// Loads flat templates, then layered ones whose parent has loaded, until nothing changes;
    /// what is left has no loadable parent.
    fn load_in_order(&mut self, mut pending: Vec<StateFile>) {
        loop {
            let before = pending.len();
            let mut waiting = Vec::new();
            for state in pending {
                let parent_id = state.payload.parent.as_ref().map(|p| p.id.clone());
                let parent = match &parent_id {
                    None => None,
                    Some(p) => match self.startup.loaded.iter().find(|t| &t.id == p) {
                        Some(t) => Some(t),
                        None => {
                            waiting.push(state);
                            continue;
                        }
                    },
                };
                let id = state.payload.id.clone();
                let memory_file = state.payload.memory_file.clone();
                match state.load(parent) {
                    Ok(template) => {
                        self.used.insert(memory_file);
                        self.startup.loaded.push(template);
                    }
                    Err(e) => self.refuse(&id, &e.to_string()),
                }
            }
            pending = waiting;
            if pending.is_empty() || pending.len() == before {
                break;
            }
        }
        for state in pending {
            let parent = state.payload.parent.as_ref().map_or_else(String::new, |p| p.id.clone());
            let e = PersistError::Parent {
                path: state.path.clone(),
                parent,
                why: "is missing or was refused",
            };
            self.refuse(&state.payload.id, &e.to_string());
        }
    }

    /// Memory files no loaded template names: those of refused templates go to quarantine; the
    /// others are removed when their id has no state file at all
    /// (a save that never committed, or a removal that did not finish), or when their template
    /// loaded from another memory file.
    fn sweep_memory_files(&mut self) {
        let memories = std::mem::take(&mut self.memories);
        let used = std::mem::take(&mut self.used);
        for (id, files) in memories {
            for name in files {
                if used.contains(&name) || !self.dir.join(&name).exists() {
                    continue;
                }
                if self.refused.contains(&id) {
                    self.quarantine(&name, &format!("memory file of refused template {id}"));
                } else if super::state_path(self.dir, &id).exists() {
                    self.remove(&name, "its template's state file names another memory file");
                } else {
                    self.remove(
                        &name,
                        &format!("no {id}.state names it (a save or removal that never finished)"),
                    );
                }
            }
        }
    }

    /// Writes the counters for this run: template numbers up to the highest seen are taken, and
    /// a new generation block starts.
    fn start_run(&mut self) -> Result<(), PersistError> {
        let base = match counters::read(self.dir) {
            Ok(base) => base,
            Err(e) => {
                self.quarantine(names::COUNTERS_FILE, &e.to_string());
                // Unknown history: start far beyond any block a run counted up to.
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(u64::from(u32::MAX), |d| d.as_secs());
                Counters {
                    next_template: 0,
                    generation_block: now,
                }
            }
        };
        let written = counters::start_run(self.dir, base, self.highest + 1)?;
        self.startup.next_template = written.next_template;
        self.startup.generation_floor = written.generation_block << GENERATION_BLOCK_SHIFT;
        Ok(())
    }

    /// Refuses template `id`: its state file goes to quarantine now, the memory files named for
    /// it when the memory files are swept.
    fn refuse(&mut self, id: &str, why: &str) {
        self.refused.insert(id.to_owned());
        self.quarantine(&format!("{id}.state"), why);
    }

    /// Moves `name` into the quarantine folder unchanged (a `.N` suffix if the name is taken).
    fn quarantine(&mut self, name: &str, why: &str) {
        let from = self.dir.join(name);
        if std::fs::symlink_metadata(&from).is_err() {
            return;
        }
        let moved = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.quarantine)
            .and_then(|()| {
                let mut to = self.quarantine.join(name);
                let mut n = 0;
                while std::fs::symlink_metadata(&to).is_ok() {
                    n += 1;
                    to = self.quarantine.join(format!("{name}.{n}"));
                }
                std::fs::rename(&from, &to).map(|()| to)
            });
        let line = match moved {
            Ok(to) => format!("{}: {why}; moved to {}", from.display(), to.display()),
            Err(e) => format!(
                "{}: {why}; could not move it to quarantine ({e}), left as it is",
                from.display()
            ),
        };
        self.startup.refused.push(line);
    }

    /// Removes `name`, one of cowvm's own leftovers.
    fn remove(&mut self, name: &str, why: &str) {
        let path = self.dir.join(name);
        let line = match std::fs::remove_file(&path) {
            Ok(()) => format!("removed {}: {why}", path.display()),
            Err(e) => format!("could not remove {} ({why}): {e}", path.display()),
        };
        self.startup.removed.push(line);
    }
}
