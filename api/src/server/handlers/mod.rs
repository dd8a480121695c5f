//! HTTP handlers that only parse a request (path, JSON body) and call the service layer
//! ([`super::service`]); their `utoipa::path` attributes make `/openapi.json`.

pub mod templates;
pub mod vms;
