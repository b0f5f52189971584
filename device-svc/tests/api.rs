//! The admin API over HTTP: registration, configuration, credentials (verified by a real
//! gateway login), and its answers to bad input, unknown ids and conflicts.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use protocol::cabinet::LoginStatus;
use serde_json::json;
use testkit::cabinet::Cabinet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn registry_round_trips_and_rejects_bad_input_by_field() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);

    let product = json!({"id": "cola-330", "name": "Cola 330 ml", "unit_grams": 350, "price_cents": 300});
    expect(api, "POST", "/v1/products", Some(product.clone()), 201).await;
    assert_eq!(expect(api, "GET", "/v1/products/cola-330", None, 200).await, product);
    assert_eq!(expect(api, "POST", "/v1/products", Some(product), 409).await["error"], "conflict");
    let bad = expect(
        api,
        "POST",
        "/v1/products",
        Some(json!({"id": "x", "name": "x", "unit_grams": 0, "price_cents": 1})),
        400,
    )
    .await;
    assert_eq!(bad["field"], "unit_grams");
    expect(api, "GET", "/v1/products/nope", None, 404).await;

    let cabinet = json!({
        "id": "cab-api-1", "name": "Lobby", "location": "Building 3",
        "doors": [{"door_id": 1, "lanes": [{"lane_id": 1, "product_id": "cola-330", "restock_threshold": 3}, {"lane_id": 2}]}]
    });
    let issued = expect(api, "POST", "/v1/cabinets", Some(cabinet.clone()), 201).await;
    assert_eq!(issued["device"], "cab:cab-api-1");
    assert_eq!(issued["secret"].as_str().unwrap().len(), 64);
    expect(api, "POST", "/v1/cabinets", Some(cabinet), 409).await;
    let got = expect(api, "GET", "/v1/cabinets/cab-api-1", None, 200).await;
    assert_eq!(got["doors"][0]["lanes"][0]["product_id"], "cola-330");
    assert_eq!(got["doors"][0]["lanes"][1]["product_id"], serde_json::Value::Null);

    // Field-level errors: missing, wrong type, nested, and rule violations.
    let e = expect(api, "POST", "/v1/cabinets", Some(json!({"id": "cab-api-2"})), 400).await;
    assert_eq!(e["field"], "doors");
    let e =
        expect(api, "POST", "/v1/cabinets", Some(json!({"id": "cab-api-2", "doors": [{"door_id": "one"}]})), 400).await;
    assert_eq!(e["field"], "doors[0].door_id");
    let e = expect(api, "POST", "/v1/cabinets", Some(json!({"id": "bad id!", "doors": [{"door_id": 1}]})), 400).await;
    assert_eq!(e["field"], "id");
    let e = expect(
        api,
        "POST",
        "/v1/cabinets",
        Some(json!({"id": "cab-api-2", "doors": [{"door_id": 1, "lanes": [{"lane_id": 1, "product_id": "ghost"}]}]})),
        400,
    )
    .await;
    assert_eq!(e["field"], "product_id");
    // The failed registration left nothing behind.
    expect(api, "GET", "/v1/cabinets/cab-api-2", None, 404).await;
    let (status, body) = http(api, "POST", "/v1/products", None).await;
    assert_eq!((status, body["field"].as_str()), (400, Some("body")));

    // Lanes: reconfigure, add, and refuse unknown doors and products.
    let lane = json!({"product_id": "cola-330", "restock_threshold": 5});
    expect(api, "PUT", "/v1/cabinets/cab-api-1/doors/1/lanes/2", Some(lane.clone()), 200).await;
    expect(api, "PUT", "/v1/cabinets/cab-api-1/doors/1/lanes/3", Some(lane.clone()), 200).await;
    let got = expect(api, "GET", "/v1/cabinets/cab-api-1", None, 200).await;
    assert_eq!(got["doors"][0]["lanes"].as_array().unwrap().len(), 3);
    assert_eq!(got["doors"][0]["lanes"][1]["restock_threshold"], 5);
    expect(api, "PUT", "/v1/cabinets/cab-api-1/doors/9/lanes/1", Some(lane.clone()), 404).await;
    let e = expect(api, "PUT", "/v1/cabinets/cab-api-1/doors/x/lanes/1", Some(lane), 400).await;
    assert_eq!(e["field"], "door");
    let e =
        expect(api, "PUT", "/v1/cabinets/cab-api-1/doors/1/lanes/1", Some(json!({"product_id": "ghost"})), 400).await;
    assert_eq!(e["field"], "product_id");

    // Vehicles.
    let issued =
        expect(api, "POST", "/v1/vehicles", Some(json!({"vin": "LSVAU2180N2183294", "model": "E1"})), 201).await;
    assert_eq!(issued["device"], "veh:LSVAU2180N2183294");
    expect(api, "POST", "/v1/vehicles", Some(json!({"vin": "LSVAU2180N2183294"})), 409).await;
    let e = expect(api, "POST", "/v1/vehicles", Some(json!({"vin": "IOQ"})), 400).await;
    assert_eq!(e["field"], "vin");
    let v = expect(api, "GET", "/v1/devices/veh:LSVAU2180N2183294", None, 200).await;
    assert_eq!((v["kind"].as_str(), v["status"].as_str()), (Some("veh"), Some("registered")));

    // Devices.
    let e = expect(api, "GET", "/v1/devices/nonsense", None, 400).await;
    assert_eq!(e["field"], "key");
    expect(api, "GET", "/v1/devices/cab:ghost", None, 404).await;
    expect(api, "GET", "/v1/devices/cab:ghost/history", None, 404).await;
    expect(api, "POST", "/v1/devices/cab:ghost/credentials", None, 404).await;
    expect(api, "GET", "/v1/cabinets/ghost/weights", None, 404).await;

    assert_eq!(http(api, "GET", "/healthz", None).await.0, 200);
    let metrics = metrics_text(api).await;
    assert!(&metrics.contains("devsvc_weight_readings_persisted_total"), "{metrics}");
    svc.stop().await;
}

