//! The API described as an OpenAPI 3.1 document, generated from the code so it cannot drift:
//! the paths, methods, roles and error answers come from the route table the router is built
//! from (a route cannot be served undocumented), and the bodies from the request and answer
//! types themselves (their `utoipa::ToSchema` derives: a field cannot change without the
//! document changing). Served at `GET /v1/openapi.json`; `docs/api.md` keeps the prose.
//!
//! `utoipa` provides the schemas (it reads the serde attributes, doc comments and nested
//! types); the document around them is plain JSON, built here from [`Doc`], because the route
//! table, not a macro on each handler, is where this service says what a route is.

use serde_json::{Map, Value, json};
use utoipa::ToSchema;
use utoipa::openapi::{RefOr, Schema};

use super::guard::Access;
use super::{RouteSpec, error};

/// The schemas a body needs (pushed into `components.schemas`) and the schema to use in place.
pub(super) type SchemaFn = fn(&mut Vec<(String, RefOr<Schema>)>) -> Value;

/// What the route table says of a route beyond method, path and roles.
#[derive(Debug, Clone, Copy)]
pub(super) struct Doc {
    /// One line: what the route does.
    pub(super) summary: &'static str,
    /// Its query parameters (all optional).
    pub(super) query: &'static [&'static str],
    /// Its JSON body, if it takes one.
    pub(super) body: Option<SchemaFn>,
    /// The status of a success.
    pub(super) ok: u16,
    /// The JSON answer of a success (`None`: no body, or not JSON).
    pub(super) answer: Option<SchemaFn>,
    /// The `error` codes of its 409 answers.
    pub(super) conflicts: &'static [&'static str],
}

impl Doc {
    /// A route answering 200 without a documented body (set one with [`Doc::answer`]).
    pub(super) const fn new(summary: &'static str) -> Self {
        Doc { summary, query: &[], body: None, ok: 200, answer: None, conflicts: &[] }
    }

    /// Its query parameters.
    pub(super) const fn query(mut self, names: &'static [&'static str]) -> Self {
        self.query = names;
        self
    }

    /// Its JSON body.
    pub(super) const fn body(mut self, schema: SchemaFn) -> Self {
        self.body = Some(schema);
        self
    }

    /// Its JSON answer.
    pub(super) const fn answer(mut self, schema: SchemaFn) -> Self {
        self.answer = Some(schema);
        self
    }

    /// Answers 201 with `schema`.
    pub(super) const fn created(mut self, schema: SchemaFn) -> Self {
        self.ok = 201;
        self.answer = Some(schema);
        self
    }

    /// Answers 204 without a body.
    pub(super) const fn no_content(mut self) -> Self {
        self.ok = 204;
        self
    }

    /// The `error` codes of its 409 answers.
    pub(super) const fn conflicts(mut self, codes: &'static [&'static str]) -> Self {
        self.conflicts = codes;
        self
    }
}

fn reference(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// `T` by reference, `T`'s schemas added.
pub(super) fn of<T: ToSchema>(out: &mut Vec<(String, RefOr<Schema>)>) -> Value {
    out.push((T::name().into_owned(), T::schema()));
    T::schemas(out);
    reference(&T::name())
}

/// An array of `T`.
pub(super) fn list_of<T: ToSchema>(out: &mut Vec<(String, RefOr<Schema>)>) -> Value {
    json!({"type": "array", "items": of::<T>(out)})
}

/// A page of `T` (`crate::listing::Page`).
pub(super) fn page_of<T: ToSchema>(out: &mut Vec<(String, RefOr<Schema>)>) -> Value {
    json!({
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": of::<T>(out)},
            "next_cursor": {"type": ["string", "null"], "description": "Pass as `cursor` for the next page; null on the last."}
        }
    })
}

/// Any JSON value (an answer whose shape is documented in prose only).
pub(super) fn any(_: &mut Vec<(String, RefOr<Schema>)>) -> Value {
    json!({})
}

fn error_answer(description: String) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": reference("Error")}}
    })
}

