//! `/openapi.json` as this server answers it: the document generated from the handlers, completed
//! with what their attributes cannot say. Every status code an operation can answer, bounds equal
//! to the limits this server was started with, the bearer security scheme, closed request objects,
//! and 64-bit unsigned integers declared as such (`format: uint64`, `0..=2^64-1`).

use serde_json::{json, Map, Value};
use utoipa::OpenApi;

use super::app::Limits;
use super::routes::ApiDoc;

/// Guest RAM below this is the VMM's own (page tables, kernel); warm-up data starts here.
const WARMUP_START_MIB: u64 = 8;
/// Most pages one write probe may touch.
const MAX_PROBE_PAGES: u64 = cowvm_vmm::probe::MAX_PROBE_PAGES;
/// The commands of the built-in guest (`POST /v1/vms/{id}/run`).
pub const COMMANDS: [&str; 7] = ["exit", "write", "checksum", "identity", "triple_fault", "spin", "halt"];

/// What the document describes: the server as it was started.
#[derive(Debug, Clone)]
pub struct SpecOptions {
    /// The limits it enforces.
    pub limits: Limits,
    /// Whether requests need a bearer token.
    pub token: bool,
    /// Whether `POST /v1/vms` accepts kernel names (`--kernel-dir`).
    pub kernels: bool,
}

/// The OpenAPI document of a server started with `options`.
pub fn document(options: &SpecOptions) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_else(|_| json!({}));
    if let Some(schemas) = doc.pointer_mut("/components/schemas").and_then(Value::as_object_mut) {
        for schema in schemas.values_mut() {
            declare_unsigned(schema);
            string_map_keys(schema);
        }
        bound_requests(schemas, options);
    }
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, operations) in paths.iter_mut() {
            let Some(operations) = operations.as_object_mut() else {
                continue;
            };
            for (method, operation) in operations.iter_mut() {
                add_statuses(path, method, operation, options.token);
                binary_tar(operation, options.limits.max_import_bytes);
            }
        }
    }
    let components = doc
        .as_object_mut()
        .map(|d| d.entry("components").or_insert_with(|| json!({})));
    if let Some(components) = components.and_then(Value::as_object_mut) {
        components.insert(
            "securitySchemes".into(),
            json!({ "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "`Authorization: Bearer <token>` with the token of `--token-file`; \
                                required only when the server was started with one"
            }}),
        );
    }
    if options.token {
        doc["security"] = json!([{ "bearer": [] }]);
    }
    doc
}

/// Statuses beyond the handler's own list that `method path` can answer, by what it takes.
fn add_statuses(path: &str, method: &str, operation: &mut Value, token: bool) {
    let takes_id = path.contains("{id}");
    let takes_body = operation.get("requestBody").is_some();
    let mut statuses: Vec<u16> = Vec::new();
    if token {
        statuses.push(401);
    }
    if takes_id {
        statuses.extend([400, 404]);
    }
    if takes_body {
        statuses.extend([400, 413, 415, 422]);
    }
    statuses.extend(match (method, path) {
        ("post", "/v1/vms") => &[429, 503][..],
        ("post", "/v1/vms/{id}/clones")
        | ("post", "/v1/templates/{id}/clones")
        | ("post", "/v1/templates/{id}/call") => &[409, 429, 503][..],
        ("post", "/v1/vms/{id}/call") => &[409, 503][..],
        // A clone's probe makes a scratch clone, which needs room under --max-vms.
        ("post", "/v1/vms/{id}/probes/write") => &[409, 429, 503][..],
        ("post", "/v1/vms/{id}/snapshot")
        | ("post", "/v1/vms/{id}/reset")
        | ("post", "/v1/vms/{id}/run")
        | ("get", "/v1/vms/{id}/stats")
        | ("delete", "/v1/templates/{id}") => &[409, 503][..],
        ("delete", "/v1/vms/{id}") | ("get", "/v1/templates/{id}/stats") => &[503][..],
        ("post", "/v1/templates/import") => &[503][..],
        _ => &[][..],
    });
    let Some(responses) = operation.get_mut("responses").and_then(Value::as_object_mut) else {
        return;
    };
    for status in statuses {
        responses
            .entry(status.to_string())
            .or_insert_with(|| error_response(status));
    }
}

/// Template archives (`application/x-tar` request and response bodies) are binary strings, and an
/// import body is bounded by `--max-import-bytes`.
fn binary_tar(operation: &mut Value, max_import_bytes: u64) {
    if let Some(content) = operation
        .pointer_mut("/requestBody/content")
        .and_then(Value::as_object_mut)
        .filter(|c| c.contains_key("application/x-tar"))
    {
        // Any body type is read as the archive; `application/octet-stream` is listed too so that
        // generic clients and fuzzers that know no tar serializer can send bytes.
        let binary = json!({"schema": {"type": "string", "format": "binary",
            "description": format!("an OCI image layout tar, at most {max_import_bytes} bytes (--max-import-bytes)")}});
        content.insert("application/x-tar".into(), binary.clone());
        content.insert("application/octet-stream".into(), binary);
    }
    if let Some(schema) = operation.pointer_mut("/responses/200/content/application~1x-tar/schema") {
        *schema = json!({"type": "string", "format": "binary"});
    }
}

