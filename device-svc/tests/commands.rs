//! Commands through the API, the connection map and a real gateway to cabinets over sockets.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use protocol::bus::{CommandBody, DeviceKey, Outcome};
use protocol::cabinet::{Command, CommandAction, CommandResult, CommandStatus, DoorStatus, Frame, Message};
use protocol::mqtt::topic::{DownlinkKind, UplinkKind};
use serde_json::{Value, json};
use testkit::cabinet::Cabinet;

async fn next_command(cabinet: &mut Cabinet) -> (u32, Command) {
    let frame = cabinet.recv_matching("command", |f| matches!(f.message, Message::Command(_))).await;
    let Message::Command(command) = frame.message else { unreachable!() };
    (frame.seq, command)
}

fn send(api: Api, key: &str, body: Value) -> tokio::task::JoinHandle<Value> {
    let path = format!("/v1/devices/{key}/commands");
    tokio::spawn(async move { expect(api, "POST", &path, Some(body), 200).await })
}

#[tokio::test]
async fn a_connected_cabinet_answers_and_others_are_not_connected_or_time_out() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    let (id, secret) = register_cabinet(api, "cab-cmd-1", &[(1, 1), (2, 1)]).await;
    let mut cabinet = login(stack.cabinet_addr(), &id, &secret).await;
    wait_status(api, "cab:cab-cmd-1", "pending_init").await;

    // Answered.
    let pending = send(api, "cab:cab-cmd-1", json!({"action": "open_door", "door_id": 2, "order_id": "ord-1"}));
    let (seq, command) = next_command(&mut cabinet).await;
    let CommandAction::OpenDoor { door_id, order_id } = command.action else { panic!("{command:?}") };
    assert_eq!((door_id, order_id.as_str()), (2, "ord-1"));
    let result = CommandResult { status: CommandStatus::Ok, door_id: 2, door_state: DoorStatus::Open };
    cabinet.send_frame(Frame::new(seq, Message::CommandResult(result))).await;
    let answer = pending.await.unwrap();
    assert_eq!(answer["outcome"], "answered");
    assert_eq!(answer["result"], json!({"status": "ok", "door_id": 2, "door_state": "open"}));

    // Timed out: the cabinet stays mute; the answer comes at the deadline, not before.
    let answer =
        send(api, "cab:cab-cmd-1", json!({"action": "query_door", "door_id": 1, "timeout_ms": 800})).await.unwrap();
    assert_eq!(answer["outcome"], "timed_out");
    assert!(answer["elapsed_ms"].as_u64().unwrap() >= 800, "{answer}");

    // Not registered: 404, nothing sent. A door the cabinet does not have: 400.
    let ghost = json!({"action": "query_door", "door_id": 1});
    assert_eq!(expect(api, "POST", "/v1/devices/cab:ghost/commands", Some(ghost), 404).await["error"], "not_found");
    let no_door = json!({"action": "query_door", "door_id": 3});
    assert_eq!(expect(api, "POST", "/v1/devices/cab:cab-cmd-1/commands", Some(no_door), 400).await["field"], "door_id");
    // Not connected, at once, once disconnected.
    drop(cabinet);
    wait_status(api, "cab:cab-cmd-1", "offline").await;
    let answer =
        send(api, "cab:cab-cmd-1", json!({"action": "query_door", "door_id": 1, "timeout_ms": 10000})).await.unwrap();
    assert_eq!(answer["outcome"], "not_connected");
    assert!(answer["elapsed_ms"].as_u64().unwrap() < 5000, "{answer}");
    let unknown_car = json!({"action": "vehicle_command", "name": "locate"});
    expect(api, "POST", "/v1/devices/veh:LSVAU2180N2183294/commands", Some(unknown_car), 404).await;

    // Bad input.
    let path = "/v1/devices/cab:cab-cmd-1/commands";
    let e = expect(api, "POST", path, Some(json!({"action": "downlink", "kind": "command", "payload": {}})), 400).await;
    assert_eq!(e["field"], "action");
    let e = expect(api, "POST", path, Some(json!({"action": "open_door", "door_id": 1, "order_id": "no spaces"})), 400)
        .await;
    assert_eq!(e["field"], "order_id");
    let e = expect(api, "POST", path, Some(json!({"action": "query_door", "door_id": 1, "timeout_ms": 0})), 400).await;
    assert_eq!(e["field"], "timeout_ms");
    let e = expect(api, "POST", path, Some(json!({"action": "explode"})), 400).await;
    assert_eq!(e["field"], "action");
    let parts: Vec<String> = (0..40).map(|_| "a".repeat(4000)).collect();
    let huge = json!({"action": "downlink", "kind": "ota_notify", "payload": {"x": parts}});
    let e = expect(api, "POST", "/v1/devices/veh:LSVAU2180N2183294/commands", Some(huge), 400).await;
    assert_eq!(e["field"], "payload", "a downlink over 128 KiB");

    let text = &metrics_text(api).await;
    assert_eq!(metric(text, "devsvc_commands_total{outcome=\"answered\"}"), 1.0);
    assert_eq!(metric(text, "devsvc_commands_total{outcome=\"timed_out\"}"), 1.0);
    assert_eq!(metric(text, "devsvc_commands_total{outcome=\"not_connected\"}"), 1.0);
    svc.stop().await;
}

