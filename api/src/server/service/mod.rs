//! The service layer: operations on typed requests ([`super::model`]) that answer typed results
//! or one [`super::error::ServiceError`]. HTTP handlers ([`super::handlers`]) only parse a
//! request and call one of these; the status of an error is decided in `error.rs`.

pub mod calls;
pub mod templates;
pub mod vms;
