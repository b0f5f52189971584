//! Buying from a shop cabinet, for the purchase and money tests: products and shelves, a
//! device service with short purchase timers, orders, signed provider callbacks, and the
//! streams the device service writes.

#![allow(dead_code)]

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::shop::Shop;
use super::*;

pub const WATER: (&str, i32, i64) = ("water", 500, 150);
pub const CHIPS: (&str, i32, i64) = ("chips", 80, 250);
pub const COLA: (&str, i32, i64) = ("cola", 350, 300);

/// Door 1: lane 1 water, lane 2 chips, lane 3 cola (restock below 9), lane 4 chips; ten items
/// each. Door 2: one lane of water.
pub fn shelves() -> BTreeMap<(u8, u8), i32> {
    BTreeMap::from([
        ((1, 1), 10 * WATER.1),
        ((1, 2), 10 * CHIPS.1),
        ((1, 3), 10 * COLA.1),
        ((1, 4), 10 * CHIPS.1),
        ((2, 1), 10 * WATER.1),
    ])
}

pub fn purchase_config(stack: &Stack, instance: &str) -> device_svc::config::Config {
    let mut c = stack.svc_config(instance);
    c.purchases.open_timeout_ms = 600;
    c.purchases.query_interval_ms = 100;
    c.purchases.settle_wait_s = 6;
    c.purchases.lock_ttl_s = 6;
    c.purchases.poll_ms = 50;
    c
}

/// A test's stack, a device service with the purchase settings (changed by `tweak`), and
/// cabinet `id` online behind it. Returns the configuration for restarts.
pub async fn setup(
    id: &str,
    tweak: impl FnOnce(&mut device_svc::config::Config),
) -> (Stack, device_svc::config::Config, device_svc::DeviceService, Shop) {
    let stack = Stack::new().await;
    let mut config = purchase_config(&stack, "svc-1");
    tweak(&mut config);
    let svc = stack.service_with(config.clone()).await;
    let shop = shop(&stack, stack.api(svc.addr), id).await;
    (stack, config, svc, shop)
}

/// Registers the products and cabinet `id`, logs it in with its shelves, waits until online.
pub async fn shop(stack: &Stack, api: Api, id: &str) -> Shop {
    for (name, unit, price) in [WATER, CHIPS, COLA] {
        let (code, _) = http(
            api,
            "POST",
            "/v1/products",
            Some(json!({"id": name, "name": name, "unit_grams": unit, "price_cents": price})),
        )
        .await;
        assert!(code == 201 || code == 409, "product {name}: {code}");
    }
    let lane = |lane_id: u8, product: &str, threshold: i32| json!({"lane_id": lane_id, "product_id": product, "restock_threshold": threshold});
    let doors = json!([
        {"door_id": 1, "lanes": [lane(1, "water", 0), lane(2, "chips", 0), lane(3, "cola", 9), lane(4, "chips", 0)]},
        {"door_id": 2, "lanes": [lane(1, "water", 0)]},
    ]);
    let issued = expect(api, "POST", "/v1/cabinets", Some(json!({"id": id, "doors": doors})), 201).await;
    let secret = hex::decode(issued["secret"].as_str().unwrap()).unwrap();
    let device = protocol::DeviceId::new(id).unwrap();
    let cabinet = login(stack.cabinet_addr(), &device, &secret).await;
    let shop = Shop::start(cabinet, shelves());
    wait_status(api, &format!("cab:{id}"), "online").await;
    shop
}

pub async fn order(api: Api, user: &str, cabinet: &str, door: u8) -> (u16, Value) {
    http(api, "POST", "/v1/orders", Some(json!({"user_id": user, "cabinet_id": cabinet, "door_id": door}))).await
}

/// [`order`] named by the shop's `key`: a retry with the same key gets the same order.
pub async fn order_keyed(api: Api, user: &str, cabinet: &str, door: u8, key: &str) -> (u16, Value) {
    let body = json!({"user_id": user, "cabinet_id": cabinet, "door_id": door, "idempotency_key": key});
    http(api, "POST", "/v1/orders", Some(body)).await
}

/// The device service's default hold (`purchases.hold_cents`), which the provider authorises.
pub const HOLD_CENTS: i64 = 20_000;

pub async fn authorise(api: Api, id: &str) -> (u16, Value) {
    http(
        api,
        "POST",
        "/v1/payments/callback",
        Some(json!({"order_id": id, "status": "authorised", "payment_id": format!("pay-{id}"),
                    "amount_cents": HOLD_CENTS, "currency": "CNY"})),
    )
    .await
}

