//! SPEC.md part 1 as a cabinet vendor meets it: the cases an independent implementation found
//! wrong or had to guess, each against two real gateway nodes, a device service, Redis and
//! PostgreSQL. The cabinet is `conformance::cabinet`: bytes built from the spec alone.

// The credential cases print how long each change took to take effect (`--nocapture`).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::Duration;

use conformance::cabinet::{ACK_REQUESTED, VendorCabinet, door_event, frame, kind, login_payload, now_ms, status};
use conformance::stack::Stack;

/// What "at once" means for credential changes (issue: within a second on every node).
const AT_ONCE: Duration = Duration::from_secs(1);

/// Logs in on `node` (a new connection each try) until accepted, failing the test after
/// [`AT_ONCE`]; returns how long it took.
async fn accepted_at_once(stack: &Stack, node: usize, id: &str, secret: &[u8], what: &str) -> Duration {
    Stack::until(what, AT_ONCE, || async {
        let mut cab = VendorCabinet::connect(stack.cabinet_addr(node), id).await;
        cab.login_v1(secret).await.0 == status::ACCEPTED
    })
    .await
}

#[tokio::test]
async fn frames_written_behind_the_login_are_served_at_once() {
    let stack = Stack::start(|_| {}).await;
    let secret = stack.register_cabinet("CAB-PIPE").await;
    let mut cab = VendorCabinet::connect(stack.cabinet_addr(0), "CAB-PIPE").await;
    // LOGIN and a DOOR_EVENT in one write: one TCP segment on loopback.
    let mut bytes = frame(kind::LOGIN, 0, 1, &login_payload("CAB-PIPE", now_ms(), None, &secret));
    bytes.extend(frame(kind::DOOR_EVENT, ACK_REQUESTED, 2, &door_event(1, false, now_ms(), "")));
    cab.send_raw(&bytes).await;
    let result = cab.recv().await.unwrap();
    assert_eq!((result.kind, result.payload[0]), (kind::LOGIN_RESULT, status::ACCEPTED));
    // The cabinet sends nothing more: the ACK must come from what was already buffered.
    let ack = cab.recv_within(Duration::from_secs(2)).await.expect("ACK without more bytes").unwrap();
    assert_eq!((ack.kind, ack.seq), (kind::ACK, 2));

    // The same with login version 2: LOGIN and a HEARTBEAT in one write after the CHALLENGE.
    let mut cab = VendorCabinet::connect(stack.cabinet_addr(1), "CAB-PIPE").await;
    let nonce = cab.hello().await;
    let mut bytes = frame(kind::LOGIN, 0, 2, &login_payload("CAB-PIPE", now_ms(), Some(&nonce), &secret));
    bytes.extend(frame(kind::HEARTBEAT, 0, 3, &now_ms().to_be_bytes()));
    cab.send_raw(&bytes).await;
    assert_eq!(cab.recv().await.unwrap().payload[0], status::ACCEPTED);
    let ack = cab.recv_within(Duration::from_secs(2)).await.expect("HEARTBEAT_ACK without more bytes").unwrap();
    assert_eq!((ack.kind, ack.seq), (kind::HEARTBEAT_ACK, 3));
}

