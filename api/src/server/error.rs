//! The one service error type and the one place where it becomes an HTTP status and a JSON
//! error body: `{"error": {"code": "...", "message": "..."}}`. Bad input is always a 4xx; a 500
//! means a bug or a host failure, never a bad request. Errors of the VMM map by their variants
//! through `From` impls, one level each.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cowvm_vmm::call::ready::BootToReadyError;
use cowvm_vmm::call::CallError;
use cowvm_vmm::clone::CloneError;
use cowvm_vmm::command::CommandError;
use cowvm_vmm::kvm::KvmError;
use cowvm_vmm::memory::MemoryError;
use cowvm_vmm::persist::PersistError;
use cowvm_vmm::probe::ProbeError;
use cowvm_vmm::stats::StatsError;
use cowvm_vmm::vcpu::VcpuError;
use cowvm_vmm::VmError;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Why a service operation failed. The variant decides the HTTP status ([`ServiceError::status`]);
/// `code` is the stable machine-readable code clients see.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// 400: the request is malformed.
    #[error("{message}")]
    BadRequest {
        /// Error code.
        code: &'static str,
        /// What went wrong.
        message: String,
    },
    /// 401 `unauthorized`: no or a wrong bearer token.
    #[error("{0}")]
    Unauthorized(String),
    /// 404: no such resource (`not_found`) or endpoint (`route_not_found`).
    #[error("{message}")]
    NotFound {
        /// Error code.
        code: &'static str,
        /// What was not found.
        message: String,
    },
    /// 405 `method_not_allowed`.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409: the resource is in a state that does not allow the operation.
    #[error("{message}")]
    Conflict {
        /// Error code.
        code: &'static str,
        /// Why.
        message: String,
    },
    /// 409 `vm_failed`: the guest stopped for a reason other than finishing (fault, deadline);
    /// the VM is marked failed.
    #[error("{0}")]
    VmFailed(String),
    /// 413: the body is larger than the server takes.
    #[error("{message}")]
    PayloadTooLarge {
        /// Error code.
        code: &'static str,
        /// The limit.
        message: String,
    },
    /// 415 `unsupported_media_type`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: a well-formed value outside what is allowed.
    #[error("{message}")]
    OutOfRange {
        /// Error code.
        code: &'static str,
        /// What is allowed.
        message: String,
    },
    /// 429 `too_many_vms`: the server holds `--max-vms` VMs.
    #[error("{0}")]
    TooManyVms(String),
    /// 503 `resources_exhausted`: the host ran out of something (fds, memory, mappings).
    #[error("{0}")]
    Exhausted(String),
    /// 503 `timeout`: the request did not finish within the request timeout.
    #[error("{0}")]
    Timeout(String),
    /// 503: something the operation needs is not available on this host now.
    #[error("{message}")]
    Unavailable {
        /// Error code.
        code: &'static str,
        /// Why.
        message: String,
    },
    /// 500 `internal`: a bug or an unexpected host failure.
    #[error("{0}")]
    Internal(String),
}

/// The JSON body of every error.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an error.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code (`not_found`, `malformed_json`, `vm_failed`…).
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