#[tokio::test]
async fn commands_to_one_door_go_one_at_a_time() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    let (id, secret) = register_cabinet(api, "cab-cmd-2", &[(1, 1), (2, 1)]).await;
    let mut cabinet = login(stack.cabinet_addr(), &id, &secret).await;
    wait_status(api, "cab:cab-cmd-2", "pending_init").await;

    let timeout_ms = 1500;
    let first = send(api, "cab:cab-cmd-2", json!({"action": "query_door", "door_id": 1, "timeout_ms": timeout_ms}));
    let (_, a) = next_command(&mut cabinet).await;
    let second = send(api, "cab:cab-cmd-2", json!({"action": "query_door", "door_id": 1, "timeout_ms": timeout_ms}));
    let other_door =
        send(api, "cab:cab-cmd-2", json!({"action": "query_door", "door_id": 2, "timeout_ms": timeout_ms}));
    // The cabinet stays mute. The other door's command arrives while the first is open; the
    // second command to door 1 only once the first has ended at its deadline.
    let (_, b) = next_command(&mut cabinet).await;
    let (_, c) = next_command(&mut cabinet).await;
    assert_eq!(b.action, CommandAction::QueryDoor { door_id: 2 });
    assert_eq!(c.action, CommandAction::QueryDoor { door_id: 1 });
    assert!(c.expires_at_ms >= a.expires_at_ms + timeout_ms, "second command sent before the first ended");
    for pending in [first, second, other_door] {
        assert_eq!(pending.await.unwrap()["outcome"], "timed_out");
    }
    svc.stop().await;
}

#[tokio::test]
async fn the_per_door_locks_hold_only_doors_in_use() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let app = std::sync::Arc::clone(&svc.app);
    let commander = &app.commander;
    // A caller naming cabinet doors that exist nowhere (the HTTP API refuses those; the
    // commander is what the purchase flow uses too).
    for n in 0..200u32 {
        let device = DeviceKey::parse(&format!("cab:cab-nowhere-{n}")).unwrap();
        let body = CommandBody::Cabinet(CommandAction::QueryDoor { door_id: u8::try_from(n % 255 + 1).unwrap() });
        assert_eq!(commander.send(&device, body, Duration::from_secs(1)).await.unwrap(), Outcome::NotConnected);
    }
    assert_eq!(commander.doors_in_use(), 0, "no lock kept for a door no command is using");

    // While a command waits on a mute cabinet, its door is in use; afterwards it is not.
    let (id, secret) = register_cabinet(stack.api(svc.addr), "cab-locks", &[(1, 1)]).await;
    let _cabinet = login(stack.cabinet_addr(), &id, &secret).await;
    wait_status(stack.api(svc.addr), "cab:cab-locks", "pending_init").await;
    let device = DeviceKey::Cabinet(id);
    let body = CommandBody::Cabinet(CommandAction::QueryDoor { door_id: 1 });
    let waiting = commander.send(&device, body, Duration::from_millis(800));
    tokio::pin!(waiting);
    let in_use = tokio::select! {
        _ = &mut waiting => panic!("a mute cabinet cannot answer"),
        n = async { wait_until("the door in use", WAIT, || async { (commander.doors_in_use() == 1).then_some(1) }).await } => n,
    };
    assert_eq!(in_use, 1);
    assert_eq!(waiting.await.unwrap(), Outcome::TimedOut);
    assert_eq!(commander.doors_in_use(), 0);
    svc.stop().await;
}

