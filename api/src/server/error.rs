//! The one place where typed errors become HTTP statuses and JSON error bodies:
//! `{"error": {"code": "...", "message": "..."}}`. Bad input is always a 4xx; a 500 means a bug
//! or a host failure, never a bad request.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cowvm_vmm::boot::layout::KERNEL_START;
use cowvm_vmm::clone::CloneError;
use cowvm_vmm::command::CommandError;
use cowvm_vmm::kvm::KvmError;
use cowvm_vmm::loader::LoadError;
use cowvm_vmm::memory::MemoryError;
use cowvm_vmm::persist::PersistError;
use cowvm_vmm::probe::ProbeError;
use cowvm_vmm::stats::StatsError;
use cowvm_vmm::vcpu::VcpuError;
use cowvm_vmm::VmError;
use serde::Serialize;
use utoipa::ToSchema;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
}

/// The JSON body of every error.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an error.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code (`not_found`, `malformed_json`, `vm_failed`…).
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    /// 400.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    /// 404 for an id that does not exist.
    pub fn not_found(what: &str, id: &str) -> Self {
        let shown: String = id.chars().take(64).collect();
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {what} with id {shown:?}"),
        )
    }
    /// 409.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
    /// 422: a well-formed value outside what is allowed.
    pub fn out_of_range(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }
    /// 503: a resource ran out.
    pub fn exhausted(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "resources_exhausted", message)
    }
    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

/// A message as a client should see it: one line (no `Debug` layouts with embedded newlines) and
/// no absolute server paths (a path of several components is cut to its file name, which is what
/// the client named).
pub fn client_text(message: &str) -> String {
    let words: Vec<String> = message
        .split_whitespace()
        .map(|word| {
            let start = word.find('/').unwrap_or(word.len());
            let path = &word[start..];
            if path.matches('/').count() < 2 {
                return word.to_owned();
            }
            let name = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
            format!("{}{name}", &word[..start])
        })
        .collect();
    words.join(" ")
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: client_text(&self.message),
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let message = rejection.body_text();
        match rejection {
            JsonRejection::JsonSyntaxError(_) => Self::bad_request("malformed_json", message),
            JsonRejection::JsonDataError(_) => Self::bad_request("invalid_field", message),
            JsonRejection::MissingJsonContentType(_) => {
                Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", message)
            }
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", message)
            }
            _ => Self::bad_request("bad_body", message),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::bad_request("invalid_path", rejection.body_text())
    }
}

/// Why a kernel did not load, naming the kernel by the file name the client gave.
fn kernel_message(e: &LoadError) -> String {
    let file_name = |p: &std::path::Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    match e {
        LoadError::Open { path, source } => format!("cannot open kernel {:?}: {}", file_name(path), source.kind()),
        LoadError::Elf { name, source } => format!(
            "kernel {:?} is not a 64-bit ELF whose segments load at or above {:#x} inside the guest's RAM ({source})",
            file_name(std::path::Path::new(name)),
            KERNEL_START.0
        ),
    }
}

/// Errors that mean the host ran out of something (fds, memory), not that the request was bad.
fn exhausted_errno(errno: i32) -> bool {
    matches!(
        errno,
        libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOMEM | libc_errno::ENOSPC | libc_errno::EAGAIN
    )
}

mod libc_errno {
    pub const EAGAIN: i32 = 11;
    pub const ENOMEM: i32 = 12;
    pub const ENFILE: i32 = 23;
    pub const EMFILE: i32 = 24;
    pub const ENOSPC: i32 = 28;
}

fn vm_errno(e: &VmError) -> Option<i32> {
    match e {
        VmError::Kvm(KvmError::Ioctl { source, .. }) => Some(source.errno()),
        VmError::Ioctl { source, .. } => Some(source.errno()),
        VmError::Vcpu(VcpuError::Ioctl { source, .. }) => Some(source.errno()),
        VmError::Memory(MemoryError::CreateMemfd(io) | MemoryError::WriteMemfd(io))
        | VmError::Memory(MemoryError::Map { source: io, .. })
        | VmError::Memory(MemoryError::Resize { source: io, .. }) => io.raw_os_error(),
        _ => None,
    }
}

impl From<VmError> for ApiError {
    fn from(e: VmError) -> Self {
        let message = e.to_string();
        match &e {
            VmError::MemorySize { .. } => Self::out_of_range("memory_out_of_range", message),
            VmError::Command(CommandError::TooMany { .. }) => Self::out_of_range("count_out_of_range", message),
            VmError::Command(CommandError::Misaligned { .. }) => Self::out_of_range("misaligned", message),
            VmError::Command(_) => Self::out_of_range("address_out_of_range", message),
            VmError::Translate(_) => Self::out_of_range("address_out_of_range", message),
            VmError::Load(load) => Self::out_of_range("bad_kernel", kernel_message(load)),
            VmError::GuestStopped(_) => Self::conflict("vm_failed", message),
            VmError::NotAClone => Self::conflict("not_a_clone", message),
            VmError::Memory(MemoryError::TooFragmented { .. }) => Self::conflict("template_too_fragmented", message),
            _ if vm_errno(&e).is_some_and(exhausted_errno) => Self::exhausted(message),
            _ => Self::internal(message),
        }
    }
}

impl From<CloneError> for ApiError {
    fn from(e: CloneError) -> Self {
        match e {
            CloneError::TooMany { .. } => Self::out_of_range("count_out_of_range", e.to_string()),
            CloneError::Vm(vm) => vm.into(),
            CloneError::Thread(_) => Self::exhausted(e.to_string()),
        }
    }
}

impl From<ProbeError> for ApiError {
    fn from(e: ProbeError) -> Self {
        match e {
            ProbeError::Vm(vm) => vm.into(),
            ProbeError::Stats(stats) => stats.into(),
            ProbeError::Count(_) => Self::out_of_range("count_out_of_range", e.to_string()),
            ProbeError::SamePage(..) | ProbeError::Stride(_) => Self::out_of_range("invalid_targets", e.to_string()),
        }
    }
}

impl From<StatsError> for ApiError {
    fn from(e: StatsError) -> Self {
        match e {
            StatsError::Vm(vm) => vm.into(),
            StatsError::KPage(k) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "stats_unavailable", k.to_string()),
            other => Self::internal(other.to_string()),
        }
    }
}

impl From<PersistError> for ApiError {
    fn from(e: PersistError) -> Self {
        Self::internal(format!("saving the template failed: {e}"))
    }
}
