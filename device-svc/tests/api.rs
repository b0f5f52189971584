//! The admin API over HTTP: registration, configuration, credentials (verified by a real
//! gateway login), and its answers to bad input, unknown ids and conflicts.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use protocol::cabinet::LoginStatus;
use serde_json::json;
use testkit::cabinet::Cabinet;

#[tokio::test]
async fn registry_round_trips_and_rejects_bad_input_by_field() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = svc.addr;

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
    let metrics = http(api, "GET", "/metrics", None).await.1;
    assert!(metrics.as_str().unwrap().contains("devsvc_weight_readings_persisted_total"), "{metrics}");
    svc.stop().await;
}

#[tokio::test]
async fn rotated_and_disabled_credentials_take_effect_at_the_gateway() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = svc.addr;
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
    let api = svc.addr;
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
    let api = svc.addr;
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
