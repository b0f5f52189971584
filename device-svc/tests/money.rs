//! The money loop end to end: deduction contracts, the account service's answers (a failed
//! deduction blocks the user's next purchase until it is paid or waived), refunds and extra
//! charges confirmed like settlements, and the stocktake that finds a swapped item and a drifted
//! scale. A real gateway, PostgreSQL, Redis, the reference account service and a shop cabinet
//! over a socket.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::buying::*;
use common::*;
use protocol::cabinet::CommandAction;
use serde_json::{Value, json};

async fn wait_payment(api: Api, id: &str, payment: &str) -> Value {
    wait_until(&format!("order {id} payment {payment}"), WAIT, || async {
        let v = expect(api, "GET", &format!("/v1/orders/{id}"), None, 200).await;
        (v["payment"] == payment).then_some(v)
    })
    .await
}

/// Buys `items` chips from door 1 as `user`; returns the settled order id.
async fn buy_chips(api: Api, shop: &common::shop::Shop, user: &str, items: i32) -> String {
    let id = open(api, user, shop.id.as_str(), 1).await;
    shop.take(1, 2, items, CHIPS.1);
    shop.close(1);
    wait_order(api, &id, "settled").await;
    id
}

#[tokio::test]
async fn a_failed_deduction_blocks_the_user_until_paid_and_refunds_and_charges_reach_the_account_once() {
    let (stack, _, svc, shop) = setup("cab-m-1", |c| {
        c.purchases.require_contract = true;
        c.purchases.settlement_resend_s = 1;
    })
    .await;
    let api = stack.api(svc.addr);
    let (stop, running) = account_service(&stack, Duration::from_millis(300)).await;

    // No contract, no purchase; a stale event cannot undo a newer one.
    let (code, refused) = order(api, "ann", "cab-m-1", 1).await;
    assert_eq!((code, refused["error"].as_str()), (409, Some("no_active_contract")), "{refused}");
    let (code, c) = contract(api, TENANT, "ann", "signed", 2_000).await;
    assert_eq!((code, &c["state"], &c["applied"]), (200, &json!("signed"), &json!(true)), "{c}");
    let (code, c) = contract(api, TENANT, "ann", "terminated", 1_000).await;
    assert_eq!((code, &c["state"], &c["applied"]), (200, &json!("signed"), &json!(false)), "{c}");

    // Ann's balance covers 100 cents: two chips (500) fail, and the order is unpaid.
    set_funds(&stack, "ann", 100).await;
    let first = buy_chips(api, &shop, "ann", 2).await;
    let unpaid = wait_payment(api, &first, "unpaid").await;
    assert_eq!(unpaid["payments"][0]["failure"], "insufficient_funds", "{unpaid}");
    let (code, blocked) = order(api, "ann", "cab-m-1", 1).await;
    assert_eq!((code, blocked["error"].as_str()), (409, Some("unpaid_order")), "{blocked}");
    let refund = json!({"operator": "op", "reason": "goodwill", "amount_cents": 100});
    let (code, r) = http(api, "POST", &format!("/v1/orders/{first}/refunds"), Some(refund.clone())).await;
    assert_eq!((code, r["error"].as_str()), (409, Some("not_paid")), "{r}");

    // Ann tops up; the account side retries and pays; she may buy again.
    set_funds(&stack, "ann", 10_000).await;
    let paid = wait_payment(api, &first, "paid").await;
    assert_eq!(paid["charged_cents"], 2 * CHIPS.2);
    let (code, again) = order(api, "ann", "cab-m-1", 2).await;
    assert_eq!(code, 201, "{again}");

    // A refund of one chip by item (priced from the settlement), once, whatever the retries.
    let by_item =
        json!({"operator": "op", "reason": "crushed bag", "lines": [{"lane_id": 2, "items": 1}], "key": "r1"});
    let r1 = expect(api, "POST", &format!("/v1/orders/{first}/refunds"), Some(by_item.clone()), 201).await;
    assert_eq!(r1["amount_cents"], CHIPS.2);
    let again = expect(api, "POST", &format!("/v1/orders/{first}/refunds"), Some(by_item), 201).await;
    assert_eq!(again["idem_key"], r1["idem_key"]);
    // More items or more money than is left are refused.
    let too_many = json!({"operator": "op", "reason": "x", "lines": [{"lane_id": 2, "items": 2}]});
    let (code, _) = http(api, "POST", &format!("/v1/orders/{first}/refunds"), Some(too_many)).await;
    assert_eq!(code, 400);
    let too_much = json!({"operator": "op", "reason": "x", "amount_cents": CHIPS.2 + 1});
    let (code, r) = http(api, "POST", &format!("/v1/orders/{first}/refunds"), Some(too_much)).await;
    assert_eq!((code, r["error"].as_str()), (409, Some("over_refund")), "{r}");
    // An extra charge for a second bag an operator saw on camera.
    let charge = json!({"operator": "op", "reason": "second bag on camera", "amount_cents": 70, "key": "c1"});
    expect(api, "POST", &format!("/v1/orders/{first}/charges"), Some(charge), 201).await;

    let done = wait_until("refund and charge answered", WAIT, || async {
        let v = expect(api, "GET", &format!("/v1/orders/{first}"), None, 200).await;
        (v["refunded_cents"] == CHIPS.2 && v["charged_cents"] == 2 * CHIPS.2 + 70).then_some(v)
    })
    .await;
    assert_eq!(done["payment"], "paid", "{done}");
    let pg = stack.pg().await;
    let ledger: Vec<(String, i64, String)> = pg
        .query("SELECT kind, amount_cents, state FROM account_ledger WHERE order_id = $1 ORDER BY kind", &[&first])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        ledger,
        vec![
            ("charge".into(), 70, "paid".into()),
            ("refund".into(), CHIPS.2, "paid".into()),
            ("settlement".into(), 2 * CHIPS.2, "paid".into())
        ]
    );
    let balance: i64 = pg
        .query_one("SELECT balance_cents FROM account_funds WHERE tenant = $1 AND user_id = 'ann'", &[&TENANT])
        .await
        .unwrap()
        .get(0);
    assert_eq!(balance, 10_000 - 2 * CHIPS.2 + CHIPS.2 - 70);
    let m = svc.app.metrics.render();
    assert!(metric(&m, "devsvc_payment_results_total{kind=\"settlement\",result=\"failed\"}") >= 1.0);
    assert!(metric(&m, "devsvc_payment_results_total{kind=\"refund\",result=\"paid\"}") >= 1.0);
    stop.cancel();
    running.await.unwrap();
    shop.stop().await;
    svc.stop().await;
}