#[tokio::test]
async fn rotated_and_disabled_credentials_take_effect_at_the_gateway() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    let (id, old) = register_cabinet(api, "cab-cred-1", &[(1, 1)]).await;
    let gw = stack.cabinet_addr();
    drop(login(gw, &id, &old).await);

    let rotated = expect(api, "POST", "/v1/devices/cab:cab-cred-1/credentials", None, 200).await;
    assert_eq!(rotated["generation"], 2);
    let new = hex::decode(rotated["secret"].as_str().unwrap()).unwrap();
    assert_eq!(Cabinet::login(gw, &id, &old).await.1.status, LoginStatus::BadTag);
    drop(login(gw, &id, &new).await);

    expect(api, "PUT", "/v1/devices/cab:cab-cred-1/enabled", Some(json!({"enabled": false})), 204).await;
    assert_eq!(Cabinet::login(gw, &id, &new).await.1.status, LoginStatus::Disabled);
    expect(api, "PUT", "/v1/devices/cab:cab-cred-1/enabled", Some(json!({"enabled": true})), 204).await;
    drop(login(gw, &id, &new).await);

    // A secret is never stored where the gateway would not need it: the vehicle token only as
    // its hash.
    let token = expect(api, "POST", "/v1/vehicles", Some(json!({"vin": "LSVAU2180N2183295"})), 201).await["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let row = stack
        .pg()
        .await
        .query_one(
            "SELECT secret IS NULL, token_sha256 FROM device_credentials WHERE device_key = 'veh:LSVAU2180N2183295'",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    let hash: Vec<u8> = row.get(1);
    assert_ne!(hash, token.as_bytes());
    assert_eq!(hash.len(), 32);
    svc.stop().await;
}

#[tokio::test]
async fn factory_provisioned_credentials_are_kept_and_checked() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    let secret = "5a".repeat(32);
    let doors = json!([{"door_id": 1, "lanes": [{"lane_id": 1}]}]);
    let issued =
        expect(api, "POST", "/v1/cabinets", Some(json!({"id": "cab-fab-1", "doors": doors, "secret": secret})), 201)
            .await;
    assert_eq!(issued["secret"], secret.as_str());
    let id = protocol::DeviceId::new("cab-fab-1").unwrap();
    login(stack.cabinet_addr(), &id, &hex::decode(&secret).unwrap()).await;
    let short = json!({"id": "cab-fab-2", "doors": doors, "secret": "5a5a"});
    assert_eq!(expect(api, "POST", "/v1/cabinets", Some(short), 400).await["field"], "secret");

    let token = "factory-token-0001";
    let vin = "LSVAU2180N2000077";
    let issued = expect(api, "POST", "/v1/vehicles", Some(json!({"vin": vin, "token": token})), 201).await;
    assert_eq!(issued["secret"], token);
    common::car::Car::connect(stack.mqtt_addr(), vin, token).await.disconnect().await;
    let bad = json!({"vin": "LSVAU2180N2000078", "token": "short"});
    assert_eq!(expect(api, "POST", "/v1/vehicles", Some(bad), 400).await["field"], "token");
    svc.stop().await;
}

