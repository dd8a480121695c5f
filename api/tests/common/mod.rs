//! Helpers shared by the API tests.

use cowvm::client::Answer;
use serde_json::Value;

/// Sends `body` as is, with `content_type` if given, and returns the status and body (parsed as
/// JSON when it is JSON).
pub fn raw(addr: std::net::SocketAddr, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Answer {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let url = format!("http://{addr}{path}");
    let response = match method {
        "GET" => agent.get(&url).call(),
        "DELETE" => agent.delete(&url).call(),
        _ => {
            let request = match method {
                "PUT" => agent.put(&url),
                "PATCH" => agent.patch(&url),
                _ => agent.post(&url),
            };
            let request = match content_type {
                Some(ct) => request.header("content-type", ct),
                None => request,
            };
            request.send(body)
        }
    };
    let mut response = response.expect("the server answers");
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    Answer {
        status,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}