#[tokio::test]
async fn a_node_stream_at_its_byte_cap_takes_no_more_commands() {
    let stack = Stack::new().await;
    // Any stream at all is over this cap: the node's stream exists once the gateway reads it.
    let mut config = stack.svc_config("svc-1");
    config.commands.node_stream_max_bytes = 1;
    let svc = stack.service_with(config).await;
    let api = stack.api(svc.addr);
    let (id, secret) = register_cabinet(api, "cab-cap-1", &[(1, 1)]).await;
    let mut cabinet = login(stack.cabinet_addr(), &id, &secret).await;
    wait_status(api, "cab:cab-cap-1", "pending_init").await;

    let answer = send(api, "cab:cab-cap-1", json!({"action": "query_door", "door_id": 1})).await.unwrap();
    assert_eq!(answer["outcome"], "busy", "{answer}");
    let len: usize =
        redis::cmd("XLEN").arg(stack.keys.commands(&stack.node)).query_async(&mut stack.redis.clone()).await.unwrap();
    assert_eq!(len, 0, "nothing added to the node's stream");
    // The cabinet was sent nothing: the next frame it gets answers its own heartbeat.
    let seq = cabinet.send(Message::Heartbeat(protocol::cabinet::Heartbeat { device_time_ms: 0 })).await;
    let next = cabinet.recv().await.unwrap();
    assert!(matches!(next.message, Message::HeartbeatAck(_)) && next.seq == seq, "{next:?}");
    svc.stop().await;
}