pub async fn wait_order(api: Api, id: &str, state: &str) -> Value {
    wait_until(&format!("order {id} {state}"), WAIT, || async {
        let v = expect(api, "GET", &format!("/v1/orders/{id}"), None, 200).await;
        (v["state"] == state).then_some(v)
    })
    .await
}

/// Entries of a stream under the test's prefix: (idem_key, payload).
pub async fn stream(stack: &Stack, name: &str) -> Vec<(String, Value)> {
    let mut con = stack.redis.clone();
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("{}{name}", stack.ns.prefix))
        .arg("-")
        .arg("+")
        .query_async(&mut con)
        .await
        .unwrap();
    reply
        .ids
        .into_iter()
        .map(|e| {
            let f = |k: &str| match e.map.get(k) {
                Some(redis::Value::BulkString(b)) => String::from_utf8(b.clone()).unwrap(),
                other => panic!("field {k}: {other:?}"),
            };
            (f("idem_key"), serde_json::from_str(&f("payload")).unwrap())
        })
        .collect()
}

pub async fn settlements(stack: &Stack) -> Vec<(String, Value)> {
    stream(stack, "account:settlements").await
}

pub async fn lock_holder(stack: &Stack, cabinet: &str, door: u8) -> Option<String> {
    let mut con = stack.redis.clone();
    redis::cmd("GET")
        .arg(format!("{}lock:{{{cabinet}}}:door:{door}", stack.ns.prefix))
        .query_async(&mut con)
        .await
        .unwrap()
}

/// Orders, authorises and waits for the door to be open; returns the order id.
pub async fn open(api: Api, user: &str, cabinet: &str, door: u8) -> String {
    let (code, o) = order(api, user, cabinet, door).await;
    assert_eq!(code, 201, "{o}");
    let id = o["id"].as_str().unwrap().to_owned();
    assert_eq!(o["state"], "created");
    let (code, a) = authorise(api, &id).await;
    assert_eq!(code, 200, "{a}");
    wait_order(api, &id, "door_open").await;
    id
}

/// Sends a payment callback for `body` signed with `secret` at `t` as provider `provider`.
pub async fn signed_callback(api: Api, provider: &str, secret: &str, t: u64, body: &Value) -> (u16, Value) {
    let text = body.to_string();
    let signature = protocol::payment::header(secret.as_bytes(), t, text.as_bytes());
    let request = format!(
        "POST /v1/payments/callback HTTP/1.1\r\nHost: api\r\nX-Payment-Provider: {provider}\r\nX-Payment-Signature: {signature}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    testkit::http::call_raw(api.addr, &request).await
}

/// The tests' provider signs a deduction contract event for `user` of the shop tenant.
pub async fn contract(api: Api, tenant: &str, user: &str, state: &str, event_ms: i64) -> (u16, Value) {
    let body = json!({"tenant": tenant, "user_id": user, "contract_id": format!("ct-{user}"), "state": state,
                      "event_ms": event_ms});
    http(api, "POST", "/v1/contracts/callback", Some(body)).await
}

/// The tenant of the tests' shop key.
pub const TENANT: &str = "shop-1";

/// Sets `user`'s balance at the reference account service.
pub async fn set_funds(stack: &Stack, user: &str, cents: i64) {
    stack
        .pg()
        .await
        .execute(
            "INSERT INTO account_funds (tenant, user_id, balance_cents) VALUES ($1, $2, $3)
             ON CONFLICT (tenant, user_id) DO UPDATE SET balance_cents = EXCLUDED.balance_cents",
            &[&TENANT, &user, &cents],
        )
        .await
        .unwrap();
}

/// The reference account service on this stack, retrying failed charges every `retry`,
/// running until the returned token is cancelled.
pub async fn account_service(
    stack: &Stack,
    retry: std::time::Duration,
) -> (tokio_util::sync::CancellationToken, tokio::task::JoinHandle<()>) {
    let consumer =
        account_ref::Consumer::new(stack.pg().await, &stack.ns.prefix, "account-1").await.unwrap().with_retry(retry);
    let stop = tokio_util::sync::CancellationToken::new();
    // A connection of its own, as the binary has: its reads block.
    let redis = stack.redis_connection(Some(std::time::Duration::from_secs(5))).await;
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { consumer.run(redis, 100, stop).await }
    });
    (stop, running)
}