fn error_response(status: u16) -> Value {
    let description = match status {
        400 => "malformed request: unparsable JSON, a body that is not an object, a wrong type or unknown field, a bad path",
        401 => "missing or wrong bearer token",
        404 => "no such VM or template",
        409 => "the VM or template is in a state that forbids this (failed, lost with its cell, not a clone, has clones)",
        413 => "body larger than the server's limit",
        415 => "body without Content-Type: application/json",
        422 => "a well-formed value outside what is allowed",
        429 => "the server holds its limit of VMs",
        503 => "a host resource ran out, statistics are unavailable, or the request timed out",
        _ => "error",
    };
    let mut response = json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ErrorBody" } } }
    });
    if status == 401 {
        response["headers"] = json!({ "WWW-Authenticate": {
            "description": "`Bearer`", "required": true, "schema": { "type": "string" }
        }});
    }
    response
}

/// Integers that the handlers take or give as `u64`/`u32`/`usize` are `minimum: 0` in the generated
/// schema but say `int64`/`int32`; declare them unsigned with their true maximum.
fn declare_unsigned(schema: &mut Value) {
    match schema {
        Value::Object(object) => {
            let unsigned = object.get("minimum").and_then(Value::as_u64) == Some(0) && is_integer(object.get("type"));
            let width = object.get("format").and_then(Value::as_str);
            if unsigned && matches!(width, Some("int64" | "int32")) {
                let (format, max) = match width {
                    Some("int64") => ("uint64", u64::MAX),
                    _ => ("uint32", u64::from(u32::MAX)),
                };
                object.insert("format".into(), format.into());
                object.entry("maximum").or_insert_with(|| max.into());
            }
            for value in object.values_mut() {
                declare_unsigned(value);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(declare_unsigned),
        _ => {}
    }
}

/// JSON object keys are strings: a map keyed by numbers (`histogram`) gets `propertyNames` of
/// decimal digits, not utoipa's `integer`.
fn string_map_keys(schema: &mut Value) {
    match schema {
        Value::Object(object) => {
            if let Some(names) = object.get_mut("propertyNames") {
                if is_integer(names.get("type")) {
                    *names = json!({ "type": "string", "pattern": "^(0|[1-9][0-9]*)$" });
                }
            }
            object.values_mut().for_each(string_map_keys);
        }
        Value::Array(items) => items.iter_mut().for_each(string_map_keys),
        _ => {}
    }
}

fn is_integer(kind: Option<&Value>) -> bool {
    match kind {
        Some(Value::String(s)) => s == "integer",
        Some(Value::Array(kinds)) => kinds.iter().any(|k| k == "integer"),
        _ => false,
    }
}

/// Bounds of request fields, equal to what the handlers check.
fn bound_requests(schemas: &mut Map<String, Value>, options: &SpecOptions) {
    let limits = &options.limits;
    let max_vms = limits.max_vms as u64;
    let bound = |schemas: &mut Map<String, Value>, name: &str, field: &str, min: u64, max: u64| {
        if let Some(property) = schemas
            .get_mut(name)
            .and_then(|s| s.pointer_mut(&format!("/properties/{field}")))
        {
            property["minimum"] = min.into();
            property["maximum"] = max.into();
        }
    };
    bound(schemas, "CreateVm", "memory_mib", 4, limits.max_memory_mib);
    bound(schemas, "CreateVm", "vcpus", 1, limits.max_vcpus as u64);
    bound(
        schemas,
        "RunCommand",
        "vcpu",
        0,
        limits.max_vcpus.saturating_sub(1) as u64,
    );
    bound(
        schemas,
        "CreateVm",
        "warmup_mib",
        0,
        limits.max_memory_mib.saturating_sub(WARMUP_START_MIB),
    );
    bound(
        schemas,
        "CloneRequest",
        "count",
        1,
        (limits.max_clones_per_call as u64).min(max_vms),
    );
    bound(schemas, "WarmRequest", "shells", 0, max_vms);
    bound(schemas, "ProbeRange", "pages", 1, MAX_PROBE_PAGES);
    if let Some(gpas) = schemas
        .get_mut("ProbeList")
        .and_then(|s| s.pointer_mut("/properties/gpas"))
    {
        gpas["minItems"] = 1.into();
        gpas["maxItems"] = MAX_PROBE_PAGES.into();
    }
    if let Some(command) = schemas
        .get_mut("RunCommand")
        .and_then(|s| s.pointer_mut("/properties/command"))
    {
        command["enum"] = json!(COMMANDS);
    }
    if let Some(kernel) = schemas
        .get_mut("CreateVm")
        .and_then(|s| s.pointer_mut("/properties/kernel"))
    {
        *kernel = if options.kernels {
            json!({
                "type": ["string", "null"],
                "pattern": "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$",
                "description": "A kernel file name inside the server's --kernel-dir, or null for the built-in guest."
            })
        } else {
            json!({
                "type": "null",
                "description": "Always null: this server was started without --kernel-dir and boots only the built-in guest."
            })
        };
    }
    for name in [
        "CreateVm",
        "CloneRequest",
        "WarmRequest",
        "ProbeList",
        "ProbeRange",
        "RunCommand",
    ] {
        if let Some(schema) = schemas.get_mut(name) {
            schema["additionalProperties"] = false.into();
        }
    }
}
