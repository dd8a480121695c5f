//! `cowvm template push` and `cowvm template pull`: a template to and from an OCI registry. The
//! archive is the one `GET /v1/templates/{id}/export` writes; the registry transfer is
//! [`skopeo`](https://github.com/containers/skopeo)'s (`skopeo copy oci-archive:FILE
//! docker://REF`), so credentials, TLS and mirrors work as they do for container images
//! (`skopeo login`, `/etc/containers/registries.conf`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::cli::{CliError, Connection};
use crate::client::Client;
use crate::server::model::TemplateImported;

/// The skopeo binary: `$COWVM_SKOPEO`, else `skopeo` on the `PATH`.
fn skopeo() -> String {
    std::env::var("COWVM_SKOPEO").unwrap_or_else(|_| "skopeo".to_owned())
}

/// A file in the temporary directory, removed when dropped.
struct TempArchive(PathBuf);

impl TempArchive {
    fn new(what: &str) -> TempArchive {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        TempArchive(std::env::temp_dir().join(format!("cowvm-{what}-{}-{nanos}.oci.tar", std::process::id())))
    }
}

impl Drop for TempArchive {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `skopeo copy [TLS flag] FROM TO`.
fn copy(from: &str, to: &str, tls_flag: &str, insecure: bool) -> Result<(), CliError> {
    let mut command = Command::new(skopeo());
    command.arg("copy").arg("--quiet");
    if insecure {
        command.arg(format!("{tls_flag}=false"));
    }
    let status = command.arg(from).arg(to).status().map_err(|e| {
        CliError::Usage(format!(
            "cannot run {} (install skopeo, or set COWVM_SKOPEO): {e}",
            skopeo()
        ))
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(CliError::Usage(format!("skopeo copy {from} {to} failed ({status})")))
    }
}

/// A `docker://` reference for `reference` (given with or without the transport).
fn docker_ref(reference: &str) -> String {
    if reference.starts_with("docker://") {
        reference.to_owned()
    } else {
        format!("docker://{reference}")
    }
}

/// What `template push --json` prints.
#[derive(Serialize)]
struct Pushed<'a> {
    template_id: &'a str,
    reference: &'a str,
    archive_bytes: u64,
}

fn report(conn: &Connection, value: &impl Serialize, line: String) {
    if conn.json {
        println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
    } else {
        println!("{line}");
    }
}

/// `cowvm template push ID REF`: exports template `id` and copies it to registry reference
/// `reference` (e.g. `registry.example:5000/cowvm/base:1`).
pub fn push(conn: &Connection, client: &Client, id: &str, reference: &str, insecure: bool) -> Result<(), CliError> {
    let archive = TempArchive::new("push");
    let bytes = download(client, id, &archive.0)?;
    let target = docker_ref(reference);
    copy(
        &format!("oci-archive:{}", archive.0.display()),
        &target,
        "--dest-tls-verify",
        insecure,
    )?;
    report(
        conn,
        &Pushed {
            template_id: id,
            reference: &target,
            archive_bytes: bytes,
        },
        format!("pushed {id} to {target} ({bytes} bytes)"),
    );
    Ok(())
}

/// `cowvm template pull REF`: copies registry reference `reference` into an archive and imports
/// it; prints the new template id.
pub fn pull(conn: &Connection, client: &Client, reference: &str, insecure: bool) -> Result<(), CliError> {
    let archive = TempArchive::new("pull");
    let source = docker_ref(reference);
    copy(
        &source,
        &format!("oci-archive:{}", archive.0.display()),
        "--src-tls-verify",
        insecure,
    )?;
    let mut file = std::fs::File::open(&archive.0)
        .map_err(|e| CliError::Usage(format!("cannot open {}: {e}", archive.0.display())))?;
    let imported: TemplateImported = client.upload("/v1/templates/import", "application/x-tar", &mut file)?;
    let line = format!("pulled {source} as {}", imported.template_id);
    report(conn, &imported, line);
    Ok(())
}

fn download(client: &Client, id: &str, path: &Path) -> Result<u64, CliError> {
    let mut file =
        std::fs::File::create(path).map_err(|e| CliError::Usage(format!("cannot create {}: {e}", path.display())))?;
    Ok(client.download(&format!("/v1/templates/{id}/export"), &mut file)?)
}
