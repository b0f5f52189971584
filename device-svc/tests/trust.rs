//! The API's trust boundary against the real service: every route of the route table asks for
//! the right credentials (401 without, 403 for a role it does not list), the attacks that were
//! found are refused and recorded, keys are revoked at once, and a key above its rate gets 429.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use device_svc::auth::Role;
use device_svc::http::{Access, routes};
use serde_json::json;

/// A path of the route table with its parameters filled in.
fn concrete(path: &str) -> String {
    path.replace("{key}", "cab:nobody")
        .replace("{door}", "1")
        .replace("{lane}", "1")
        .replace("{vin}", "LSVAU2180N2183294")
        .replace("{list}", "whitelist")
        .replace("{id}", "nothing")
        .replace("{qr_id}", "nothing")
}

#[tokio::test]
async fn every_route_asks_for_a_key_of_a_role_it_lists() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    let mut keys = Vec::new();
    for role in Role::ALL {
        let tenant = (role == Role::Shop).then_some("shop-1");
        keys.push((role, stack.key(role, tenant).await));
    }
    let table = routes();
    assert!(table.len() > 40, "the table lists every route");
    for route in &table {
        let path = concrete(route.path);
        let method = route.method.as_str();
        let body = (method != "GET" && method != "DELETE").then(|| json!({}));
        let (anonymous, _) = http(api.anonymous(), method, &path, body.clone()).await;
        match route.access {
            Access::Public => assert_eq!(anonymous, 200, "{method} {path} is public"),
            Access::PaymentProvider => assert_eq!(anonymous, 401, "{method} {path} needs a signature"),
            Access::VehicleUrl => assert_eq!(anonymous, 403, "{method} {path} needs a signed URL"),
            Access::Roles(allowed) => {
                assert_eq!(anonymous, 401, "{method} {path} without a key");
                for (role, key) in &keys {
                    let (code, answer) = http(api.with_key(key), method, &path, body.clone()).await;
                    if allowed.contains(role) {
                        assert!(code != 401 && code != 403, "{role} may call {method} {path}: {code} {answer}");
                    } else {
                        assert_eq!(code, 403, "{role} may not call {method} {path}: {answer}");
                    }
                }
            }
        }
    }
    // A key that is not one: 401, and no route is told apart by it.
    let forged = api.with_key(&format!("iotk_{}_{}", "0".repeat(16), "0".repeat(64)));
    assert_eq!(http(forged, "GET", "/v1/alerts", None).await.0, 401);
    svc.stop().await;
}

