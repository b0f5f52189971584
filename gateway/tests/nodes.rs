//! Several gateway nodes sharing one connection map: commands reach a device on whichever node
//! holds it, a login on another node takes over, and a restarted node clears what its previous
//! run left behind. Every test runs against a single Redis and against a three-node Redis
//! Cluster started here.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{Cabinet, Env, Vehicle, metric, payload};
use protocol::bus::{CommandBody, DeviceKey, Outcome, UpEvent};
use protocol::cabinet::{
    CommandAction, CommandResult, CommandStatus, DoorStatus, Frame, LoginStatus, Message, NoticeKind,
};
use protocol::mqtt::topic::DownlinkKind;
use rumqttc::Packet;

async fn cabinet_command_reaches_the_node_holding_it(env: Env) {
    let a = env.start("gw-a").await;
    let b = env.start("gw-b").await;
    let (id, secret) = env.provision_cabinet("CAB-X").await;
    let (mut cab, result) = Cabinet::login(b.addresses.cabinet.unwrap(), &id, &secret).await;
    assert_eq!(result.status, LoginStatus::Accepted);
    let device = DeviceKey::Cabinet(id);
    assert_eq!(env.map_entry(&device).await.get("node").map(String::as_str), Some("gw-b"));

    let body = CommandBody::Cabinet(CommandAction::QueryDoor { door_id: 1 });
    let answer = async {
        let frame = cab.recv_matching("command", |f| matches!(f.message, Message::Command(_))).await;
        let result = CommandResult { status: CommandStatus::Ok, door_id: 1, door_state: DoorStatus::Closed };
        cab.send_frame(Frame::new(frame.seq, Message::CommandResult(result))).await;
    };
    let (reply, ()) = tokio::join!(env.command(&device, body.clone(), Duration::from_secs(5)), answer);
    assert_eq!(reply.node, "gw-b");
    assert!(matches!(reply.outcome, Outcome::Cabinet(r) if r.door_state == DoorStatus::Closed));

    // Sent to the wrong node (a stale map read), the answer is explicit.
    let reply = env.command_via("gw-a", &device, body, Duration::from_secs(5)).await;
    assert_eq!(reply.outcome, Outcome::NotConnected);
    a.stop().await;
    b.stop().await;
}

async fn vehicle_downlink_reaches_the_node_holding_it(env: Env) {
    let a = env.start("gw-a").await;
    let b = env.start("gw-b").await;
    let (vin, token) = env.provision_vehicle("LSVAU2180N2183294").await;
    let mut car = Vehicle::connect(b.addresses.mqtt.unwrap(), &vin, &token).await;
    car.subscribe_downlinks().await;
    let device = DeviceKey::Vehicle(vin);
    let body = CommandBody::Vehicle { kind: DownlinkKind::Command, payload: payload(r#"{"name":"locate"}"#) };
    let (reply, publish) = tokio::join!(
        env.command(&device, body, Duration::from_secs(5)),
        car.wait_for("downlink", |p| matches!(p, Packet::Publish(_)))
    );
    assert_eq!(reply.node, "gw-b");
    assert_eq!(reply.outcome, Outcome::Delivered);
    assert!(matches!(publish, Packet::Publish(p) if p.topic.ends_with("/down/command")));
    a.stop().await;
    b.stop().await;
}

async fn login_on_another_node_takes_over(mut env: Env) {
    let a = env.start("gw-a").await;
    let b = env.start("gw-b").await;
    let (id, secret) = env.provision_cabinet("CAB-Y").await;
    let (mut on_a, _) = Cabinet::login(a.addresses.cabinet.unwrap(), &id, &secret).await;
    let (_on_b, result) = Cabinet::login(b.addresses.cabinet.unwrap(), &id, &secret).await;
    assert_eq!(result.status, LoginStatus::Accepted);

    // A's session ends, telling the cabinet why.
    let frames = on_a.until_closed().await;
    assert!(
        frames.iter().any(|f| matches!(&f.message, Message::Notice(n) if n.kind == NoticeKind::SessionReplaced)),
        "{frames:?}"
    );
    // A's cleanup has run (its close event is upstream) and did not remove B's entry.
    let closed =
        env.wait_upstream("A's close", |e| matches!(e, UpEvent::SessionClosed { node, .. } if node == "gw-a")).await;
    let UpEvent::SessionClosed { epoch: a_epoch, ref reason, .. } = closed else { unreachable!() };
    assert_eq!(reason, "taken_over");
    let entry = env.map_entry(&DeviceKey::Cabinet(id)).await;
    assert_eq!(entry.get("node").map(String::as_str), Some("gw-b"));
    let b_epoch: u64 = entry.get("epoch").unwrap().parse().unwrap();
    assert!(b_epoch > a_epoch, "B's session fences A's: {b_epoch} > {a_epoch}");
    assert_eq!(metric(&b, "gateway_takeovers_total", &[("protocol", "cabinet"), ("scope", "remote")]), 1.0);
    a.stop().await;
    b.stop().await;
}

async fn a_restarted_node_clears_what_a_crash_left(mut env: Env) {
    // What a crashed earlier run of gw-a left: an entry naming it, remembered in its set.
    let device = DeviceKey::parse("cab:CAB-Z").unwrap();
    let mut con = env.redis.clone();
    let _: () = redis::cmd("HSET")
        .arg(env.keys.conn(&device))
        .arg("node")
        .arg("gw-a")
        .arg("session")
        .arg("gw-a/1/1")
        .arg("epoch")
        .arg(5)
        .query_async(&mut con)
        .await
        .unwrap();
    let _: () = redis::cmd("SADD")
        .arg(env.keys.node_conns("gw-a"))
        .arg(device.to_string())
        .query_async(&mut con)
        .await
        .unwrap();

    let a = env.start("gw-a").await;
    let closed = env.wait_upstream("close", |e| matches!(e, UpEvent::SessionClosed { .. })).await;
    assert!(matches!(closed, UpEvent::SessionClosed { epoch: 5, ref reason, .. } if reason == "node_restart"));
    let entry = env.map_entry(&device).await;
    assert_eq!(entry.get("node"), None);
    assert_eq!(entry.get("epoch").map(String::as_str), Some("5"));
    a.stop().await;
}

macro_rules! on_both {
    ($($name:ident),+ $(,)?) => {
        mod single_redis {
            $(#[tokio::test] async fn $name() { super::$name(super::Env::single().await).await }) +
        }
        mod redis_cluster {
            $(#[tokio::test] async fn $name() { super::$name(super::Env::cluster().await).await }) +
        }
    };
}

on_both!(
    cabinet_command_reaches_the_node_holding_it,
    vehicle_downlink_reaches_the_node_holding_it,
    login_on_another_node_takes_over,
    a_restarted_node_clears_what_a_crash_left,
);
