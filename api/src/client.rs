//! A small blocking client for the cowvm API (used by the CLI, `cowvm demo` and the
//! benchmarks). Its typed calls ([`Client::get`], [`Client::post`], and one method per endpoint
//! the tools drive such as [`Client::clone_template`]) send and parse the server's own request
//! and answer types (`crate::server::model`), so client and server cannot drift apart.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::server::model::{
    CloneRequest, ClonesCreated, CreateVm, ResetDone, RunCommand, RunResult, SnapshotCreated, TemplateInfo, VmInfo,
    VmStats, WarmRequest, WarmStatus,
};
use crate::server::{CellView, ErrorBody};

/// Default server URL.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// Errors talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer.
    #[error("cannot reach the cowvm server at {url}: {reason} (is `cowvm serve` running? --url sets where)")]
    Unreachable {
        /// Where.
        url: String,
        /// Why.
        reason: String,
    },
    /// The server answered with an error.
    #[error("{status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Error code.
        code: String,
        /// Message.
        message: String,
    },
    /// The server answered with a body that is not the expected answer.
    #[error("the server's answer to {path} is not what cowvm expects: {reason}")]
    Unexpected {
        /// The path asked.
        path: String,
        /// Why it could not be read.
        reason: String,
    },
}

/// An answer: status and JSON body (null when empty).
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Parsed body (or a string if it was not JSON).
    pub body: Value,
}

