//! An operator ends orders the cabinet cannot: cancels one whose door was not asked to open
//! (not one whose open command went out), force-closes one whose door never reported closed
//! with what they saw at the cabinet (closed: settled by the weights; open: to review, the door
//! out of sale), each with its reason in the audit trail, a retry answered with the same order.

#![allow(clippy::unwrap_used)]

mod common;

use common::buying::*;
use common::shop::Mode;
use common::*;
use serde_json::{Value, json};

fn decision(reason: &str) -> Value {
    json!({"operator": "olga", "reason": reason})
}

async fn audit_reason(api: Api, route: &str, target: &str) -> Value {
    let rows = expect(api, "GET", &format!("/v1/audit?route={route}&target={target}"), None, 200).await;
    rows.as_array().unwrap().iter().find(|r| r["outcome"] == "ok").map(|r| r["reason"].clone()).unwrap_or(Value::Null)
}

#[tokio::test]
async fn an_operator_cancels_an_order_not_yet_opened_but_not_one_whose_open_command_went_out() {
    let (stack, _, svc, shop) = setup("cab-adm-1", |_| {}).await;
    let api = stack.api(svc.addr);

    let (code, o) = order(api, "ann", "cab-adm-1", 1).await;
    assert_eq!(code, 201, "{o}");
    let id = o["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/orders/{id}/cancel");
    let e = expect(api, "POST", &path, Some(json!({"operator": "olga"})), 400).await;
    assert_eq!(e["field"], "reason");
    let cancelled = expect(api, "POST", &path, Some(decision("shopper walked away")), 200).await;
    assert_eq!(
        (cancelled["state"].as_str(), cancelled["reason"].as_str()),
        (Some("cancelled"), Some("operator_cancelled"))
    );
    let last = cancelled["transitions"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["cause"], "operator:olga", "{last}");
    // A retry after a lost answer: the same order, nothing moved twice.
    let again = expect(api, "POST", &path, Some(decision("shopper walked away")), 200).await;
    assert_eq!(again["transitions"].as_array().unwrap().len(), cancelled["transitions"].as_array().unwrap().len());
    assert_eq!(audit_reason(api, "/v1/orders/{id}/cancel", &path).await, "olga: shopper walked away");
    // Her user and the door are free again: she buys at the same door.
    let id2 = open(api, "ann", "cab-adm-1", 1).await;
    let e = expect(api, "POST", &format!("/v1/orders/{id2}/cancel"), Some(decision("too late")), 409).await;
    assert_eq!(e["error"], "not_cancellable");
    shop.close(1);
    wait_order(api, &id2, "settled").await;

    // The open command went out and the cabinet says nothing: it may have opened the door.
    shop.set_mode(Mode::Mute);
    let (code, o) = order(api, "bob", "cab-adm-1", 1).await;
    assert_eq!(code, 201, "{o}");
    let id3 = o["id"].as_str().unwrap().to_owned();
    assert_eq!(authorise(api, &id3).await.0, 200);
    wait_order(api, &id3, "door_opening").await;
    let e = expect(api, "POST", &format!("/v1/orders/{id3}/cancel"), Some(decision("stuck")), 409).await;
    assert_eq!(e["error"], "door_opening");
    shop.stop().await;
    svc.stop().await;
}

#[tokio::test]
async fn a_door_seen_closed_settles_by_the_weights_and_a_door_seen_open_goes_to_review_out_of_sale() {
    let (stack, _, svc, shop) = setup("cab-adm-2", |_| {}).await;
    let api = stack.api(svc.addr);

    // The shopper takes a cola and shuts the door; its close event is lost.
    let id = open(api, "cat", "cab-adm-2", 1).await;
    shop.take(1, 3, 1, COLA.1);
    shop.close_silently(1);
    let path = format!("/v1/orders/{id}/force-close");
    let e = expect(api, "POST", &path, Some(json!({"operator": "olga", "reason": "x", "door": "ajar"})), 400).await;
    assert_eq!(e["field"], "door");
    let body = json!({"operator": "olga", "reason": "door shut, sensor broken", "door": "closed"});
    let closed = expect(api, "POST", &path, Some(body.clone()), 200).await;
    assert!(["door_closed", "settled"].contains(&closed["state"].as_str().unwrap()), "{closed}");
    let settled = wait_order(api, &id, "settled").await;
    assert_eq!(settled["amount_cents"], COLA.2, "charged by the weights: {settled}");
    assert!(settled["review"].as_array().unwrap().contains(&json!("force_closed")), "{settled}");
    assert_eq!(expect(api, "POST", &path, Some(body), 200).await["state"], "settled", "a retry: the order as it is");
    assert_eq!(audit_reason(api, "/v1/orders/{id}/force-close", &path).await, "olga: door shut, sensor broken");

    // The door hangs open (a broken lock): the weights cannot say what left.
    let id = open(api, "dan", "cab-adm-2", 1).await;
    let path = format!("/v1/orders/{id}/force-close");
    let body = json!({"operator": "olga", "reason": "lock broken, door hangs open", "door": "open"});
    let review = expect(api, "POST", &path, Some(body), 200).await;
    assert_eq!(
        (review["state"].as_str(), review["reason"].as_str()),
        (Some("abnormal"), Some("force_closed_door_open")),
        "{review}"
    );
    let anomalies = expect(api, "GET", &format!("/v1/anomalies?order_id={id}"), None, 200).await;
    assert!(anomalies.as_array().unwrap().iter().any(|a| a["kind"] == "force_closed_door_open"), "{anomalies}");
    let (code, e) = order(api, "eve", "cab-adm-2", 1).await;
    assert_eq!((code, e["error"].as_str()), (409, Some("door_out_of_sale")), "{e}");
    let queue = expect(api, "GET", "/v1/orders?review=true", None, 200).await;
    assert!(queue["items"].as_array().unwrap().iter().any(|o| o["id"] == id.as_str()), "{queue}");
    // The operator counts what left and settles it from the snapshot.
    let counted = json!({"operator": "olga", "items": [{"lane_id": 3, "items": 2}]});
    let done = expect(api, "POST", &format!("/v1/orders/{id}/settle"), Some(counted), 200).await;
    assert_eq!(done["amount_cents"], 2 * COLA.2);
    let e =
        expect(api, "POST", &path, Some(json!({"operator": "olga", "reason": "again", "door": "closed"})), 409).await;
    assert_eq!(e["error"], "not_open");
    shop.stop().await;
    svc.stop().await;
}
