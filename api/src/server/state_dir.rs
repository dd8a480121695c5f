//! The state directory from the service's side: the start-up pass (quarantine, sweep, ids kept
//! out of use, generation ids unique across restarts), saving templates (a layered template as
//! its overlay plus a reference to its parent) and removing them. Every file removed and every
//! file refused is logged to stderr.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::Arc;

use cowvm_vmm::persist::{self, Startup};
use cowvm_vmm::Template;

use super::app::{App, TemplateEntry};
use super::error::ServiceError;
use super::ServeError;

/// Creates the directory if needed (0700), loads what it holds, and logs what was removed or
/// left alone. Refused templates are returned in [`Startup::refused`] for the caller to report.
pub fn open(dir: &Path) -> Result<Startup, ServeError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| ServeError::Io {
            what: format!("create the state directory {}", dir.display()),
            source,
        })?;
    let startup = persist::load_all(dir)?;
    for line in &startup.removed {
        eprintln!("cowvm serve: {line}");
    }
    for name in &startup.ignored {
        eprintln!("cowvm serve: state directory: {name} is not a cowvm file; left as it is");
    }
    Ok(startup)
}

/// Puts what the start-up pass loaded into the service, parents first, and keeps every id it saw
/// out of use.
pub fn adopt(app: &App, startup: Startup) {
    app.reserve_template_ids(startup.next_template);
    cowvm_vmm::clone::reserve_generations(startup.generation_floor);
    for template in startup.loaded {
        app.add_template(TemplateEntry {
            id: template.id,
            template: Arc::new(template.template),
            source_vm: None,
            persisted: true,
        });
    }
}

/// Saves a template under the state directory, if there is one. A template layered on a saved
/// template (a snapshot or live fork of a clone) is saved as its own overlay plus a reference
/// to that parent; anything else is saved whole.
pub fn save(app: &App, id: &str, template: &Template) -> Result<bool, ServiceError> {
    let Some(dir) = &app.state_dir else {
        return Ok(false);
    };
    let memory = template.memory();
    let parent = app.templates().into_iter().find(|t| {
        t.persisted && t.id != id && (memory.is_layered_on(t.template.memory()) || memory.same_as(t.template.memory()))
    });
    match parent {
        Some(parent) => persist::save_layered(dir, id, template, &parent.id, &parent.template),
        None => persist::save(dir, id, template),
    }
    .map(|()| true)
    .map_err(ServiceError::from)
}

/// A 409 if saved templates are layered on template `id` (its files are their base).
pub fn refuse_if_parent(app: &App, id: &str) -> Result<(), ServiceError> {
    let Some(dir) = &app.state_dir else {
        return Ok(());
    };
    let children = persist::dependents(dir, id).map_err(ServiceError::from)?;
    if children.is_empty() {
        return Ok(());
    }
    Err(ServiceError::conflict(
        "template_in_use",
        format!(
            "saved templates {} are layered on template {id}; delete them first",
            children.join(", ")
        ),
    ))
}

/// Removes template `id`'s files and logs each removal.
pub fn remove(dir: &Path, id: &str) -> Result<(), ServiceError> {
    for path in persist::remove(dir, id).map_err(ServiceError::from)? {
        eprintln!("cowvm serve: removed {} (template {id} deleted)", path.display());
    }
    Ok(())
}