#[tokio::test]
async fn after_redis_lost_everything_commands_route_and_logins_work_within_seconds() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    let mut fleet = Vec::new();
    for n in 0..10 {
        let (id, secret) = register_cabinet(api, &format!("cab-lost-{n}"), &[(1, 1)]).await;
        let cabinet = login(stack.cabinet_addr(), &id, &secret).await;
        wait_status(api, &format!("cab:{id}"), "pending_init").await;
        fleet.push((id, secret, cabinet));
    }
    let (late_id, late_secret) = register_cabinet(api, "cab-lost-late", &[(1, 1)]).await;

    // Redis forgets everything the system wrote (as a restart without persistence does).
    let removed = tokio::task::spawn_blocking({
        // Every node of a cluster, or the one server.
        let urls = common::cluster_seeds().unwrap_or_else(|| vec![stack.ns.url.clone()]);
        let prefix = stack.ns.prefix.clone();
        move || urls.iter().map(|url| testkit::delete_prefix(url, &prefix)).sum::<redis::RedisResult<usize>>()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(removed > 0);
    let lost_at = tokio::time::Instant::now();

    // The connection map is written back by the gateway, epochs and all.
    for (id, _, _) in &fleet {
        let key = stack.keys.conn(&DeviceKey::Cabinet(id.clone()));
        wait_until("the map entry back", Duration::from_secs(5), || {
            let (key, mut redis) = (key.clone(), stack.redis.clone());
            async move {
                let node: Option<String> =
                    redis::cmd("HGET").arg(&key).arg("node").query_async(&mut redis).await.ok()?;
                node.filter(|n| n == "gw-a")
            }
        })
        .await;
    }
    // A command routes to a cabinet connected before the loss.
    let (_, _, cabinet) = &mut fleet[0];
    let pending = send(api, "cab:cab-lost-0", json!({"action": "query_door", "door_id": 1}));
    let (seq, _) = next_command(cabinet).await;
    let result = CommandResult { status: CommandStatus::Ok, door_id: 1, door_state: DoorStatus::Closed };
    cabinet.send_frame(Frame::new(seq, Message::CommandResult(result))).await;
    assert_eq!(pending.await.unwrap()["outcome"], "answered");
    // A login works again: its credentials were written back and the gateway's cache dropped.
    wait_until("a login accepted", Duration::from_secs(5), || async {
        let (_, answer) = Cabinet::login(stack.cabinet_addr(), &late_id, &late_secret).await;
        (answer.status == protocol::cabinet::LoginStatus::Accepted).then_some(())
    })
    .await;
    // `--nocapture` shows how long healing took.
    #[allow(clippy::print_stdout)]
    {
        println!("healed {} ms after the loss", lost_at.elapsed().as_millis());
    }
    // Nobody was marked offline meanwhile.
    for (id, _, _) in &fleet {
        let device = expect(api, "GET", &format!("/v1/devices/cab:{id}"), None, 200).await;
        assert_eq!(device["status"], "pending_init", "{device}");
    }
    let metrics = metrics_text(api).await;
    assert!(metric(&metrics, "devsvc_redis_data_losses_total") >= 1.0);
    svc.stop().await;
}

/// A restart of Redis counts as a loss: with `appendfsync everysec` the last writes before a
/// crash are gone while the run marker, written long before, is not. Here a credential and one
/// cabinet's heartbeat deadline are removed durably by hand, as such a crash would have lost
/// them, then Redis is killed and restarted from its file: the credential and the lost deadline
/// come back, and the deadline that survived is not moved (moving it would put off the
/// judgement of a cabinet silent since before the crash, and every order waiting on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_redis_crash_lost_is_written_back_and_what_survived_is_kept() {
    let stack = Stack::new_private_redis().await;
    let mut config = stack.svc_config("svc-1");
    // The cabinets stay silent; none may be judged offline during the test.
    config.heartbeat.offline_after_s = 120;
    let shards = config.streams.shards;
    let svc = stack.service_with(config).await;
    let api = stack.api(svc.addr);
    // Two cabinets on one heartbeat shard, so one script call reseeds both.
    let names: Vec<String> = (0..64).map(|i| format!("cab-rs-{i}")).collect();
    let shard_of = |name: &str| DeviceKey::Cabinet(protocol::DeviceId::new(name).unwrap()).shard(shards);
    let kept = names[0].clone();
    let lost = names[1..].iter().find(|n| shard_of(n) == shard_of(&kept)).unwrap().clone();
    let (kept_id, kept_secret) = register_cabinet(api, &kept, &[(1, 2)]).await;
    let (lost_id, lost_secret) = register_cabinet(api, &lost, &[(1, 2)]).await;
    let _kept_cabinet = login(stack.cabinet_addr(), &kept_id, &kept_secret).await;
    let _lost_cabinet = login(stack.cabinet_addr(), &lost_id, &lost_secret).await;
    let deadlines = format!("{}{{hb:{}}}:deadline", stack.ns.prefix, shard_of(&kept));
    let deadline = |name: String| {
        let (mut con, deadlines) = (stack.redis.clone(), deadlines.clone());
        async move {
            let at: Option<f64> =
                redis::cmd("ZSCORE").arg(&deadlines).arg(format!("cab:{name}")).query_async(&mut con).await.ok()?;
            at
        }
    };
    let kept_before = wait_until("the kept cabinet's deadline", WAIT, || deadline(kept.clone())).await;
    wait_until("the lost cabinet's deadline", WAIT, || deadline(lost.clone())).await;
    let mut con = stack.redis.clone();
    let marker = format!("{}bus:run", stack.ns.prefix);
    wait_until("the run marker set", WAIT, || {
        let (mut con, marker) = (con.clone(), marker.clone());
        async move {
            let set: bool = redis::cmd("EXISTS").arg(&marker).query_async(&mut con).await.ok()?;
            set.then_some(())
        }
    })
    .await;
    let _: () = redis::cmd("CONFIG").arg("SET").arg("appendfsync").arg("always").query_async(&mut con).await.unwrap();
    let credential = stack.keys.credentials(&DeviceKey::Cabinet(lost_id.clone()));
    let _: i64 = redis::cmd("DEL").arg(&credential).query_async(&mut con).await.unwrap();
    let _: i64 = redis::cmd("ZREM").arg(&deadlines).arg(format!("cab:{lost}")).query_async(&mut con).await.unwrap();
    stack.crash_redis().await;

    // Both cabinets stay connected and silent, so only the write-back can give the lost one a
    // deadline again; the kept one is in the same script call, so by then it was decided too.
    let lost_after = wait_until("the lost deadline back", Duration::from_secs(5), || deadline(lost.clone())).await;
    assert!(lost_after > kept_before, "the lost deadline is fresh: {lost_after} vs {kept_before}");
    assert_eq!(deadline(kept.clone()).await, Some(kept_before), "a surviving deadline is kept");
    wait_until("a login accepted", Duration::from_secs(5), || async {
        let (_, answer) = Cabinet::login(stack.cabinet_addr(), &lost_id, &lost_secret).await;
        (answer.status == protocol::cabinet::LoginStatus::Accepted).then_some(())
    })
    .await;
    let metrics = metrics_text(api).await;
    assert!(metric(&metrics, "devsvc_redis_data_losses_total") >= 1.0);
    svc.stop().await;
}