impl ServiceError {
    /// The HTTP status of this error: the one mapping from service errors to statuses.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict { .. } | Self::VmFailed(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::OutOfRange { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TooManyVms(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Exhausted(_) | Self::Timeout(_) | Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. }
            | Self::NotFound { code, .. }
            | Self::Conflict { code, .. }
            | Self::PayloadTooLarge { code, .. }
            | Self::OutOfRange { code, .. }
            | Self::Unavailable { code, .. } => code,
            Self::Unauthorized(_) => "unauthorized",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::VmFailed(_) => "vm_failed",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::TooManyVms(_) => "too_many_vms",
            Self::Exhausted(_) => "resources_exhausted",
            Self::Timeout(_) => "timeout",
            Self::Internal(_) => "internal",
        }
    }

    /// 400.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }
    /// 404 for an id that does not exist.
    pub fn not_found(what: &str, id: &str) -> Self {
        let shown: String = id.chars().take(64).collect();
        Self::NotFound {
            code: "not_found",
            message: format!("no {what} with id {shown:?}"),
        }
    }
    /// 409.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::Conflict {
            code,
            message: message.into(),
        }
    }
    /// 409 `not_a_clone`: VM `id` was booted, and only clones can be reset (in the server's
    /// process and in cells alike).
    pub fn not_a_clone(id: &str) -> Self {
        Self::conflict(
            "not_a_clone",
            format!("{id} was booted, not cloned; only clones can be reset"),
        )
    }
    /// 422: a well-formed value outside what is allowed.
    pub fn out_of_range(code: &'static str, message: impl Into<String>) -> Self {
        Self::OutOfRange {
            code,
            message: message.into(),
        }
    }
    /// 503: a resource ran out.
    pub fn exhausted(message: impl Into<String>) -> Self {
        Self::Exhausted(message.into())
    }
    /// 503 with its own code: something needed is unavailable now.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::Unavailable {
            code,
            message: message.into(),
        }
    }
    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::Internal(message.into())
    }
    /// An errno from the host: 503 when the host ran out of something, 500 otherwise.
    pub(crate) fn host(errno: Option<i32>, message: String) -> Self {
        if errno.is_some_and(exhausted_errno) {
            Self::Exhausted(message)
        } else {
            Self::Internal(message)
        }
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

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().to_owned(),
                message: client_text(&self.to_string()),
            },
        };
        (self.status(), Json(body)).into_response()
    }
}

impl From<JsonRejection> for ServiceError {
    fn from(rejection: JsonRejection) -> Self {
        let message = rejection.body_text();
        match rejection {
            JsonRejection::JsonSyntaxError(_) => Self::bad_request("malformed_json", message),
            JsonRejection::JsonDataError(_) => Self::bad_request("invalid_field", message),
            JsonRejection::MissingJsonContentType(_) => Self::UnsupportedMediaType(message),
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge {
                code: "body_too_large",
                message,
            },
            _ => Self::bad_request("bad_body", message),
        }
    }
}

impl From<PathRejection> for ServiceError {
    fn from(rejection: PathRejection) -> Self {
        Self::bad_request("invalid_path", rejection.body_text())
    }
}

/// Errors that mean the host ran out of something (fds, memory), not that the request was bad.
fn exhausted_errno(errno: i32) -> bool {
    matches!(
        errno,
        libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOSPC | libc::EAGAIN
    )
}

impl From<KvmError> for ServiceError {
    fn from(e: KvmError) -> Self {
        Self::host(e.host_errno(), e.to_string())
    }
}

impl From<VcpuError> for ServiceError {
    fn from(e: VcpuError) -> Self {
        Self::host(e.host_errno(), e.to_string())
    }
}

impl From<MemoryError> for ServiceError {
    fn from(e: MemoryError) -> Self {
        if let MemoryError::TooFragmented { .. } = e {
            return Self::conflict("template_too_fragmented", e.to_string());
        }
        Self::host(e.host_errno(), e.to_string())
    }
}

impl From<VmError> for ServiceError {
    fn from(e: VmError) -> Self {
        let message = e.to_string();
        match e {
            VmError::Kvm(kvm) => kvm.into(),
            VmError::Vcpu(vcpu) => vcpu.into(),
            VmError::Memory(memory) => memory.into(),
            VmError::Ioctl(_) | VmError::VcpuThread(_) => Self::host(e.host_errno(), message),
            VmError::MemorySize { .. } => Self::out_of_range("memory_out_of_range", message),
            VmError::Command(CommandError::TooMany { .. }) => Self::out_of_range("count_out_of_range", message),
            VmError::Command(CommandError::Misaligned { .. }) => Self::out_of_range("misaligned", message),
            VmError::Command(_) | VmError::Translate(_) => Self::out_of_range("address_out_of_range", message),
            VmError::Load(load) => Self::out_of_range("bad_kernel", load.client_message()),
            VmError::GuestStopped(_) | VmError::Failed(_) => Self::VmFailed(message),
            VmError::VcpuCount { .. } => Self::out_of_range("vcpus_out_of_range", message),
            VmError::NoSuchVcpu { .. } | VmError::DuplicateVcpu { .. } => {
                Self::out_of_range("vcpu_out_of_range", message)
            }
            VmError::NotAClone => Self::conflict("not_a_clone", message),
            _ => Self::internal(message),
        }
    }
}