#[tokio::test]
async fn the_attacks_found_are_refused_recorded_and_counted() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    register_cabinet(api, "cab-t-1", &[(1, 1)]).await;
    let viewer = api.with_key(&stack.parties.viewer);
    let shop = api.with_key(&stack.parties.shop);
    let open = json!({"action": "open_door", "door_id": 1, "order_id": "none"});
    let attacks = [
        ("POST", "/v1/devices/cab:cab-t-1/commands", Some(open.clone())),
        ("POST", "/v1/devices/cab:cab-t-1/credentials", None),
        ("PUT", "/v1/cabinets/cab-t-1/doors/1/lanes/1", Some(json!({"price_cents": 0}))),
        ("PATCH", "/v1/vehicles/LSVAU2180N2183294", Some(json!({"purpose": "test"}))),
        ("PUT", "/v1/ota/lists/downgrade/LSVAU2180N2183294", Some(json!({"note": "x"}))),
        ("POST", "/v1/keys", Some(json!({"name": "mine", "role": "operator"}))),
        ("GET", "/v1/keys", None),
    ];
    for (method, path, body) in &attacks {
        assert_eq!(http(api.anonymous(), method, path, body.clone()).await.0, 401, "anonymous {method} {path}");
        assert_eq!(http(viewer, method, path, body.clone()).await.0, 403, "viewer {method} {path}");
        assert_eq!(http(shop, method, path, body.clone()).await.0, 403, "shop {method} {path}");
    }
    // Each refusal to a known caller is in the audit trail (anonymous ones are only counted).
    let viewer_id = &stack.parties.viewer[5..21];
    let trail = expect(api, "GET", &format!("/v1/audit?principal=key:{viewer_id}"), None, 200).await;
    let rows = trail.as_array().unwrap();
    assert_eq!(rows.len(), attacks.len(), "{trail}");
    assert!(rows.iter().all(|r| r["outcome"] == "forbidden" && r["role"] == "viewer"), "{trail}");
    assert_eq!(rows.last().unwrap()["target"], "/v1/devices/cab:cab-t-1/commands");
    let text = &metrics_text(api).await;
    assert_eq!(metric(text, "devsvc_api_auth_total{result=\"missing\"}"), attacks.len() as f64);
    assert_eq!(metric(text, "devsvc_api_auth_total{result=\"forbidden\"}"), 2.0 * attacks.len() as f64);

    // The operator's own change is recorded in its transaction, with the request id answered.
    let operator_id = &stack.parties.operator[5..21];
    let (status, head, _) = testkit::http::exchange(
        api.addr,
        &api.request(
            "POST",
            "/v1/products",
            "application/json",
            r#"{"id":"p-a","name":"A","unit_grams":10,"price_cents":1}"#,
        ),
    )
    .await;
    assert_eq!(status, 201);
    let request_id = head.lines().find_map(|l| l.strip_prefix("x-request-id: ")).expect("a request id").to_owned();
    let trail = expect(api, "GET", "/v1/audit?route=/v1/products", None, 200).await;
    let row = &trail[0];
    assert_eq!(
        (row["principal"].as_str(), row["outcome"].as_str()),
        (Some(&*format!("key:{operator_id}")), Some("ok"))
    );
    assert_eq!(row["request_id"], request_id);
    let text = metrics_text(api).await;
    assert!(metric(&text, "devsvc_audit_rows_total{written=\"in_transaction\"}") >= 1.0);
    svc.stop().await;
}

#[tokio::test]
async fn a_revoked_key_stops_at_once_and_a_fast_key_is_slowed() {
    let stack = Stack::new().await;
    let mut config = stack.svc_config("svc-1");
    config.auth.rate_per_s = 1;
    config.auth.burst = 3;
    let svc = stack.service_with(config).await;
    let api = stack.api(svc.addr);
    let made = expect(api, "POST", "/v1/keys", Some(json!({"name": "ops-2", "role": "operator"})), 201).await;
    let key = made["key"].as_str().unwrap();
    let id = made["id"].as_str().unwrap();
    assert!(key.starts_with("iotk_") && key.contains(id));
    let listed = expect(api, "GET", "/v1/keys", None, 200).await;
    assert!(!listed.to_string().contains(&key[22..]), "a listing never shows a secret");
    let second = api.with_key(key);
    assert_eq!(http(second, "GET", "/v1/alerts", None).await.0, 200);
    // A key cannot revoke itself; another operator revokes it and it stops at once.
    assert_eq!(http(second, "POST", &format!("/v1/keys/{id}/revoke"), None).await.0, 409);
    expect(api, "POST", &format!("/v1/keys/{id}/revoke"), None, 200).await;
    assert_eq!(http(second, "GET", "/v1/alerts", None).await.0, 401);

    // The burst, then 429 with Retry-After.
    let viewer = api.with_key(&stack.parties.viewer);
    for _ in 0..3 {
        assert_eq!(http(viewer, "GET", "/v1/alerts", None).await.0, 200);
    }
    let (code, head, body) =
        testkit::http::exchange(api.addr, &viewer.request("GET", "/v1/alerts", "application/json", "")).await;
    assert_eq!((code, body["error"].as_str()), (429, Some("rate_limited")), "{body}");
    let retry: u64 = head.lines().find_map(|l| l.strip_prefix("retry-after: ")).expect("Retry-After").parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    // Another key is not slowed by it.
    let fresh = api.with_key(&stack.key(Role::Viewer, None).await);
    assert_eq!(http(fresh, "GET", "/v1/alerts", None).await.0, 200);
    svc.stop().await;
}
