//! Portable templates over HTTP: `GET /v1/templates/{id}/export` streams a template as an OCI
//! image layout tar (see [`crate::archive`]); `POST /v1/templates/import` takes one back.
//!
//! An import is spooled to an anonymous file (`O_TMPFILE`, never named, so nothing is left behind
//! whatever happens) in the state directory, or the temporary directory without one, counted
//! against `--max-import-bytes` as it arrives; then it is verified whole and registered (and
//! saved) like a snapshot.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cowvm_vmm::layout::{bytes_to_mib, mib};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use utoipa::ToSchema;

use super::app::{App, TemplateEntry};
use super::error::{ErrorBody, ServiceError};
use super::ops::{timeout_error, transaction};
use super::templates::save_template;
use crate::archive::{self, ArchiveError};

/// `POST /v1/templates/import` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateImported {
    /// The new template.
    pub template_id: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Bytes of guest memory the archive held (populated pages).
    pub populated_bytes: u64,
    /// Bytes of the archive received.
    pub archive_bytes: u64,
    /// Whether it was saved under `--state-dir`.
    pub persisted: bool,
    /// Microseconds spent verifying and building the template (after the body arrived).
    pub import_us: f64,
}

/// Bytes gathered before each piece of the export is handed to the connection.
const SEND_BYTES: usize = 1 << 20;

/// A writer that sends what it is given down a channel, in pieces of [`SEND_BYTES`].
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(SEND_BYTES)));
        self.tx
            .blocking_send(Ok(piece))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= SEND_BYTES {
            self.send()?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Export a template as an OCI image layout tar (`artifactType` `application/vnd.cowvm.template.v1`;
/// layered templates are flattened).
#[utoipa::path(get, path = "/v1/templates/{id}/export", tag = "templates", params(("id" = String, Path, description = "template id")),
    responses((status = 200, description = "OCI image layout tar: index.json, oci-layout, blobs/sha256/* (state blob and zstd memory chunks of populated pages only)", content_type = "application/x-tar", body = String), (status = 404, body = ErrorBody)))]
pub async fn export_template(
    State(app): State<Arc<App>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ServiceError> {
    let Path(id) = id?;
    let entry = app.template(&id)?;
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let mut out = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(SEND_BYTES),
        };
        if let Err(e) = archive::export(&entry.template, &mut out) {
            // The status is sent already: the connection is cut so the client sees a short body.
            eprintln!("cowvm serve: export of template {} stopped: {e}", entry.id);
            let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let disposition = format!("attachment; filename=\"{id}.oci.tar\"");
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar".to_owned()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// The HTTP answer to an archive that cannot be imported.
fn refused(error: ArchiveError) -> ServiceError {
    let message = error.to_string();
    match &error {
        // 422, not 400: the request is well formed; what it carries cannot be read as an archive.
        ArchiveError::Malformed(_) => ServiceError::out_of_range("bad_archive", message),
        ArchiveError::Digest { .. } => ServiceError::out_of_range("digest_mismatch", message),
        ArchiveError::Unsupported(_) => ServiceError::out_of_range("unsupported_archive", message),
        ArchiveError::Invalid(_) => ServiceError::out_of_range("invalid_template", message),
        ArchiveError::TooLarge { .. } => ServiceError::out_of_range("memory_out_of_range", message),
        ArchiveError::Io { .. } | ArchiveError::Memory(_) => ServiceError::unavailable("import_failed", message),
    }
}

fn too_large(limit: u64) -> ServiceError {
    ServiceError::PayloadTooLarge {
        code: "archive_too_large",
        message: format!("the archive is larger than --max-import-bytes ({limit} bytes)"),
    }
}

/// An unnamed file in `dir`: `O_TMPFILE`, or where the filesystem lacks it a file removed at once.
fn anonymous_file(dir: &FsPath) -> io::Result<File> {
    let tmpfile = OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir);
    match tmpfile {
        Ok(file) => Ok(file),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EISDIR)) => {
            let nonce = nonce();
            let path = dir.join(format!(".import.{nonce:016x}.part"));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            std::fs::remove_file(&path)?;
            Ok(file)
        }
        Err(e) => Err(e),
    }
}

fn nonce() -> u64 {
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    time ^ u64::from(std::process::id()).rotate_left(32)
}

/// Receives the body into an anonymous file, refusing it past `limit` bytes.
async fn spool(app: &App, body: Body, limit: u64) -> Result<(File, u64), ServiceError> {
    let dir = app.state_dir.clone().unwrap_or_else(std::env::temp_dir);
    let file =
        anonymous_file(&dir).map_err(|e| ServiceError::exhausted(format!("no room to receive the archive: {e}")))?;
    let writer = file
        .try_clone()
        .map_err(|e| ServiceError::exhausted(format!("no file descriptor left to receive the archive: {e}")))?;
    let mut writer = tokio::fs::File::from_std(writer);
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    while let Some(piece) = stream.next().await {
        let piece =
            piece.map_err(|e| ServiceError::bad_request("bad_body", format!("the archive could not be read: {e}")))?;
        total += piece.len() as u64;
        if total > limit {
            return Err(too_large(limit));
        }
        writer
            .write_all(&piece)
            .await
            .map_err(|e| ServiceError::exhausted(format!("no room to receive the archive: {e}")))?;
    }
    writer
        .flush()
        .await
        .map_err(|e| ServiceError::exhausted(format!("no room to receive the archive: {e}")))?;
    Ok((file, total))
}

/// Import a template from an OCI image layout tar made by the export: every blob's sha256 and
/// the state's format version are verified before anything is kept.
#[utoipa::path(post, path = "/v1/templates/import", tag = "templates",
    request_body(content = String, content_type = "application/x-tar", description = "an OCI image layout tar as GET /v1/templates/{id}/export writes it"),
    responses((status = 201, body = TemplateImported),
        (status = 413, description = "larger than --max-import-bytes", body = ErrorBody),
        (status = 422, description = "not a readable OCI layout tar (e.g. truncated), a digest does not match, or not a cowvm template of a supported version", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn import_template(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<TemplateImported>), ServiceError> {
    let limit = app.limits.max_import_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large(limit));
    }
    let (file, archive_bytes) = spool(&app, body, limit).await?;
    let service = Arc::clone(&app);
    let imported = transaction(&app, move |commit| {
        let started = Instant::now();
        let max_memory = mib(service.limits.max_memory_mib);
        let template = archive::import(&file, max_memory).map_err(refused)?;
        drop(file);
        let import_us = started.elapsed().as_secs_f64() * 1e6;
        let populated_bytes = template
            .memory()
            .base()
            .populated_bytes()
            .map_err(|e| ServiceError::internal(format!("count the imported pages: {e}")))?;
        if !commit.commit() {
            return Err(timeout_error(&service));
        }
        let template_id = service.new_template_id();
        let persisted = save_template(&service, &template_id, &template)?;
        let entry = service.add_template(TemplateEntry {
            id: template_id,
            template: Arc::new(template),
            source_vm: None,
            persisted,
        });
        Ok(TemplateImported {
            template_id: entry.id.clone(),
            memory_mib: bytes_to_mib(entry.template.size()),
            populated_bytes,
            archive_bytes,
            persisted,
            import_us,
        })
    })
    .await?;
    Ok((StatusCode::CREATED, Json(imported)))
}