#[tokio::test]
async fn concurrent_registrations_do_not_exhaust_a_small_pool() {
    let stack = Stack::new().await;
    let mut config = stack.svc_config("svc-1");
    config.postgres.pool_size = 2;
    let svc = stack.service_with(config).await;
    let api = stack.api(svc.addr);
    // Each registration writes in a transaction, then mirrors the credentials to Redis: with
    // more requests than connections, none may hold one connection while waiting for another.
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let body = json!({"id": format!("cab-pool-{i}"), "doors": [{"door_id": 1, "lanes": [{"lane_id": 1}]}]});
            tokio::spawn(async move { http(api, "POST", "/v1/cabinets", Some(body)).await.0 })
        })
        .chain((0..8).map(|i| {
            let body = json!({"vin": format!("LSVAU2180N20000{i:02}")});
            tokio::spawn(async move { http(api, "POST", "/v1/vehicles", Some(body)).await.0 })
        }))
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 201);
    }
    svc.stop().await;
}

#[tokio::test]
async fn hostile_input_is_a_400_naming_the_field_never_a_5xx() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    let product = |name: &str| json!({"id": "p-1", "name": name, "unit_grams": 350, "price_cents": 300});

    // A web page can post text/plain or a form without a preflight, but it cannot attach an
    // API key: 401 without one; and even with a key such a body is refused before parsing.
    let body = product("Cola").to_string();
    let page = testkit::http::request("POST", "/v1/products", "text/plain", &body);
    assert_eq!(testkit::http::call_raw(api.addr, &page).await.0, 401, "a cross-site post carries no key");
    let (code, e) = testkit::http::call_raw(api.addr, &api.request("POST", "/v1/products", "text/plain", &body)).await;
    assert_eq!((code, e["error"].as_str()), (415, Some("unsupported_media_type")), "{e}");
    let form = api.request("POST", "/v1/products", "application/x-www-form-urlencoded", &body);
    assert_eq!(testkit::http::call_raw(api.addr, &form).await.0, 415);

    // What PostgreSQL would refuse, as the caller's error.
    let e = expect(api, "POST", "/v1/products", Some(product("Co\u{0}la")), 400).await;
    assert_eq!(e["field"], "name", "NUL in a body");
    let e = expect(api, "GET", "/v1/cabinets/cab%00x", None, 400).await;
    assert_eq!(e["field"], "path", "NUL in a path");
    let e = expect(api, "GET", "/v1/anomalies?cabinet_id=a%00b", None, 400).await;
    assert_eq!(e["field"], "query", "NUL in a query");
    let mut dear = product("Gold");
    dear["price_cents"] = json!(1_000_000_000_000_000_i64);
    let e = expect(api, "POST", "/v1/products", Some(dear), 400).await;
    assert_eq!(e["field"], "price_cents", "a price of 10^15");
    let lanes = json!([{"door_id": 1, "lanes": [{"lane_id": 1, "price_cents": -1}]}]);
    let e = expect(api, "POST", "/v1/cabinets", Some(json!({"id": "cab-neg", "doors": lanes})), 400).await;
    assert_eq!(e["field"], "price_cents", "a negative lane price at registration");
    let e = expect(api, "POST", "/v1/products", Some(product(&"x".repeat(5000))), 400).await;
    assert_eq!(e["field"], "name", "a text longer than 4 KiB");
    let e = expect(api, "POST", "/v1/products", Some(product(&"x".repeat(1_900_000))), 400).await;
    assert_eq!(e["field"], "body", "a body over http.max_body_bytes");
    let task = |start: u64| {
        json!({"name": "t", "version": "2.0.0", "upgrade_type": "silent", "task_type": "normal",
               "package": {"id": "p", "size_bytes": 1, "sha256": "a".repeat(64), "signature": "s", "url": "https://x"},
               "start_at_ms": start, "vins": ["LSVAU2180N2183294"]})
    };
    let e = expect(api, "POST", "/v1/ota/tasks", Some(task(u64::MAX)), 400).await;
    assert_eq!(e["field"], "start_at_ms", "a number past i64");
    let e = expect(api, "POST", "/v1/ota/tasks", Some(task(253_402_300_800_000)), 400).await;
    assert_eq!(e["field"], "start_at_ms", "a time past year 9999");
    register_cabinet(api, "cab-h", &[(1, 1)]).await;
    let readings = "/v1/cabinets/cab-h/doors/1/lanes/1/readings?from_ms=0&to_ms=18446744073709551615";
    let e = expect(api, "GET", readings, None, 400).await;
    assert_eq!(e["field"], "to_ms", "a time past year 9999 in a query");
    let vins: Vec<String> = (0..10_001).map(|n| format!("LSVAU2180N{n:07}")).collect();
    let mut many = task(1);
    many["vins"] = json!(vins);
    let e = expect(api, "POST", "/v1/ota/tasks", Some(many), 400).await;
    assert_eq!(e["field"], "vins", "more VINs than a task takes");
    svc.stop().await;
}