/// A client of one server.
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client of the server at `base` (`http://host:port`), sending `token` if given.
    pub fn new(base: &str, token: Option<String>) -> Self {
        // The bound is set per phase rather than globally: with a global (or per-call) timeout
        // ureq resolves the host on a new thread for every request, which cost a thread spawn
        // per call (the address is resolved before a pooled connection is looked up).
        let limit = Some(Duration::from_secs(600));
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(limit)
            .timeout_send_request(limit)
            .timeout_send_body(limit)
            .timeout_recv_response(limit)
            .timeout_recv_body(limit)
            .build();
        Client {
            agent: ureq::Agent::new_with_config(config),
            base: base.trim_end_matches('/').to_owned(),
            token,
        }
    }

    /// Sends a request and returns whatever the server answered.
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Answer, ClientError> {
        let (status, text) = self.exchange(method, path, body)?;
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok(Answer { status, body })
    }

    /// Sends a request (with `body` as JSON) and returns the status and the answer's text.
    fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<(u16, String), ClientError> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let result = match (method, body) {
            ("GET", _) => with_auth(self.agent.get(&url), &auth).call(),
            ("DELETE", _) => with_auth(self.agent.delete(&url), &auth).call(),
            (_, Some(json)) => with_auth_body(self.agent.post(&url), &auth).send_json(json),
            (_, None) => with_auth_body(self.agent.post(&url), &auth).send_empty(),
        };
        let mut response = result.map_err(|e| ClientError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_string()
            .map_err(|e| ClientError::Unreachable {
                url,
                reason: e.to_string(),
            })?;
        Ok((status, text))
    }

    /// Sends a request and returns the answer's JSON as it came, for callers that pass it on
    /// untouched; an error status becomes [`ClientError::Api`]. [`Client::get`] and
    /// [`Client::post`] parse answers into the API's types.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        let answer = self.request(method, path, body)?;
        if answer.status < 300 {
            return Ok(answer.body);
        }
        Err(api_error(answer.status, &answer.body.to_string()))
    }

    /// Sends a request and parses the answer as `T`; an error status becomes
    /// [`ClientError::Api`].
    fn typed<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        let (status, text) = self.exchange(method, path, body)?;
        if status >= 300 {
            return Err(api_error(status, &text));
        }
        // An empty answer (204) is JSON `null`, which `()` reads.
        let json = if text.is_empty() { "null" } else { &text };
        serde_json::from_str(json).map_err(|e| ClientError::Unexpected {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// `GET path`, the answer parsed as `T`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.typed("GET", path, None::<&()>)
    }

    /// `POST path` with `body` as JSON, the answer parsed as `T`.
    pub fn post<T: DeserializeOwned>(&self, path: &str, body: &(impl Serialize + ?Sized)) -> Result<T, ClientError> {
        self.typed("POST", path, Some(body))
    }

    /// `POST path` without a body, the answer parsed as `T`.
    pub fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.typed("POST", path, None::<&()>)
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.typed("DELETE", path, None::<&()>)
    }

    /// `GET path` with the answer's body copied into `out` as it arrives; returns the bytes
    /// copied. An error status becomes [`ClientError::Api`].
    pub fn download(&self, path: &str, out: &mut impl std::io::Write) -> Result<u64, ClientError> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let unreachable = |reason: String| ClientError::Unreachable {
            url: url.clone(),
            reason,
        };
        let mut response = with_auth(self.agent.get(&url), &auth)
            .call()
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status().as_u16();
        if status >= 300 {
            let text = response.body_mut().read_to_string().unwrap_or_default();
            return Err(api_error(status, &text));
        }
        let mut reader = response.body_mut().with_config().limit(u64::MAX).reader();
        std::io::copy(&mut reader, out).map_err(|e| unreachable(format!("the answer was cut short: {e}")))
    }

    /// `POST path` with `body` streamed as the request body (chunked) of type `content_type`,
    /// the answer parsed as `T`; an error status becomes [`ClientError::Api`].
    pub fn upload<T: DeserializeOwned>(
        &self,
        path: &str,
        content_type: &str,
        body: &mut impl std::io::Read,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut response = with_auth_body(self.agent.post(&url), &auth)
            .header("Content-Type", content_type)
            .send(ureq::SendBody::from_reader(body))
            .map_err(|e| ClientError::Unreachable {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        if status >= 300 {
            return Err(api_error(status, &text));
        }
        serde_json::from_str(&text).map_err(|e| ClientError::Unexpected {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }
}

/// Typed calls of single endpoints (for the benchmarks and tools that drive a server): each
/// sends the API's request type and parses its answer type.
impl Client {
    /// `POST /v1/vms`: boots a VM.
    pub fn create_vm(&self, body: &CreateVm) -> Result<VmInfo, ClientError> {
        self.post("/v1/vms", body)
    }

    /// `POST /v1/vms/{vm}/snapshot`: freezes VM `vm` into a template.
    pub fn snapshot(&self, vm: &str) -> Result<SnapshotCreated, ClientError> {
        self.post_empty(&format!("/v1/vms/{vm}/snapshot"))
    }

    /// `POST /v1/templates/{template}/clones`: makes `count` clones.
    pub fn clone_template(&self, template: &str, count: u64) -> Result<ClonesCreated, ClientError> {
        self.post(&format!("/v1/templates/{template}/clones"), &CloneRequest { count })
    }

    /// `POST /v1/vms/{vm}/run`: runs a guest command.
    pub fn run(&self, vm: &str, command: &RunCommand) -> Result<RunResult, ClientError> {
        self.post(&format!("/v1/vms/{vm}/run"), command)
    }

    /// `GET /v1/vms/{vm}/stats`: the VM's sharing, read from the host kernel.
    pub fn vm_stats(&self, vm: &str) -> Result<VmStats, ClientError> {
        self.get(&format!("/v1/vms/{vm}/stats"))
    }

    /// `POST /v1/vms/{vm}/reset`: back to the template's state (by swap when a shell is ready).
    pub fn reset(&self, vm: &str) -> Result<ResetDone, ClientError> {
        self.post_empty(&format!("/v1/vms/{vm}/reset"))
    }

    /// `DELETE /v1/vms/{vm}`.
    pub fn delete_vm(&self, vm: &str) -> Result<(), ClientError> {
        self.delete(&format!("/v1/vms/{vm}"))
    }

    /// `GET /v1/templates/{template}`.
    pub fn template(&self, template: &str) -> Result<TemplateInfo, ClientError> {
        self.get(&format!("/v1/templates/{template}"))
    }

    /// `POST /v1/templates/{template}/warm`: keeps `shells` warm shells.
    pub fn set_warm(&self, template: &str, shells: u64) -> Result<WarmStatus, ClientError> {
        self.post(&format!("/v1/templates/{template}/warm"), &WarmRequest { shells })
    }

    /// `DELETE /v1/templates/{template}`.
    pub fn delete_template(&self, template: &str) -> Result<(), ClientError> {
        self.delete(&format!("/v1/templates/{template}"))
    }

    /// `GET /v1/cells`: the cell processes (empty without `--cells`).
    pub fn cells(&self) -> Result<Vec<CellView>, ClientError> {
        self.get("/v1/cells")
    }

    /// `GET /metrics`: the Prometheus text.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let (status, text) = self.exchange("GET", "/metrics", None::<&()>)?;
        if status >= 300 {
            return Err(api_error(status, &text));
        }
        Ok(text)
    }
}

/// The [`ClientError::Api`] of an error answer with body `text` (the server's [`ErrorBody`], or
/// anything else a proxy may have answered).
fn api_error(status: u16, text: &str) -> ClientError {
    match serde_json::from_str::<ErrorBody>(text) {
        Ok(body) => ClientError::Api {
            status,
            code: body.error.code,
            message: body.error.message,
        },
        Err(_) => ClientError::Api {
            status,
            code: "unknown".to_owned(),
            message: text.to_owned(),
        },
    }
}

fn with_auth(
    request: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
    auth: &Option<String>,
) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
    match auth {
        Some(value) => request.header("Authorization", value),
        None => request,
    }
}

fn with_auth_body(
    request: ureq::RequestBuilder<ureq::typestate::WithBody>,
    auth: &Option<String>,
) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
    match auth {
        Some(value) => request.header("Authorization", value),
        None => request,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_client_bounds_each_phase_but_sets_no_timeout_that_resolves_on_a_thread() {
        // ureq resolves the host on a new thread for every request when a global, per-call or
        // resolve timeout is set (a thread spawn per API call); the bound is per phase instead.
        let client = Client::new("http://127.0.0.1:1", None);
        let timeouts = client.agent.config().timeouts();
        assert_eq!(
            (timeouts.global, timeouts.per_call, timeouts.resolve),
            (None, None, None)
        );
        let limit = Some(Duration::from_secs(600));
        assert_eq!(timeouts.connect, limit);
        assert_eq!(timeouts.send_request, limit);
        assert_eq!(timeouts.send_body, limit);
        assert_eq!(timeouts.recv_response, limit);
        assert_eq!(timeouts.recv_body, limit);
    }
}