/// The error answers a route may give: the guard's, the input checks', and its own.
fn errors(spec: &RouteSpec, doc: &Doc) -> Map<String, Value> {
    let mut out = Map::new();
    let mut add = |status: u16, why: String| {
        out.insert(status.to_string(), error_answer(why));
    };
    let has_path_ids = spec.path.contains('{');
    if doc.body.is_some() || !doc.query.is_empty() || has_path_ids {
        add(400, "`invalid`: a body, path segment or query parameter is malformed; `field` names it".into());
    }
    match spec.access {
        Access::Roles(_) => {
            add(401, "`unauthorized`: no valid API key".into());
            add(403, "`forbidden`: the key's role may not call this route".into());
            add(429, "`rate_limited`: the key is above its rate; `Retry-After` says when".into());
        }
        Access::PaymentProvider => add(401, "`unauthorized`: no valid provider signature".into()),
        Access::VehicleUrl => {
            add(403, "`bad_signature`, `expired` or `not_in_task`: the URL does not grant this download (now)".into())
        }
        Access::Public => {}
    }
    if has_path_ids {
        add(404, "`not_found`: the id in the path does not exist".into());
    }
    if doc.body.is_some() {
        add(413, "`invalid` (`body`): larger than `http.max_body_bytes`".into());
        add(415, "`unsupported_media_type`: the body is not sent as JSON".into());
    }
    if !doc.conflicts.is_empty() {
        add(409, format!("the state forbids it; `error` is one of: {}", doc.conflicts.join(", ")));
    }
    if !matches!(spec.access, Access::Public) {
        add(408, "the request was not answered within `http.request_timeout_ms`".into());
    }
    add(503, "`unavailable`: PostgreSQL or Redis cannot be reached; retry".into());
    if spec.method == axum::http::Method::PUT && spec.path == "/v1/ota/packages/{id}" {
        add(411, "`length_required`: the package must be sent with `Content-Length`".into());
        add(413, "`too_large`: over `ota.packages.max_bytes`".into());
        add(422, "`digest_mismatch`: the bytes received are not the declared `sha256`; nothing is kept".into());
    }
    if spec.path.starts_with("/v1/ota/packages") || spec.path == "/v1/ota/signing-key" {
        add(
            503,
            "`unavailable` (PostgreSQL or Redis), `not_configured` (no package keys), `storage_unavailable` (the \
             package store), `downloads_busy` (every download slot taken; `Retry-After`)"
                .into(),
        );
    }
    out
}

fn operation(spec: &RouteSpec, doc: &Doc, schemas: &mut Vec<(String, RefOr<Schema>)>) -> Value {
    let mut params: Vec<Value> = spec
        .path
        .split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
        .collect();
    params.extend(doc.query.iter().map(|name| json!({"name": name, "in": "query", "schema": {"type": "string"}})));
    let mut op = Map::new();
    let id = format!(
        "{}{}",
        spec.method.as_str().to_lowercase(),
        spec.path.replace(['{', '}'], "").replace(['/', '-'], "_")
    );
    op.insert("operationId".into(), json!(id));
    op.insert("summary".into(), json!(doc.summary));
    if !params.is_empty() {
        op.insert("parameters".into(), json!(params));
    }
    if let Some(body) = doc.body {
        op.insert(
            "requestBody".into(),
            json!({"required": true, "content": {"application/json": {"schema": body(schemas)}}}),
        );
    }
    let (roles, security) = match spec.access {
        Access::Public => (vec![], json!([])),
        Access::Roles(roles) => (roles.iter().map(|r| r.as_str()).collect(), json!([{"apiKey": []}])),
        Access::PaymentProvider => (vec!["payment_provider"], json!([{"paymentSignature": []}])),
        Access::VehicleUrl => (vec!["vehicle_url"], json!([])),
    };
    op.insert("security".into(), security);
    op.insert("x-roles".into(), json!(roles));
    let mut responses = errors(spec, doc);
    let ok = match (doc.answer, spec.path) {
        (Some(answer), _) => {
            json!({"description": "done", "content": {"application/json": {"schema": answer(schemas)}}})
        }
        (None, "/metrics") => {
            json!({"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}})
        }
        (None, "/healthz") => json!({"description": "`ok`", "content": {"text/plain": {"schema": {"type": "string"}}}}),
        (None, "/v1/ota/packages/{id}/download") => {
            let bytes = json!({"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}});
            responses.insert(
                "206".into(),
                json!({"description": "the range asked for (`Content-Range`)", "content": bytes}),
            );
            for (status, why) in [
                ("416", "`range_not_satisfiable`: the range starts past the end (`Content-Range: bytes */len`)"),
                ("500", "`package_corrupt` or `package_key_unavailable`: the stored package cannot be served"),
            ] {
                responses.insert(status.into(), error_answer(why.into()));
            }
            json!({"description": "the whole package (`ETag`: its SHA-256)", "content": bytes})
        }
        (None, _) => json!({"description": "done"}),
    };
    responses.insert(doc.ok.to_string(), ok);
    op.insert("responses".into(), Value::Object(responses));
    Value::Object(op)
}

/// The document for `routes`.
pub(super) fn document(routes: &[(RouteSpec, Doc)]) -> Value {
    let mut schemas: Vec<(String, RefOr<Schema>)> = Vec::new();
    of::<error::ErrorBody<'static>>(&mut schemas);
    let mut paths = Map::new();
    for (spec, doc) in routes {
        let op = operation(spec, doc, &mut schemas);
        let item = paths.entry(spec.path.to_owned()).or_insert_with(|| json!({}));
        item[spec.method.as_str().to_lowercase()] = op;
    }
    let mut components = Map::new();
    for (name, schema) in schemas {
        components.insert(name, serde_json::to_value(schema).unwrap_or(Value::Null));
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Device service API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Cabinets, vehicles, purchases, OTA. docs/api.md has the prose; every route but /healthz needs an API key of a role in its x-roles."
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "An API key (`device-svc keys create`, `POST /v1/keys`)"},
                "paymentSignature": {"type": "apiKey", "in": "header", "name": "X-Payment-Signature", "description": "The payment provider's HMAC over the timestamp and body (protocol/SPEC.md 3.6), with X-Payment-Provider"}
            }
        }
    })
}