#[tokio::test]
async fn a_contract_ended_mid_order_still_settles_and_an_operator_waiver_lifts_the_block() {
    let (stack, _, svc, shop) = setup("cab-m-2", |c| c.purchases.require_contract = true).await;
    let api = stack.api(svc.addr);
    let (stop, running) = account_service(&stack, Duration::from_millis(300)).await;
    contract(api, TENANT, "bob", "signed", 1_000).await;
    set_funds(&stack, "bob", 0).await;
    let id = open(api, "bob", "cab-m-2", 1).await;
    // The contract ends while the door is open: the order is not stranded.
    let (code, c) = contract(api, TENANT, "bob", "terminated", 2_000).await;
    assert_eq!((code, &c["state"]), (200, &json!("terminated")));
    shop.take(1, 1, 1, WATER.1);
    shop.close(1);
    wait_order(api, &id, "settled").await;
    wait_payment(api, &id, "unpaid").await;
    // The operator decides (paid in cash); the block lifts, the contract still counts.
    let waiver = json!({"operator": "op", "reason": "paid in cash at the counter"});
    let waived = expect(api, "POST", &format!("/v1/orders/{id}/waive"), Some(waiver.clone()), 200).await;
    assert_eq!(waived["payment"], "waived", "{waived}");
    // A retry (the answer lost, or a 503 after the commit) gets the same answer; one void only.
    let again = expect(api, "POST", &format!("/v1/orders/{id}/waive"), Some(waiver), 200).await;
    assert_eq!(again["payment"], "waived", "{again}");
    let voids = |o: &Value| o["payments"].as_array().unwrap().iter().filter(|p| p["kind"] == "void").count();
    assert_eq!(voids(&again), 1, "{again}");
    let (code, r) = order(api, "bob", "cab-m-2", 1).await;
    assert_eq!((code, r["error"].as_str()), (409, Some("no_active_contract")), "{r}");
    contract(api, TENANT, "bob", "signed", 3_000).await;
    let (code, r) = order(api, "bob", "cab-m-2", 1).await;
    assert_eq!(code, 201, "{r}");
    stop.cancel();
    running.await.unwrap();
    shop.stop().await;
    svc.stop().await;
}