/// A generic command to a vehicle is answered with the vehicle's own `command_result` (matched
/// by its `request_id`), not at the delivery; a command delivered and never answered times out
/// saying it was delivered; a result nobody waits for (another id, a repeat) goes nowhere.
#[tokio::test]
async fn a_vehicle_command_is_answered_with_the_vehicles_own_result() {
    const VIN: &str = "LSVAU2180N2183295";
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    let token = common::car::register_vehicle(api, VIN, json!({})).await;
    let mut car = common::car::Car::connect(stack.mqtt_addr(), VIN, &token).await;
    wait_status(api, &format!("veh:{VIN}"), "online").await;
    let key = format!("veh:{VIN}");

    let pending = send(api, &key, json!({"action": "vehicle_command", "name": "locate", "params": {"precise": true}}));
    let command = car.next(DownlinkKind::Command).await;
    assert_eq!((command["name"].as_str(), &command["params"]), (Some("locate"), &json!({"precise": true})));
    let request_id = command["request_id"].as_str().unwrap().to_owned();
    assert!(command["expires_at_ms"].as_u64().unwrap() > now_ms(), "{command}");
    // Another command's result first: not this one's answer.
    car.publish(UplinkKind::CommandResult, json!({"request_id": "c-someone-else", "status": "ok"})).await;
    let result = json!({"request_id": request_id, "status": "failed", "detail": "no GPS fix"});
    car.publish(UplinkKind::CommandResult, result.clone()).await;
    let answer = pending.await.unwrap();
    assert_eq!(answer["outcome"], "answered", "{answer}");
    assert_eq!(answer["result"], json!({"status": "failed", "detail": "no GPS fix"}));
    assert_eq!(answer["delivered"], true);
    // The same result again finds nobody waiting.
    car.publish(UplinkKind::CommandResult, result).await;

    // Delivered, never answered.
    let pending = send(api, &key, json!({"action": "vehicle_command", "name": "honk", "timeout_ms": 800}));
    car.next(DownlinkKind::Command).await;
    let answer = pending.await.unwrap();
    assert_eq!((answer["outcome"].as_str(), &answer["delivered"]), (Some("timed_out"), &json!(true)), "{answer}");
    assert!(answer["elapsed_ms"].as_u64().unwrap() >= 800, "{answer}");

    // A generic command is only the vehicle_command action; a name is bounded.
    let raw = json!({"action": "downlink", "kind": "command", "payload": {}});
    assert_eq!(expect(api, "POST", &format!("/v1/devices/{key}/commands"), Some(raw), 400).await["field"], "kind");
    let long = json!({"action": "vehicle_command", "name": "x".repeat(65)});
    assert_eq!(expect(api, "POST", &format!("/v1/devices/{key}/commands"), Some(long), 400).await["field"], "name");

    // The other id and the repeat were consumed and counted as going nowhere.
    wait_until("the unmatched results counted", WAIT, || async {
        let text = metrics_text(api).await;
        let ignored = metric(&text, "devsvc_stream_entries_total{result=\"ignored\",type=\"veh\"}");
        (ignored >= 2.0).then_some(())
    })
    .await;
    car.disconnect().await;
    wait_status(api, &key, "offline").await;
    let answer = send(api, &key, json!({"action": "vehicle_command", "name": "locate"})).await.unwrap();
    assert_eq!((answer["outcome"].as_str(), &answer["delivered"]), (Some("not_connected"), &json!(false)));
    svc.stop().await;
}