#[tokio::test]
async fn a_repeated_door_event_outside_an_order_is_applied_once() {
    let stack = Stack::start(|_| {}).await;
    let secret = stack.register_cabinet("CAB-DUP").await;
    let at = now_ms();
    let event = door_event(1, false, at, "");

    let mut cab = VendorCabinet::connect(stack.cabinet_addr(0), "CAB-DUP").await;
    assert_eq!(cab.login_v1(&secret).await.0, status::ACCEPTED);
    let seq = cab.send(kind::DOOR_EVENT, ACK_REQUESTED, &event).await;
    assert_eq!(cab.recv_kind(kind::ACK).await.seq, seq);
    // A retransmission: same seq, same connection (SPEC.md 1.10).
    cab.send_raw(&frame(kind::DOOR_EVENT, ACK_REQUESTED, seq, &event)).await;
    assert_eq!(cab.recv_kind(kind::ACK).await.seq, seq);
    drop(cab);
    // After a reconnect (on the other node): a new seq, the same fields.
    let mut cab = VendorCabinet::connect(stack.cabinet_addr(1), "CAB-DUP").await;
    assert_eq!(cab.login_v1(&secret).await.0, status::ACCEPTED);
    let seq = cab.send(kind::DOOR_EVENT, ACK_REQUESTED, &event).await;
    assert_eq!(cab.recv_kind(kind::ACK).await.seq, seq);
    // A different event behind them: once it is recorded, the three before it were applied.
    let seq = cab.send(kind::DOOR_EVENT, ACK_REQUESTED, &door_event(1, false, at + 1, "")).await;
    assert_eq!(cab.recv_kind(kind::ACK).await.seq, seq);

    let path = "/v1/anomalies?cabinet_id=CAB-DUP&kind=event_without_order";
    let times = |list: &serde_json::Value| -> Vec<u64> {
        list.as_array().unwrap().iter().filter_map(|a| a["detail"]["event"]["event_time_ms"].as_u64()).collect()
    };
    Stack::until("the later event's anomaly", testkit::WAIT, || async {
        times(&stack.get(path).await).contains(&(at + 1))
    })
    .await;
    let mut recorded = times(&stack.get(path).await);
    recorded.sort_unstable();
    assert_eq!(recorded, [at, at + 1], "each event recorded once");
}

#[tokio::test]
async fn registration_takes_effect_at_once_on_every_node() {
    let stack = Stack::start(|_| {}).await;
    // Both nodes learn (and cache, for 5 s by default) that the id is unknown.
    for node in 0..2 {
        let mut cab = VendorCabinet::connect(stack.cabinet_addr(node), "CAB-NEW").await;
        assert_eq!(cab.login_v1(&[7; 32]).await.0, status::UNKNOWN_DEVICE);
    }
    let secret = stack.register_cabinet("CAB-NEW").await;
    for node in 0..2 {
        let took = accepted_at_once(&stack, node, "CAB-NEW", &secret, "a login with the new registration").await;
        println!("registration effective on node {node} after {took:?}");
    }
}