#[tokio::test]
async fn a_restock_count_finds_an_item_swapped_for_one_of_the_same_weight_and_re_zeroes_a_drifted_scale() {
    let (stack, _, svc, shop) = setup("cab-m-3", |_| {}).await;
    let api = stack.api(svc.addr);
    let restock = |lanes: Value| async move {
        let r =
            expect(api, "POST", "/v1/cabinets/cab-m-3/doors/2/restocks", Some(json!({"operator": "rita"})), 201).await;
        let id = r["id"].as_str().unwrap().to_owned();
        expect(api, "POST", &format!("/v1/restocks/{id}/finish"), Some(json!({"lanes": lanes})), 200).await;
        id
    };
    // The first count: ten waters found, nine left (one taken away); the scale still reads ten,
    // so it is re-zeroed to nine.
    let first = restock(json!([{"lane_id": 1, "found": 10, "stocked": 9}])).await;
    wait_until("tare sent", WAIT, || async {
        shop.commands()
            .into_iter()
            .any(|c| c == CommandAction::Tare { door_id: 2, lane_id: 1, grams: 9 * WATER.1 })
            .then_some(())
    })
    .await;
    let notices = stream(&stack, "notices").await;
    let calibration = notices.iter().find(|(k, _)| k == &format!("calibration:{first}:1")).map(|(_, v)| v.clone());
    assert_eq!(calibration.as_ref().map(|v| v["drift_grams"].clone()), Some(json!(WATER.1)), "{notices:?}");

    // A shopper takes one water (charged) and swaps another for a same-weight fake (unseen).
    let id = open(api, "sam", "cab-m-3", 2).await;
    shop.take(2, 1, 1, WATER.1);
    shop.close(2);
    wait_order(api, &id, "settled").await;
    // The restocker finds seven real waters where nine less one should be.
    restock(json!([{"lane_id": 1, "found": 7, "stocked": 10}])).await;
    let anomalies = expect(api, "GET", "/v1/anomalies?cabinet_id=cab-m-3&kind=restock_loss", None, 200).await;
    let loss = &anomalies[0]["detail"];
    assert_eq!((loss["expected"].as_i64(), loss["found"].as_i64()), (Some(8), Some(7)), "{anomalies}");
    assert_eq!(loss["candidates"][0]["order_id"], id.as_str(), "{loss}");
    assert_eq!(loss["candidates"][0]["items"], 1, "{loss}");
    shop.stop().await;
    svc.stop().await;
}

/// Confirmations an instance read and never acknowledged (it was killed) are taken over by
/// another after `claim_idle_ms`, not left until the settlement is resent; readers that are
/// gone are then removed from the group.
#[tokio::test]
async fn confirmations_a_killed_instance_held_are_taken_over_and_its_name_forgotten() {
    let (stack, config, svc, shop) = setup("cab-m-4", |c| {
        // The resend would also end in a paid order; far off, only the take-over can.
        c.purchases.settlement_resend_s = 3600;
        c.streams.departed_after_ms = 1500;
    })
    .await;
    let api = stack.api(svc.addr);
    let id = buy_chips(api, &shop, "carol", 1).await;
    svc.stop().await;
    // A reader that takes the account side's answer and dies before acknowledging it.
    let stream = format!("{}account:confirmations", stack.ns.prefix);
    let mut con = stack.redis.clone();
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("idem_key")
        .arg(format!("settlement:{id}"))
        .arg("result")
        .arg("paid")
        .query_async(&mut con)
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("device-svc")
        .arg("gone")
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut con)
        .await
        .unwrap();
    let mut next = config.clone();
    next.instance_id = "svc-2".into();
    let svc = stack.service_with(next).await;
    let api = stack.api(svc.addr);
    wait_payment(api, &id, "paid").await;
    let claimed = metric(&svc.app.metrics.render(), "devsvc_stream_claimed_entries_total");
    assert!(claimed >= 1.0, "taken over: {claimed}");
    wait_until("the departed readers forgotten", WAIT, || async {
        let mut con = stack.redis.clone();
        let readers: redis::streams::StreamInfoConsumersReply =
            redis::cmd("XINFO").arg("CONSUMERS").arg(&stream).arg("device-svc").query_async(&mut con).await.unwrap();
        let names: Vec<String> = readers.consumers.into_iter().map(|c| c.name).collect();
        (names == ["svc-2"]).then_some(())
    })
    .await;
    shop.stop().await;
    svc.stop().await;
}

/// A settlement Redis refused is published again on the relay's next round, not once the
/// relay's 30 s lease on it has run out: with Redis failing again within every lease (it
/// restarts), a held claim kept money messages back for minutes.
#[tokio::test]
async fn a_settlement_redis_refused_is_published_on_the_next_round_not_after_the_lease() {
    let (stack, _, svc, shop) = setup("cab-m-5", |c| {
        // Only the hand-back can publish it in time, not the resend of unconfirmed settlements.
        c.purchases.settlement_resend_s = 3600;
    })
    .await;
    let api = stack.api(svc.addr);
    // A key of the wrong type: every XADD to the settlements stream is refused.
    let stream = format!("{}account:settlements", stack.ns.prefix);
    let mut con = stack.redis.clone();
    let _: () = redis::cmd("SET").arg(&stream).arg("in the way").query_async(&mut con).await.unwrap();
    buy_chips(api, &shop, "dora", 1).await;
    wait_until("a relay round refused", WAIT, || async {
        (metric(&svc.app.metrics.render(), "devsvc_outbox_relay_failures_total") >= 1.0).then_some(())
    })
    .await;
    let _: () = redis::cmd("DEL").arg(&stream).query_async(&mut con).await.unwrap();
    wait_until("the settlement published", WAIT, || async {
        let mut con = stack.redis.clone();
        let n: u64 = redis::cmd("XLEN").arg(&stream).query_async(&mut con).await.unwrap();
        (n == 1).then_some(())
    })
    .await;
    shop.stop().await;
    svc.stop().await;
}
