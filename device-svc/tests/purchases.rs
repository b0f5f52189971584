//! Purchases end to end: the HTTP API, a real gateway, real PostgreSQL and Redis, and a cabinet
//! with shelves over a real socket that streams weights at the documented cadence.

#![allow(clippy::unwrap_used)]

mod common;

use common::buying::*;
use common::shop::{Mode, Settling};
use common::*;
use protocol::cabinet::CommandAction;
use serde_json::{Value, json};

#[tokio::test]
async fn a_purchase_settles_once_and_a_low_lane_gets_one_restock_order() {
    let (stack, _, svc, shop) = setup("cab-p-1", |_| {}).await;
    let api = stack.api(svc.addr);

    let id = open(api, "alice", "cab-p-1", 1).await;
    assert_eq!(lock_holder(&stack, "cab-p-1", 1).await.as_deref(), Some(id.as_str()));
    shop.take(1, 3, 2, COLA.1);
    shop.close(1);
    let settled = wait_order(api, &id, "settled").await;
    assert_eq!(settled["amount_cents"], 2 * COLA.2);
    assert_eq!(settled["door_state"], "closed");
    let path: Vec<&str> =
        settled["transitions"].as_array().unwrap().iter().map(|t| t["to"].as_str().unwrap()).collect();
    assert_eq!(path, ["created", "authorised", "door_opening", "door_open", "door_closed", "settled"]);
    assert_eq!(lock_holder(&stack, "cab-p-1", 1).await, None, "the lock is released");

    let published = wait_until("the settlement published", WAIT, || async {
        let s = settlements(&stack).await;
        (!s.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(published.len(), 1, "{published:?}");
    let (key, message) = &published[0];
    assert_eq!(key, &format!("settlement:{id}"));
    assert_eq!(message["amount_cents"], 2 * COLA.2);
    assert_eq!(message["user_id"], "alice");
    assert_eq!(
        message["lines"],
        json!([{"lane_id": 3, "product_id": "cola", "items": 2, "unit_price_cents": 300, "amount_cents": 600}])
    );

    // Lane 3 holds 8 < 9: one restock order, and a notice. A second purchase from it keeps one.
    let restocks = expect(api, "GET", "/v1/restock-orders?cabinet_id=cab-p-1", None, 200).await;
    assert_eq!(restocks.as_array().unwrap().len(), 1, "{restocks}");
    assert_eq!((restocks[0]["lane_id"].as_i64(), restocks[0]["items_left"].as_i64()), (Some(3), Some(8)));
    let id2 = open(api, "alice", "cab-p-1", 1).await;
    shop.take(1, 3, 1, COLA.1);
    shop.close(1);
    assert_eq!(wait_order(api, &id2, "settled").await["amount_cents"], COLA.2);
    let restocks = expect(api, "GET", "/v1/restock-orders?cabinet_id=cab-p-1", None, 200).await;
    assert_eq!(restocks.as_array().unwrap().len(), 1, "{restocks}");
    let notices = wait_until("the restock notice", WAIT, || async {
        let n = stream(&stack, "notices").await;
        n.iter().any(|(_, m)| m["type"] == "restock_order").then_some(n)
    })
    .await;
    assert_eq!(notices.iter().filter(|(_, m)| m["type"] == "restock_order").count(), 1);

    // A restock holds the door, and finishing it closes the restock order.
    let r = expect(api, "POST", "/v1/cabinets/cab-p-1/doors/1/restocks", Some(json!({"operator": "bob"})), 201).await;
    let (code, busy) = order(api, "carol", "cab-p-1", 1).await;
    assert_eq!((code, busy["error"].as_str()), (409, Some("door_busy")));
    // The operator's door events are expected: no anomaly. The same on another door is one.
    shop.close(1);
    shop.close(2);
    let unexplained = wait_until("the door-2 event recorded", WAIT, || async {
        let a = expect(api, "GET", "/v1/anomalies?cabinet_id=cab-p-1&kind=event_without_order", None, 200).await;
        (!a.as_array().unwrap().is_empty()).then_some(a)
    })
    .await;
    assert_eq!(unexplained.as_array().unwrap().len(), 1, "{unexplained}");
    assert_eq!(unexplained[0]["door_id"], 2);
    let m = svc.app.metrics.render();
    assert_eq!(metric(&m, "devsvc_stream_entries_total{result=\"restock\",type=\"door_event\"}"), 1.0);
    let done = expect(api, "POST", &format!("/v1/restocks/{}/finish", r["id"].as_str().unwrap()), None, 200).await;
    assert_eq!(done["closed_restock_orders"], 1);
    let restocks = expect(api, "GET", "/v1/restock-orders?cabinet_id=cab-p-1", None, 200).await;
    assert_eq!(restocks, json!([]));
    assert_eq!(order(api, "carol", "cab-p-1", 1).await.0, 201);

    assert_eq!(settlements(&stack).await.len(), 2);
    let metrics = svc.app.metrics.render();
    assert_eq!(metric(&metrics, "devsvc_order_transitions_total{to=\"settled\"}"), 2.0);
    assert_eq!(metric(&metrics, "devsvc_restock_orders_total"), 1.0);
    assert!(metric(&metrics, "devsvc_order_settlement_seconds_count") >= 2.0);
    shop.stop().await;
    svc.stop().await;
}

#[tokio::test]
async fn a_cabinet_silent_after_the_open_command_is_queried_five_times_then_the_order_is_cancelled() {
    let (stack, _, svc, shop) = setup("cab-p-2", |_| {}).await;
    let api = stack.api(svc.addr);
    shop.set_mode(Mode::Mute);
    let (_, o) = order(api, "dave", "cab-p-2", 1).await;
    let id = o["id"].as_str().unwrap().to_owned();
    assert_eq!(authorise(api, &id).await.0, 200);
    let cancelled = wait_order(api, &id, "cancelled").await;
    assert_eq!(cancelled["reason"], "cabinet_silent");
    assert_eq!(cancelled["door_state"], "abnormal");
    let commands = shop.commands();
    assert_eq!(commands.len(), 6, "{commands:?}");
    assert!(matches!(commands[0], CommandAction::OpenDoor { door_id: 1, .. }));
    assert!(commands[1..].iter().all(|c| matches!(c, CommandAction::QueryDoor { door_id: 1 })));
    assert_eq!(lock_holder(&stack, "cab-p-2", 1).await, None);
    let anomalies = expect(api, "GET", &format!("/v1/anomalies?order_id={id}"), None, 200).await;
    assert_eq!(anomalies[0]["kind"], "cabinet_silent");
    // The door is free again and the user may order.
    shop.set_mode(Mode::Normal);
    assert_eq!(order(api, "dave", "cab-p-2", 1).await.0, 201);
    assert!(settlements(&stack).await.is_empty());
    shop.stop().await;
    svc.stop().await;
}

#[tokio::test]
async fn an_order_not_authorised_in_time_is_cancelled_across_a_restart() {
    let (stack, mut config, svc, shop) = setup("cab-p-3", |c| c.purchases.authorise_timeout_s = 2).await;
    let api = stack.api(svc.addr);
    let (_, o) = order(api, "erin", "cab-p-3", 2).await;
    let id = o["id"].as_str().unwrap().to_owned();
    // The instance that took the order goes away before the deadline; a new one cancels it.
    svc.stop().await;
    assert_eq!(lock_holder(&stack, "cab-p-3", 2).await.as_deref(), Some(id.as_str()));
    config.instance_id = "svc-2".into();
    let svc = stack.service_with(config).await;
    let api = stack.api(svc.addr);
    let cancelled = wait_order(api, &id, "cancelled").await;
    assert_eq!(cancelled["reason"], "not_authorised_in_time");
    assert_eq!(cancelled["transitions"][1]["cause"], "authorisation_timeout");
    assert_eq!(lock_holder(&stack, "cab-p-3", 2).await, None);
    // A late authorisation is refused so the provider releases the funds; nothing opens.
    let (code, late) = authorise(api, &id).await;
    assert_eq!((code, late["error"].as_str()), (409, Some("order_cancelled")));
    assert!(shop.commands().is_empty());
    shop.stop().await;
    svc.stop().await;
}

#[tokio::test]
async fn two_users_on_one_door_one_proceeds_and_the_other_is_refused() {
    let (stack, _, svc, shop) = setup("cab-p-4", |_| {}).await;
    let api = stack.api(svc.addr);
    let a = tokio::spawn(order(api, "frank", "cab-p-4", 1));
    let b = tokio::spawn(order(api, "grace", "cab-p-4", 1));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let mut codes = [a.0, b.0];
    codes.sort_unstable();
    assert_eq!(codes, [201, 409], "{a:?} {b:?}");
    let refused = if a.0 == 409 { &a.1 } else { &b.1 };
    assert_eq!(refused["error"], "door_busy");
    let winner = if a.0 == 201 { ("frank", &a.1) } else { ("grace", &b.1) };
    // The winner cannot start a second order elsewhere while this one runs.
    let (code, again) = order(api, winner.0, "cab-p-4", 2).await;
    assert_eq!((code, again["error"].as_str()), (409, Some("unpaid_order")));
    // Price changes wait for the door too.
    let (code, price) = http(
        api,
        "PUT",
        "/v1/cabinets/cab-p-4/doors/1/lanes/3",
        Some(json!({"product_id": "cola", "restock_threshold": 9, "price_cents": 999})),
    )
    .await;
    assert_eq!((code, price["error"].as_str()), (409, Some("door_busy")));
    // An offline cabinet takes no orders; an unknown one is 404.
    let (code, _) = order(api, "heidi", "nope", 1).await;
    assert_eq!(code, 404);
    let e = expect(api, "POST", "/v1/orders", Some(json!({"user_id": "heidi", "cabinet_id": "cab-p-4"})), 400).await;
    assert_eq!(e["field"], "door_id");
    let metrics = svc.app.metrics.render();
    assert!(metric(&metrics, "devsvc_door_lock_attempts_total{result=\"busy\"}") >= 2.0);
    shop.stop().await;
    wait_status(api, "cab:cab-p-4", "offline").await;
    let (code, off) = order(api, "heidi", "cab-p-4", 2).await;
    assert_eq!((code, off["error"].as_str()), (409, Some("cabinet_offline")));
    svc.stop().await;
}

#[tokio::test]
async fn a_close_before_the_open_result_is_settled_from_the_weights_and_flagged() {
    // The cabinet's answers are lost; long enough queries for the close to come first.
    let (stack, _, svc, shop) = setup("cab-p-5", |c| c.purchases.query_interval_ms = 1000).await;
    let api = stack.api(svc.addr);
    shop.set_mode(Mode::OpensSilently);
    let (_, o) = order(api, "ivan", "cab-p-5", 1).await;
    let id = o["id"].as_str().unwrap().to_owned();
    assert_eq!(authorise(api, &id).await.0, 200);
    wait_until("the open command", WAIT, || async { (!shop.commands().is_empty()).then_some(()) }).await;
    shop.take(1, 1, 1, WATER.1);
    shop.close(1);
    let settled = wait_order(api, &id, "settled").await;
    assert_eq!(settled["amount_cents"], WATER.2);
    assert_eq!(settled["review"], json!(["close_before_open"]));
    let anomalies = expect(api, "GET", &format!("/v1/anomalies?order_id={id}"), None, 200).await;
    assert_eq!(anomalies.as_array().unwrap().len(), 1);
    assert_eq!(anomalies[0]["kind"], "close_before_open");
    assert!(anomalies[0]["detail"]["goods"].is_array(), "{anomalies}");
    let published = wait_until("the settlement", WAIT, || async {
        let s = settlements(&stack).await;
        (!s.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(published[0].1["review"], json!(["close_before_open"]));
    shop.stop().await;
    svc.stop().await;
}

#[tokio::test]
async fn an_instance_stopped_mid_opening_hands_the_order_back_at_once() {
    // The open's answer is lost and the next question is 30 s away: the lease is minutes,
    // which only a hand-back avoids.
    let (stack, config, svc, shop) = setup("cab-p-hb", |c| c.purchases.query_interval_ms = 30_000).await;
    let api = stack.api(svc.addr);
    shop.set_mode(Mode::OpensSilently);
    let (_, o) = order(api, "judy", "cab-p-hb", 1).await;
    let id = o["id"].as_str().unwrap().to_owned();
    assert_eq!(authorise(api, &id).await.0, 200);
    wait_until("the open unanswered, the query waiting", WAIT, || async {
        let v = expect(api, "GET", &format!("/v1/orders/{id}"), None, 200).await;
        (v["open_attempts"] == 2).then_some(())
    })
    .await;
    svc.stop().await;
    let row =
        stack.pg().await.query_one("SELECT state, due_at <= now() FROM orders WHERE id = $1", &[&id]).await.unwrap();
    let (state, due): (String, bool) = (row.get(0), row.get(1));
    assert_eq!(state, "door_opening");
    assert!(due, "handed back: due at once, not when the lease ends");
    shop.set_mode(Mode::Normal);
    let mut next = config.clone();
    next.instance_id = "svc-2".into();
    next.purchases.query_interval_ms = 100;
    let svc = stack.service_with(next).await;
    let api = stack.api(svc.addr);
    // The next instance asks (the open was sent before) and finds the door open.
    let opened = wait_order(api, &id, "door_open").await;
    assert_eq!(opened["transitions"].as_array().unwrap().last().unwrap()["cause"], "query_open", "{opened}");
    shop.stop().await;
    svc.stop().await;
}

#[tokio::test]
async fn an_item_moved_between_lanes_is_not_charged_and_operators_are_told() {
    let (stack, _, svc, shop) = setup("cab-p-6", |_| {}).await;
    let api = stack.api(svc.addr);
    let id = open(api, "judy", "cab-p-6", 1).await;
    // One water taken; one bag of chips moved from lane 4 into lane 3 (cola).
    shop.take(1, 1, 1, WATER.1);
    shop.take(1, 4, 1, CHIPS.1);
    shop.take(1, 3, -1, CHIPS.1);
    shop.close(1);
    let settled = wait_order(api, &id, "settled").await;
    assert_eq!(settled["amount_cents"], WATER.2);
    let anomalies = expect(api, "GET", "/v1/anomalies?kind=lane_gain", None, 200).await;
    assert_eq!(anomalies.as_array().unwrap().len(), 1, "{anomalies}");
    assert_eq!(anomalies[0]["detail"]["gained_lanes"], json!([3]));
    assert_eq!(anomalies[0]["detail"]["moves"], json!([{"from_lane": 4, "to_lane": 3, "items": 1}]));
    let notices = wait_until("the anomaly notice", WAIT, || async {
        let n = stream(&stack, "notices").await;
        n.iter().any(|(_, m)| m["kind"] == "lane_gain").then_some(n)
    })
    .await;
    assert_eq!(notices.iter().filter(|(_, m)| m["kind"] == "lane_gain").count(), 1);
    shop.stop().await;
    svc.stop().await;
}

/// The account service's side of the contract (SPEC.md 3.5): a charge is applied once per
/// `idem_key`, however often it is delivered.
async fn apply_charges(stack: &Stack) -> i64 {
    let mut con = stack.redis.clone();
    let ledger = format!("{}test:ledger", stack.ns.prefix);
    let mut total = 0;
    for (key, message) in settlements(stack).await {
        let first: bool = redis::cmd("HSETNX").arg(&ledger).arg(&key).arg(1).query_async(&mut con).await.unwrap();
        if first {
            total += message["amount_cents"].as_i64().unwrap();
        }
    }
    total
}

#[tokio::test]
async fn a_settlement_relayed_twice_or_a_close_redelivered_charges_once() {
    let (stack, mut config, svc, shop) = setup("cab-p-7", |_| {}).await;
    let api = stack.api(svc.addr);
    // A second consumer group that reads nothing keeps every upstream entry in its stream (the
    // device service trims only what every group has acknowledged): the close is found below.
    let mut con = stack.redis.clone();
    for shard in 0..svc.app.config.streams.shards {
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stack.keys.upstream(shard))
            .arg("keeper")
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut con)
            .await
            .unwrap();
    }
    let id = open(api, "ken", "cab-p-7", 1).await;
    shop.take(1, 2, 3, CHIPS.1);
    shop.close(1);
    wait_order(api, &id, "settled").await;
    wait_until("published", WAIT, || async { (settlements(&stack).await.len() == 1).then_some(()) }).await;

    // The relay died after XADD and before marking the row, and its lease on the row ran out:
    // the next instance publishes again.
    svc.stop().await;
    let pg = stack.pg().await;
    let n = pg
        .execute(
            "UPDATE outbox SET published_at = NULL, relay_until = now() - interval '1 second' WHERE idem_key = $1",
            &[&format!("settlement:{id}")],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    config.instance_id = "svc-2".into();
    let svc = stack.service_with(config).await;
    let api = stack.api(svc.addr);
    wait_until("published again", WAIT, || async { (settlements(&stack).await.len() == 2).then_some(()) }).await;
    let published = settlements(&stack).await;
    assert_eq!(published[0].0, published[1].0, "both carry the same idempotency key");
    assert_eq!(apply_charges(&stack).await, 3 * CHIPS.2);
    assert_eq!(apply_charges(&stack).await, 0, "a second pass charges nothing");

    // The gateway delivers the close event again (its ack was lost): nothing changes.
    let mut closes = Vec::new();
    for shard in 0..svc.app.config.streams.shards {
        let upstream = stack.keys.upstream(shard);
        let events: redis::streams::StreamRangeReply =
            redis::cmd("XRANGE").arg(&upstream).arg("-").arg("+").query_async(&mut con).await.unwrap();
        for e in events.ids {
            let fields = device_svc::consumer::bulk_fields(e.map);
            if let Ok(protocol::bus::UpEvent::Cabinet {
                message:
                    protocol::cabinet::Message::DoorEvent(protocol::cabinet::DoorEvent {
                        state: protocol::cabinet::DoorState::Closed,
                        ..
                    }),
                ..
            }) = protocol::bus::UpEvent::from_fields(&fields)
            {
                closes.push((upstream.clone(), fields));
            }
        }
    }
    assert_eq!(closes.len(), 1);
    let (upstream, fields) = &closes[0];
    let fields: Vec<(&String, &Vec<u8>)> = fields.iter().collect();
    let _: String = redis::cmd("XADD").arg(upstream).arg("*").arg(&fields).query_async(&mut con).await.unwrap();
    wait_until("the repeat consumed", WAIT, || async {
        let m = svc.app.metrics.render();
        (metric(&m, "devsvc_stream_entries_total{result=\"unchanged\",type=\"door_event\"}") >= 1.0).then_some(())
    })
    .await;
    let o = expect(api, "GET", &format!("/v1/orders/{id}"), None, 200).await;
    assert_eq!((o["state"].as_str(), o["amount_cents"].as_i64()), (Some("settled"), Some(3 * CHIPS.2)));
    assert_eq!(expect(api, "GET", &format!("/v1/anomalies?order_id={id}"), None, 200).await, json!([]));
    assert_eq!(pg.query_one("SELECT count(*) FROM settlements", &[]).await.unwrap().get::<_, i64>(0), 1);
    shop.stop().await;
    svc.stop().await;
}

#[tokio::test]
async fn unstable_readings_make_the_order_wait_and_past_the_bound_go_to_review() {
    let (stack, _, svc, shop) = setup("cab-p-8", |c| c.purchases.settle_wait_s = 2).await;
    let api = stack.api(svc.addr);
    shop.set_settling(Settling::NeverStable);
    let id = open(api, "leo", "cab-p-8", 1).await;
    shop.take(1, 3, 1, COLA.1);
    shop.close(1);
    wait_order(api, &id, "door_closed").await;
    let abnormal = wait_order(api, &id, "abnormal").await;
    assert_eq!(abnormal["reason"], "weights_not_stable");
    assert_eq!(abnormal["amount_cents"], Value::Null, "never settled on the pre-opening weight");
    assert_eq!(lock_holder(&stack, "cab-p-8", 1).await, None);
    let anomalies = expect(api, "GET", &format!("/v1/anomalies?order_id={id}"), None, 200).await;
    assert_eq!(anomalies[0]["kind"], "weights_not_stable");
    // An operator who counted one cola settles it: priced from the order's snapshot.
    let body = json!({"operator": "olga", "items": [{"lane_id": 3, "items": 1}]});
    let settled = expect(api, "POST", &format!("/v1/orders/{id}/settle"), Some(body.clone()), 200).await;
    assert_eq!((settled["state"].as_str(), settled["amount_cents"].as_i64()), (Some("settled"), Some(COLA.2)));
    assert_eq!(settled["review"], json!(["operator_settled"]));
    // The same decision again (a retry after a lost answer) is answered as it stands; another
    // amount is refused.
    let again = expect(api, "POST", &format!("/v1/orders/{id}/settle"), Some(body), 200).await;
    assert_eq!((again["state"].as_str(), again["amount_cents"].as_i64()), (Some("settled"), Some(COLA.2)));
    let other = json!({"operator": "olga", "items": [{"lane_id": 3, "items": 2}]});
    let refused = expect(api, "POST", &format!("/v1/orders/{id}/settle"), Some(other), 409).await;
    assert_eq!(refused["error"], "not_abnormal");
    let bad = json!({"operator": "olga", "items": [{"lane_id": 9, "items": 1}]});
    assert_eq!(expect(api, "POST", &format!("/v1/orders/{id}/settle"), Some(bad), 400).await["field"], "items.lane_id");
    wait_until("the operator's settlement published", WAIT, || async {
        let s = settlements(&stack).await;
        s.iter().any(|(k, m)| k == &format!("settlement:{id}") && m["amount_cents"] == COLA.2).then_some(())
    })
    .await;

    // A new order needs weights taken after that close: the shelf changed since the last
    // stable reading. The closed door's next regular report brings them.
    shop.set_settling(Settling::Normal);
    let closed_ms = abnormal["closed_ms"].as_u64().unwrap();
    wait_until("a stable reading after the close", WAIT, || async {
        let w = expect(api, "GET", "/v1/cabinets/cab-p-8/weights", None, 200).await;
        w["lanes"].as_array().unwrap().iter().all(|l| l["sample_ms"].as_u64().unwrap() > closed_ms).then_some(())
    })
    .await;
    // The next time the scales settle within the bound: the first stable reading counts.
    let id = open(api, "leo", "cab-p-8", 1).await;
    shop.take(1, 3, 2, COLA.1);
    shop.close(1);
    let settled = wait_order(api, &id, "settled").await;
    // The cola the first shopper took is gone too, but it was before this order's snapshot.
    assert_eq!(settled["amount_cents"], 2 * COLA.2);
    shop.stop().await;
    svc.stop().await;
}

#[tokio::test]
async fn forged_replayed_stale_or_mismatched_callbacks_change_nothing() {
    let (stack, _, svc, shop) = setup("cab-p-9", |_| {}).await;
    let api = stack.api(svc.addr);
    let (code, o) = order(api, "mallory-victim", "cab-p-9", 1).await;
    assert_eq!(code, 201, "{o}");
    let id = o["id"].as_str().unwrap().to_owned();
    assert_eq!((o["hold_cents"].as_i64(), o["currency"].as_str()), (Some(HOLD_CENTS), Some("CNY")));
    let now = now_ms() / 1000;
    let good = json!({"order_id": id, "status": "authorised", "payment_id": "p-1", "amount_cents": HOLD_CENTS, "currency": "CNY"});

    // The attack as found: an unsigned {"status":"authorised"} from anyone.
    let unsigned = http(api.anonymous(), "POST", "/v1/payments/callback", Some(good.clone())).await;
    assert_eq!((unsigned.0, unsigned.1["error"].as_str()), (401, Some("unauthorized")), "{}", unsigned.1);
    let refusals = [
        ("bad_signature", signed_callback(api, PROVIDER, "not-the-secret-at-all-000", now, &good).await),
        ("unknown_provider", signed_callback(api, "evil-pay", PROVIDER_SECRET, now, &good).await),
        ("stale", signed_callback(api, PROVIDER, PROVIDER_SECRET, now - 3600, &good).await),
    ];
    for (why, (code, body)) in &refusals {
        assert_eq!(*code, 401, "{why}: {body}");
    }
    let mut cheap = good.clone();
    cheap["amount_cents"] = json!(1);
    let (code, e) = signed_callback(api, PROVIDER, PROVIDER_SECRET, now, &cheap).await;
    assert_eq!((code, e["error"].as_str()), (409, Some("amount_mismatch")), "{e}");
    let mut dollars = good.clone();
    dollars["currency"] = json!("USD");
    let (code, e) = signed_callback(api, PROVIDER, PROVIDER_SECRET, now, &dollars).await;
    assert_eq!((code, e["error"].as_str()), (409, Some("amount_mismatch")), "{e}");
    let still = expect(api, "GET", &format!("/v1/orders/{id}"), None, 200).await;
    assert_eq!(still["state"], "created", "no refused callback moved the order");
    assert!(shop.commands().is_empty(), "no door opened");

    // The genuine callback opens the door; the same signed request again is a replay.
    let (code, a) = signed_callback(api, PROVIDER, PROVIDER_SECRET, now, &good).await;
    assert_eq!((code, a["state"].as_str()), (200, Some("authorised")), "{a}");
    let (code, e) = signed_callback(api, PROVIDER, PROVIDER_SECRET, now, &good).await;
    assert_eq!((code, e["error"].as_str()), (409, Some("replayed")), "{e}");
    wait_order(api, &id, "door_open").await;

    let text = &metrics_text(api).await;
    for result in
        ["unsigned", "bad_signature", "unknown_provider", "stale", "amount_mismatch", "replayed", "authorised"]
    {
        let n = metric(text, &format!("devsvc_payment_callbacks_total{{result=\"{result}\"}}"));
        let want = if result == "amount_mismatch" { 2.0 } else { 1.0 };
        assert_eq!(n, want, "{result}");
    }
    // The provider's acts are in the audit trail under its name.
    let trail = expect(api, "GET", "/v1/audit?principal=provider:test-pay", None, 200).await;
    let outcomes: Vec<&str> = trail.as_array().unwrap().iter().map(|e| e["outcome"].as_str().unwrap()).collect();
    assert!(
        outcomes.contains(&"ok") && outcomes.contains(&"amount_mismatch") && outcomes.contains(&"replayed"),
        "{outcomes:?}"
    );
    shop.stop().await;
    svc.stop().await;
}

#[tokio::test]
async fn a_shop_sees_only_its_own_orders_and_its_users_are_its_own() {
    let (stack, _, svc, shop) = setup("cab-p-10", |_| {}).await;
    let api = stack.api(svc.addr);
    let (code, mine) = order(api, "u-7", "cab-p-10", 1).await;
    assert_eq!(code, 201, "{mine}");
    let id = mine["id"].as_str().unwrap();
    assert_eq!(mine["tenant"], "shop-1");
    let other = api.with_key(&stack.key(device_svc::auth::Role::Shop, Some("shop-2")).await);
    // Another shop cannot read it, and its own user "u-7" is not blocked by shop-1's unpaid order
    // (the answer would otherwise name shop-1's order).
    let (code, e) = http(other, "GET", &format!("/v1/orders/{id}"), None).await;
    assert_eq!((code, e["error"].as_str()), (404, Some("not_found")), "{e}");
    let (code, theirs) =
        http(other, "POST", "/v1/orders", Some(json!({"user_id": "u-7", "cabinet_id": "cab-p-10", "door_id": 2})))
            .await;
    assert_eq!((code, theirs["tenant"].as_str()), (201, Some("shop-2")), "{theirs}");
    // An operator reads both.
    assert_eq!(
        expect(api.with_key(&stack.parties.operator), "GET", &format!("/v1/orders/{id}"), None, 200).await["id"],
        *id
    );
    shop.stop().await;
    svc.stop().await;
}

#[tokio::test]
async fn a_door_never_reported_closed_releases_its_user_and_leaves_sale_until_restocked() {
    let (stack, _, svc, shop) = setup("cab-p-11", |c| {
        c.purchases.door_open_max_s = 1;
        c.purchases.door_never_closed_s = 2;
    })
    .await;
    let api = stack.api(svc.addr);
    let id = open(api, "nora", "cab-p-11", 1).await;
    // The cabinet never reports the door closed.
    let stuck = wait_order(api, &id, "abnormal").await;
    assert_eq!((stuck["reason"].as_str(), stuck["door_state"].as_str()), (Some("door_never_closed"), Some("abnormal")));
    let anomalies = expect(api, "GET", &format!("/v1/anomalies?order_id={id}"), None, 200).await;
    let mut kinds: Vec<&str> = anomalies.as_array().unwrap().iter().map(|a| a["kind"].as_str().unwrap()).collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["door_left_open", "door_never_closed"], "told at the first limit, escalated at the second");
    // Her next purchase is not blocked by the stuck one; the stuck door is out of sale.
    let (code, o) = order(api, "nora", "cab-p-11", 2).await;
    assert_eq!(code, 201, "{o}");
    let (code, e) = order(api, "olive", "cab-p-11", 1).await;
    assert_eq!((code, e["error"].as_str()), (409, Some("door_out_of_sale")), "{e}");
    // An operator restocks the door (once the stuck order's lock has lapsed): back on sale.
    let restock = wait_until("the restock started", WAIT, || async {
        let (code, r) =
            http(api, "POST", "/v1/cabinets/cab-p-11/doors/1/restocks", Some(json!({"operator": "olga"}))).await;
        (code == 201).then_some(r)
    })
    .await;
    expect(api, "POST", &format!("/v1/restocks/{}/finish", restock["id"].as_str().unwrap()), None, 200).await;
    let (code, o) = order(api, "olive", "cab-p-11", 1).await;
    assert_eq!(code, 201, "{o}");
    shop.stop().await;
    svc.stop().await;
}

#[tokio::test]
async fn a_settlement_is_sent_until_the_account_service_confirms_it_and_charged_once() {
    let (stack, _config, svc, shop) = setup("cab-p-acct", |c| c.purchases.settlement_resend_s = 1).await;
    let api = stack.api(svc.addr);
    let id = open(api, "amy", "cab-p-acct", 1).await;
    shop.take(1, 2, 2, CHIPS.1);
    shop.close(1);
    wait_order(api, &id, "settled").await;
    let key = format!("settlement:{id}");

    // Nobody confirms yet: the settlement is published again, with the same key.
    wait_until("published again while unconfirmed", WAIT, || async {
        (settlements(&stack).await.len() >= 2).then_some(())
    })
    .await;
    // Redis loses the stream (a restart without persistence): the charge is not lost with it.
    let mut con = stack.redis.clone();
    let stream = format!("{}account:settlements", stack.ns.prefix);
    let _: i64 = redis::cmd("DEL").arg(&stream).query_async(&mut con).await.unwrap();

    // An entry the ledger's database would refuse (a NUL) must not stop the account service.
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("idem_key")
        .arg("poison:1")
        .arg("type")
        .arg("settlement")
        .arg("payload")
        .arg(r#"{"order_id":"a\u0000b","amount_cents":1}"#)
        .query_async(&mut con)
        .await
        .unwrap();

    // The reference account service comes up: it charges once and confirms.
    let consumer = account_ref::Consumer::new(stack.pg().await, &stack.ns.prefix, "account-1").await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn({
        let (redis, stop) = (stack.redis.clone(), stop.clone());
        async move { consumer.run(redis, 200, stop).await }
    });
    let pg = stack.pg().await;
    wait_until("confirmed", WAIT, || async {
        let row =
            pg.query_one("SELECT confirmed_at IS NOT NULL FROM outbox WHERE idem_key = $1", &[&key]).await.unwrap();
        row.get::<_, bool>(0).then_some(())
    })
    .await;
    let refused: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("{}account:confirmations", stack.ns.prefix))
        .arg("-")
        .arg("+")
        .query_async(&mut con)
        .await
        .unwrap();
    let results: Vec<(String, String)> = refused
        .ids
        .into_iter()
        .map(|e| {
            let f = redis_conn::bulk_fields(e.map);
            let text = |k: &str| String::from_utf8(f[k].clone()).unwrap();
            (text("idem_key"), text("result"))
        })
        .collect();
    assert!(results.contains(&("poison:1".into(), "refused".into())), "{results:?}");
    assert!(results.contains(&(key.clone(), "paid".into())), "{results:?}");
    let ledger = pg.query("SELECT amount_cents FROM account_ledger WHERE idem_key = $1", &[&key]).await.unwrap();
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].get::<_, i64>(0), 2 * CHIPS.2);
    // Published at least twice, charged once; confirmed, it is not sent again.
    let sends: i32 = pg.query_one("SELECT sends FROM outbox WHERE idem_key = $1", &[&key]).await.unwrap().get(0);
    assert!(sends >= 2, "{sends}");
    let m = svc.app.metrics.render();
    assert!(metric(&m, "devsvc_outbox_confirmed_total") >= 1.0);
    assert!(metric(&m, "devsvc_outbox_resent_total{stream=\"account:settlements\"}") >= 1.0);
    stop.cancel();
    running.await.unwrap();
    shop.stop().await;
    svc.stop().await;
}

/// An order whose action Redis refused is tried again a second later, not when the driver's
/// lease on it ends (longer than the wait here); Redis restarting within every lease held
/// orders for minutes.
#[tokio::test]
async fn an_order_whose_action_redis_refused_is_tried_again_within_seconds() {
    let (stack, _, svc, shop) = setup("cab-p-rf", |_| {}).await;
    let api = stack.api(svc.addr);
    // The weight cache in the way (a string): the snapshot before the open is refused.
    let key = format!("{}w:{{cab-p-rf}}", stack.ns.prefix);
    let mut con = stack.redis.clone();
    let saved: Vec<(String, String)> = redis::cmd("HGETALL").arg(&key).query_async(&mut con).await.unwrap();
    assert!(!saved.is_empty(), "the cabinet's weights are cached");
    let _: () = redis::cmd("SET").arg(&key).arg("in the way").query_async(&mut con).await.unwrap();
    let (_, o) = order(api, "kim", "cab-p-rf", 1).await;
    let id = o["id"].as_str().unwrap().to_owned();
    assert_eq!(authorise(api, &id).await.0, 200);
    wait_until("an action refused", WAIT, || async {
        (metric(&svc.app.metrics.render(), "devsvc_order_action_failures_total") >= 1.0).then_some(())
    })
    .await;
    let _: () = redis::pipe()
        .atomic()
        .cmd("DEL")
        .arg(&key)
        .ignore()
        .cmd("HSET")
        .arg(&key)
        .arg(&saved)
        .ignore()
        .query_async(&mut con)
        .await
        .unwrap();
    wait_order(api, &id, "door_open").await;
    shop.stop().await;
    svc.stop().await;
}

/// A shop's retry of an order creation (its answer lost, or a 503 after the commit) names the
/// same key and gets the same order, where without it the user's own new order would refuse it
/// as running; a key names one creation only.
#[tokio::test]
async fn an_order_created_twice_under_one_key_is_one_order() {
    let (stack, _, svc, shop) = setup("cab-p-idem", |_| {}).await;
    let api = stack.api(svc.addr);
    let (code, first) = order_keyed(api, "ida", "cab-p-idem", 1, "shop-req-1").await;
    assert_eq!(code, 201, "{first}");
    let (code, again) = order_keyed(api, "ida", "cab-p-idem", 1, "shop-req-1").await;
    assert_eq!((code, &again["id"]), (201, &first["id"]), "{again}");
    // A new creation for the same user is still refused while the first runs.
    let (code, other) = order_keyed(api, "ida", "cab-p-idem", 1, "shop-req-2").await;
    assert_eq!((code, other["error"].as_str()), (409, Some("unpaid_order")), "{other}");
    // The key named another creation.
    let (code, reused) = order_keyed(api, "ida", "cab-p-idem", 2, "shop-req-1").await;
    assert_eq!((code, reused["error"].as_str()), (409, Some("idempotency_key_reused")), "{reused}");
    let (code, bad) = order_keyed(api, "ida", "cab-p-idem", 1, "has space").await;
    assert_eq!((code, bad["field"].as_str()), (400, Some("idempotency_key")), "{bad}");
    let client = stack.pg().await;
    let n: i64 = client.query_one("SELECT count(*) FROM orders WHERE user_id = 'ida'", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
    shop.stop().await;
    svc.stop().await;
}