#[tokio::test]
async fn idle_and_half_sent_connections_cannot_hold_the_api() {
    let stack = Stack::new().await;
    let mut config = stack.svc_config("svc-1");
    config.http.max_connections = 3;
    config.http.header_timeout_ms = 500;
    let svc = stack.service_with(config).await;
    let api = stack.api(svc.addr);

    // Three sockets that never send a whole request take every connection...
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(tokio::net::TcpStream::connect(api.addr).await.unwrap());
    }
    let mut half = tokio::net::TcpStream::connect(api.addr).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: api\r\n").await.unwrap();
    // ...and are closed at the header timeout, so the next caller is answered.
    let (code, _) = tokio::time::timeout(WAIT, http(api, "GET", "/healthz", None)).await.expect("answered");
    assert_eq!(code, 200);
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, half.read_to_end(&mut rest)).await.expect("closed, not held");
    assert!(read.is_ok());
    assert!(!String::from_utf8_lossy(&rest).contains("200 OK"), "a half-sent request is never served");
    let metrics = metrics_text(api).await;
    assert!(metric(&metrics, "devsvc_http_connections_open") <= 3.0);
    svc.stop().await;
}

#[tokio::test]
async fn the_api_speaks_tls_when_given_a_certificate() {
    use rustls_pki_types::pem::PemObject;

    let stack = Stack::new().await;
    let pki = testkit::pki::Pki::new("unused");
    let mut config = stack.svc_config("svc-1");
    config.http.tls_cert = pki.path("server.pem");
    config.http.tls_key = pki.path("server.key");
    config.http.header_timeout_ms = 500;
    let svc = stack.service_with(config).await;
    let api = stack.api(svc.addr);

    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from_pem_file(pki.path("ca.pem")).unwrap()).unwrap();
    let client =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let addr = svc.addr;
    let over_tls = |request: String| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, tcp).await.expect("the API's certificate verifies");
            tls.write_all(request.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            // A TLS peer may close without close_notify after `Connection: close`; what was read counts.
            let _ = tls.read_to_end(&mut answer).await;
            String::from_utf8_lossy(&answer).into_owned()
        }
    };
    let answer = over_tls(api.request("GET", "/v1/alerts", "application/json", "")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = over_tls(api.anonymous().request("GET", "/v1/alerts", "application/json", "")).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "the key is still asked for over TLS: {answer}");

    // Plain HTTP on the TLS port gets no HTTP answer, and a silent peer is dropped at the
    // handshake deadline rather than held.
    let mut plain = tokio::net::TcpStream::connect(svc.addr).await.unwrap();
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, plain.read_to_end(&mut rest)).await.expect("closed, not held").ok();
    assert!(!String::from_utf8_lossy(&rest).contains("HTTP/1.1 200"));
    let mut silent = tokio::net::TcpStream::connect(svc.addr).await.unwrap();
    let closed = tokio::time::timeout(WAIT, silent.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "a peer that never starts its handshake is closed at the deadline");
    svc.stop().await;
}