#[tokio::test]
async fn rotation_ends_the_session_everywhere_and_each_new_secret_works_at_once() {
    let stack = Stack::start(|_| {}).await;
    let old = stack.register_cabinet("CAB-ROT").await;
    // Both nodes cache the old secret; the session ends up on node B.
    let mut first = VendorCabinet::connect(stack.cabinet_addr(0), "CAB-ROT").await;
    assert_eq!(first.login_v1(&old).await.0, status::ACCEPTED);
    let mut live = VendorCabinet::connect(stack.cabinet_addr(1), "CAB-ROT").await;
    assert_eq!(live.login_v1(&old).await.0, status::ACCEPTED);
    assert!(first.closed_within(testkit::WAIT).await, "taken over");

    let mut secret = old.clone();
    for round in 1..=2 {
        let new = hex::decode(stack.rotate("cab:CAB-ROT").await).unwrap();
        if round == 1 {
            assert!(live.closed_within(AT_ONCE).await, "the live session ends at the rotation");
        }
        for node in 0..2 {
            let mut cab = VendorCabinet::connect(stack.cabinet_addr(node), "CAB-ROT").await;
            assert_eq!(cab.login_v1(&secret).await.0, status::BAD_TAG, "the previous secret, node {node}");
            let took = accepted_at_once(&stack, node, "CAB-ROT", &new, "a login with the new secret").await;
            println!("rotation {round} effective on node {node} after {took:?}");
        }
        secret = new;
    }
    assert!(stack.metric(1, r#"gateway_sessions_closed_total{protocol="cabinet",reason="revoked"}"#) >= 1.0);
}

#[tokio::test]
async fn disable_ends_the_session_and_enable_restores_logins_at_once() {
    let stack = Stack::start(|_| {}).await;
    let secret = stack.register_cabinet("CAB-DIS").await;
    let mut live = VendorCabinet::connect(stack.cabinet_addr(0), "CAB-DIS").await;
    assert_eq!(live.login_v1(&secret).await.0, status::ACCEPTED);
    // Node B caches the credentials as enabled.
    let mut other = VendorCabinet::connect(stack.cabinet_addr(1), "CAB-DIS").await;
    assert_eq!(other.login_v1(&secret).await.0, status::ACCEPTED);
    assert!(live.closed_within(testkit::WAIT).await, "taken over");

    stack.set_enabled("cab:CAB-DIS", false).await;
    assert!(other.closed_within(AT_ONCE).await, "a disabled cabinet keeps no session");
    for node in 0..2 {
        let mut cab = VendorCabinet::connect(stack.cabinet_addr(node), "CAB-DIS").await;
        assert_eq!(cab.login_v1(&secret).await.0, status::DISABLED, "node {node}");
    }
    stack.set_enabled("cab:CAB-DIS", true).await;
    for node in 0..2 {
        let took = accepted_at_once(&stack, node, "CAB-DIS", &secret, "a login after enabling").await;
        println!("enable effective on node {node} after {took:?}");
    }
}

#[tokio::test]
async fn a_recorded_login_is_refused_and_counted() {
    let stack = Stack::start(|_| {}).await;
    let secret = stack.register_cabinet("CAB-REC").await;
    let replayed = |stack: &Stack| {
        (0..2).map(|n| stack.metric(n, r#"gateway_logins_total{protocol="cabinet",result="replayed"}"#)).sum::<f64>()
    };

    // Version 1: the recording of an accepted login, sent again on either node.
    let mut cab = VendorCabinet::connect(stack.cabinet_addr(0), "CAB-REC").await;
    let (accepted, recording) = cab.login_v1(&secret).await;
    assert_eq!(accepted, status::ACCEPTED);
    for node in 0..2 {
        let mut attacker = VendorCabinet::connect(stack.cabinet_addr(node), "CAB-REC").await;
        attacker.send_raw(&recording).await;
        assert_eq!(attacker.login_status(1).await, status::REPLAYED, "node {node}");
        assert!(attacker.closed_within(testkit::WAIT).await, "no session for a replay");
    }
    assert!(!cab.closed_within(Duration::from_millis(200)).await, "the real cabinet keeps its session");
    drop(cab);
    // The real cabinet's next login, with a later clock, is accepted.
    let mut cab = VendorCabinet::connect(stack.cabinet_addr(1), "CAB-REC").await;
    assert_eq!(cab.login_v1(&secret).await.0, status::ACCEPTED);

    // Version 2: a recording carries its connection's nonce.
    let mut cab = VendorCabinet::connect(stack.cabinet_addr(0), "CAB-REC").await;
    let (accepted, recording) = cab.login_v2(&secret).await;
    assert_eq!(accepted, status::ACCEPTED);
    let mut attacker = VendorCabinet::connect(stack.cabinet_addr(1), "CAB-REC").await;
    attacker.send_raw(&recording).await;
    assert_eq!(attacker.login_status(2).await, status::REPLAYED, "without a HELLO");
    let mut attacker = VendorCabinet::connect(stack.cabinet_addr(1), "CAB-REC").await;
    attacker.hello().await;
    attacker.send_raw(&recording).await;
    assert_eq!(attacker.login_status(2).await, status::REPLAYED, "after its own HELLO");
    assert_eq!(replayed(&stack), 4.0, "every replay counted");

    // No way back to version 1 for this device, even with a fresh clock and the right secret.
    let mut old_firmware = VendorCabinet::connect(stack.cabinet_addr(0), "CAB-REC").await;
    assert_eq!(old_firmware.login_v1(&secret).await.0, status::LOGIN_VERSION);
}

#[tokio::test]
async fn a_gateway_requiring_version_2_tells_version_1_cabinets() {
    let stack = Stack::start(|c| c.cabinet.min_login_version = 2).await;
    let secret = stack.register_cabinet("CAB-V2").await;
    let mut v1 = VendorCabinet::connect(stack.cabinet_addr(0), "CAB-V2").await;
    assert_eq!(v1.login_v1(&secret).await.0, status::LOGIN_VERSION);
    let mut v2 = VendorCabinet::connect(stack.cabinet_addr(0), "CAB-V2").await;
    assert_eq!(v2.login_v2(&secret).await.0, status::ACCEPTED);
}

#[tokio::test]
async fn clones_are_cooled_down_and_the_cool_down_grows() {
    let stack = Stack::start(|c| {
        c.flapping.max_logins = 4;
        c.flapping.cooldown_s = 2;
        c.flapping.max_cooldown_s = 60;
    })
    .await;
    let secret = stack.register_cabinet("CAB-CLONE").await;
    // Device times strictly increasing: two version-1 logins in one millisecond would be a
    // replay, refused without counting towards the flapping.
    let last = std::cell::Cell::new(0u64);
    let device_time = || {
        last.set(now_ms().max(last.get() + 1));
        last.get()
    };
    // Two cabinets with one identity, on both nodes, taking each other over.
    let mut live = None;
    for n in 0..4 {
        let mut cab = VendorCabinet::connect(stack.cabinet_addr(n % 2), "CAB-CLONE").await;
        assert_eq!(cab.login_v1_at(&secret, device_time()).await.0, status::ACCEPTED, "login {n}");
        live = Some(cab);
    }
    let mut live = live.unwrap();
    let mut clone = VendorCabinet::connect(stack.cabinet_addr(0), "CAB-CLONE").await;
    let seq = clone.next_seq();
    clone.send_raw(&frame(kind::LOGIN, 0, seq, &login_payload("CAB-CLONE", device_time(), None, &secret))).await;
    let refused = clone.recv().await.unwrap();
    assert_eq!((refused.kind, refused.payload[0]), (kind::LOGIN_RESULT, status::BUSY), "the fifth login");
    let first = VendorCabinet::retry_after_s(&refused);
    assert!((1..=2).contains(&first), "retry_after_s {first}");
    assert_eq!(stack.metric(0, r#"gateway_flapping_cooldowns_total{protocol="cabinet"}"#), 1.0);

    // The session live when the cool-down began keeps being served.
    let seq = live.send(kind::HEARTBEAT, 0, &now_ms().to_be_bytes()).await;
    assert_eq!(live.recv_kind(kind::HEARTBEAT_ACK).await.seq, seq);

    // Once it is over the id logs in again; flapping again earns a cool-down twice as long.
    Stack::until("the end of the cool-down", Duration::from_secs(5), || async {
        let mut cab = VendorCabinet::connect(stack.cabinet_addr(1), "CAB-CLONE").await;
        cab.login_v1_at(&secret, device_time()).await.0 == status::ACCEPTED
    })
    .await;
    let mut second = 0;
    for _ in 0..5 {
        let mut cab = VendorCabinet::connect(stack.cabinet_addr(1), "CAB-CLONE").await;
        let seq = cab.next_seq();
        cab.send_raw(&frame(kind::LOGIN, 0, seq, &login_payload("CAB-CLONE", device_time(), None, &secret))).await;
        let r = cab.recv().await.unwrap();
        if r.payload[0] == status::BUSY {
            second = VendorCabinet::retry_after_s(&r);
            break;
        }
    }
    assert!((3..=4).contains(&second), "the second cool-down doubles: retry_after_s {second}");
}