impl From<BootToReadyError> for ServiceError {
    fn from(e: BootToReadyError) -> Self {
        match e {
            BootToReadyError::Vm(vm) => vm.into(),
            other => Self::out_of_range("boot_failed", other.to_string()),
        }
    }
}

impl From<CloneError> for ServiceError {
    fn from(e: CloneError) -> Self {
        match e {
            CloneError::TooMany { .. } => Self::out_of_range("count_out_of_range", e.to_string()),
            CloneError::Vm(vm) => vm.into(),
            CloneError::Thread(_) => Self::exhausted(e.to_string()),
        }
    }
}

impl From<ProbeError> for ServiceError {
    fn from(e: ProbeError) -> Self {
        match e {
            ProbeError::Vm(vm) => vm.into(),
            ProbeError::Stats(stats) => stats.into(),
            ProbeError::Count(_) => Self::out_of_range("count_out_of_range", e.to_string()),
            ProbeError::SamePage(..) | ProbeError::Stride(_) => Self::out_of_range("invalid_targets", e.to_string()),
        }
    }
}

impl From<StatsError> for ServiceError {
    fn from(e: StatsError) -> Self {
        match e {
            StatsError::Vm(vm) => vm.into(),
            StatsError::KPage(k) => Self::unavailable("stats_unavailable", k.to_string()),
            other => Self::internal(other.to_string()),
        }
    }
}

impl From<PersistError> for ServiceError {
    fn from(e: PersistError) -> Self {
        Self::internal(format!("saving the template failed: {e}"))
    }
}

impl From<CallError> for ServiceError {
    fn from(e: CallError) -> Self {
        match (e.code(), e) {
            (Some(code), e) => Self::out_of_range(code, e.to_string()),
            (None, CallError::Vm(vm)) => vm.into(),
            (None, e) => Self::internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cowvm_vmm::GuestExit;

    #[test]
    fn test_a_stopped_guest_is_the_vm_failed_variant_409() {
        let e = ServiceError::from(VmError::GuestStopped(GuestExit::Shutdown));
        assert!(matches!(e, ServiceError::VmFailed(_)), "{e:?}");
        assert_eq!((e.status(), e.code()), (StatusCode::CONFLICT, "vm_failed"));
    }

    #[test]
    fn test_host_exhaustion_is_503_at_every_nesting_level() {
        let emfile = || std::io::Error::from_raw_os_error(libc::EMFILE);
        let nested = [
            VmError::Memory(MemoryError::CreateMemfd(emfile())),
            VmError::Memory(MemoryError::Map {
                len: 4096,
                source: emfile(),
            }),
        ];
        for vm in nested {
            let e = ServiceError::from(CloneError::Vm(vm));
            assert_eq!(
                (e.status(), e.code()),
                (StatusCode::SERVICE_UNAVAILABLE, "resources_exhausted")
            );
        }
        let other = ServiceError::from(VmError::Memory(MemoryError::CreateMemfd(
            std::io::Error::from_raw_os_error(libc::EINVAL),
        )));
        assert_eq!(
            (other.status(), other.code()),
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        );
    }

    #[test]
    fn test_error_body_keeps_code_and_message_shape() {
        let response = ServiceError::not_found("VM", "vm-9").into_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let e = ServiceError::from(MemoryError::TooFragmented { layers: 9, runs: 9 });
        assert_eq!(
            (e.status(), e.code()),
            (StatusCode::CONFLICT, "template_too_fragmented")
        );
    }

    #[test]
    fn test_every_guest_misbehaviour_is_a_4xx() {
        let errors = [
            CallError::InputTooLarge { len: 1 },
            CallError::OutputTooLarge { len: 1 },
            CallError::Deadline { after_ms: 1 },
            CallError::Fault(cowvm_vmm::GuestExit::Shutdown),
            CallError::NotAbi(cowvm_vmm::GuestExit::Halt),
            CallError::Aborted {
                code: 1,
                log_tail: String::new(),
            },
        ];
        for e in errors {
            let api = ServiceError::from(e);
            assert_eq!(api.status(), StatusCode::UNPROCESSABLE_ENTITY, "{}", api.code());
        }
    }
}