/// Every answer is counted by route pattern, method and status, refusals included, and the
/// labels never carry the path a caller chose (which would grow the series without bound).
#[tokio::test]
async fn every_answer_is_counted_by_route_pattern_method_and_status() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    expect(api, "GET", "/v1/devices/cab:nobody-here", None, 404).await;
    let (anonymous, _) = http(api.anonymous(), "GET", "/v1/devices/cab:nobody-here", None).await;
    assert_eq!(anonymous, 401);
    let (unrouted, _) = http(api, "GET", "/v1/no-such-route-here", None).await;
    assert_eq!(unrouted, 404);
    let text = &metrics_text(api).await;
    let count = |name: &str, labels: &[&str]| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    };
    let device = r#"route="/v1/devices/{key}""#;
    let get = r#"method="GET""#;
    assert_eq!(count("devsvc_http_requests_total", &[device, get, r#"status="404""#]), 1.0, "{text}");
    assert_eq!(count("devsvc_http_requests_total", &[device, get, r#"status="401""#]), 1.0, "{text}");
    assert_eq!(count("devsvc_http_requests_total", &[r#"route="unmatched""#, get, r#"status="404""#]), 1.0);
    assert_eq!(count("devsvc_http_request_duration_seconds_count", &[device, get]), 2.0);
    assert!(!text.contains("nobody-here") && !text.contains("no-such-route"), "a caller's path is never a label");
    svc.stop().await;
}

/// A registration whose credentials Redis refused (here: out of memory; in life also down or
/// unreachable) is answered 201 from PostgreSQL, and its credentials reach Redis within seconds
/// of Redis taking writes again, not at the next minute's rewrite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_redis_refused_at_registration_are_written_within_seconds() {
    let stack = Stack::new_private_redis().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    let mut con = stack.redis.clone();
    let admin = stack.redis.clone();
    let set = |name: &'static str, value: &'static str| {
        let mut con = admin.clone();
        async move {
            let () = redis::cmd("CONFIG").arg("SET").arg(name).arg(value).query_async(&mut con).await.unwrap();
        }
    };
    set("maxmemory-policy", "noeviction").await;
    set("maxmemory", "1").await;
    let (id, secret) = register_cabinet(api, "cab-oom-1", &[(1, 1)]).await;
    let credential = stack.keys.credentials(&protocol::bus::DeviceKey::Cabinet(id.clone()));
    let written: bool = redis::cmd("EXISTS").arg(&credential).query_async(&mut con).await.unwrap();
    assert!(!written, "Redis refused the credentials");
    set("maxmemory", "0").await;
    wait_until("a login accepted", std::time::Duration::from_secs(5), || async {
        let (_, answer) = Cabinet::login(stack.cabinet_addr(), &id, &secret).await;
        (answer.status == LoginStatus::Accepted).then_some(())
    })
    .await;
    svc.stop().await;
}

/// Every `$ref` in `v`.
fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x.as_str()) {
                    ("$ref", Some(r)) => out.push(r.to_owned()),
                    _ => refs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_openapi_document_names_every_route_with_its_roles_and_error_bodies() {
    use device_svc::http::{Access, routes};
    let stack = Stack::new().await;
    let svc = stack.service("svc-openapi").await;
    let api = stack.api(svc.addr);
    assert_eq!(http(api.anonymous(), "GET", "/v1/openapi.json", None).await.0, 401);
    let viewer = api.with_key(&stack.key(device_svc::auth::Role::Viewer, None).await);
    let doc = expect(viewer, "GET", "/v1/openapi.json", None, 200).await;
    assert_eq!(doc["openapi"], "3.1.0");

    let served = routes();
    let operations: usize = doc["paths"].as_object().unwrap().values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(operations, served.len(), "one operation per route, none more");
    let error_ref = json!({"$ref": "#/components/schemas/Error"});
    for route in &served {
        let name = format!("{} {}", route.method, route.path);
        let op = &doc["paths"][route.path][route.method.as_str().to_lowercase()];
        assert!(op.is_object(), "{name} is not in the document");
        let roles: Vec<&str> = op["x-roles"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
        let responses = op["responses"].as_object().unwrap();
        match route.access {
            Access::Roles(expected) => {
                assert_eq!(roles, expected.iter().map(|r| r.as_str()).collect::<Vec<_>>(), "{name}");
                assert_eq!(op["security"], json!([{"apiKey": []}]), "{name}");
                for status in ["401", "403", "429"] {
                    assert!(responses.contains_key(status), "{name} has no {status}");
                }
            }
            Access::PaymentProvider => {
                assert_eq!(roles, ["payment_provider"], "{name}");
                assert!(responses.contains_key("401"), "{name} has no 401");
            }
            Access::VehicleUrl => {
                assert_eq!(roles, ["vehicle_url"], "{name}");
                assert!(responses.contains_key("403"), "{name} has no 403");
            }
            Access::Public => assert!(roles.is_empty(), "{name}"),
        }
        if route.path.contains('{') {
            assert!(responses.contains_key("404"), "{name} has no 404");
        }
        for (status, answer) in responses {
            if !status.starts_with('2') {
                assert_eq!(answer["content"]["application/json"]["schema"], error_ref, "{name} {status}");
            }
        }
        assert!(responses.keys().any(|s| s.starts_with('2')), "{name} has no success");
    }
    // Every reference resolves.
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in all {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("{r}"));
        assert!(doc["components"]["schemas"][name].is_object(), "{r} does not resolve");
    }
    // The generated bodies are the served ones: an order's fields are in its schema.
    let order = &doc["components"]["schemas"]["Order"]["properties"];
    for field in ["id", "state", "payment", "charged_cents", "refunded_cents"] {
        assert!(order[field].is_object(), "Order.{field}");
    }
    // And a validator nobody here wrote accepts it as OpenAPI 3.1 (scripts/test installs it).
    let path = std::env::temp_dir().join(testkit::unique_name("openapi")).with_extension("json");
    std::fs::write(&path, doc.to_string()).unwrap();
    let out = std::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&path)
        .output()
        .expect("python3 runs (scripts/test installs openapi-spec-validator from PyPI)");
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "openapi-spec-validator refused the document: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    svc.stop().await;
}
