//! The list routes (`GET /v1/devices`, `/v1/cabinets`, `/v1/vehicles`, `/v1/orders`): paging
//! visits every row once in the documented order whatever the page size, each filter keeps
//! exactly its rows, bad parameters are refused by name, and every list query is served by the
//! index meant for it in the list's order (the plans PostgreSQL chooses, read with `EXPLAIN`).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use common::*;
use device_svc::auth::Role;
use device_svc::fleet::{self, CabinetFilter, DeviceFilter, DeviceSort, VehicleFilter};
use device_svc::listing::{self, Cursor};
use device_svc::purchases::lists::{self as order_lists, OrderFilter};
use serde_json::{Value, json};

/// Every item of a list, following `next_cursor` with pages of `limit`.
async fn all_pages(api: Api, path: &str, limit: u32) -> Vec<Value> {
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let url = match &cursor {
            Some(c) => format!("{path}{sep}limit={limit}&cursor={c}"),
            None => format!("{path}{sep}limit={limit}"),
        };
        let page = expect(api, "GET", &url, None, 200).await;
        let got = page["items"].as_array().unwrap();
        assert!(got.len() <= limit as usize, "{url}: {} items", got.len());
        items.extend(got.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return items,
        }
    }
    panic!("{path}: no last page after 1000");
}

fn field(items: &[Value], name: &str) -> Vec<String> {
    items.iter().map(|i| i[name].as_str().unwrap().to_owned()).collect()
}

/// An order the test wrote.
#[derive(Debug, Clone)]
struct Seeded {
    id: String,
    cabinet: String,
    user: String,
    state: String,
    payment: Option<String>,
    review: bool,
    at: SystemTime,
}

/// Orders written straight to the database (the list reads what the purchase flow writes;
/// creating 40 orders through it would test the flow again, slowly).
async fn seed_orders(stack: &Stack) -> Vec<Seeded> {
    let pg = stack.pg().await;
    let base = SystemTime::now() - Duration::from_secs(3600);
    let states = ["settled", "cancelled", "abnormal", "settled", "door_open"];
    let mut rows = Vec::new();
    for n in 0..40u64 {
        let id = format!("ord-{n:03}");
        let cabinet = if n % 2 == 0 { "cab-l-a" } else { "cab-l-b" };
        let user = format!("u{}", n % 4);
        let state = states[(n % 5) as usize];
        let payment = (state == "settled").then(|| if n % 3 == 0 { "unpaid" } else { "paid" }.to_owned());
        let review = n % 7 == 0;
        // Pairs share a creation time: the id breaks the tie.
        let at = base + Duration::from_secs(n / 2 * 60);
        let active = matches!(state, "door_open");
        // Running orders hold their door: one per door, so only the newest stays running.
        let state = if active && n != 39 { "settled" } else { state };
        let payment = if state == "settled" && payment.is_none() { Some("paid".to_owned()) } else { payment };
        let review_arr: Vec<String> = if review { vec!["weights_not_stable".into()] } else { vec![] };
        pg.execute(
            "INSERT INTO orders (id, user_id, cabinet_id, door_id, state, lock_token, created_at, payment, review, tenant)
             VALUES ($1, $2, $3, 1, $4, 'x', $5, $6, $7, 'shop-1')",
            &[&id, &user, &cabinet, &state, &at, &payment, &review_arr],
        )
        .await
        .unwrap();
        rows.push(Seeded { id, cabinet: cabinet.to_owned(), user, state: state.to_owned(), payment, review, at });
    }
    rows
}

#[tokio::test]
async fn every_list_pages_through_each_row_once_and_keeps_exactly_what_its_filters_name() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-lists").await;
    let api = stack.api(svc.addr);

    for id in ["cab-l-a", "cab-l-b", "cab-l-c", "cab-l_x", "other-1"] {
        register_cabinet(api, id, &[(1, 2), (2, 1)]).await;
    }
    for vin in ["LSVL0000000000001", "LSVL0000000000002", "LSVL0000000000003"] {
        expect(api, "POST", "/v1/vehicles", Some(json!({"vin": vin, "token": format!("tok-{vin}")})), 201).await;
    }
    expect(
        api,
        "PATCH",
        "/v1/vehicles/LSVL0000000000002",
        Some(json!({"state": "activated", "sw_version": "2.1.0"})),
        200,
    )
    .await;
    expect(api, "PUT", "/v1/devices/cab:cab-l-b/enabled", Some(json!({"enabled": false})), 204).await;

    // Devices by key: every device once, ascending, whatever the page size.
    let all: Vec<String> = field(&all_pages(api, "/v1/devices", 500).await, "key");
    assert_eq!(all.len(), 8);
    assert!(all.windows(2).all(|w| w[0] < w[1]), "{all:?}");
    for limit in [1, 3] {
        assert_eq!(field(&all_pages(api, "/v1/devices", limit).await, "key"), all);
    }
    // By last change, newest first; the same set.
    let changed = all_pages(api, "/v1/devices?sort=changed", 2).await;
    let times: Vec<u64> = changed.iter().map(|d| d["status_changed_ms"].as_u64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    assert_eq!(field(&changed, "key").into_iter().collect::<BTreeSet<_>>(), all.iter().cloned().collect());

    assert_eq!(field(&all_pages(api, "/v1/devices?kind=veh", 2).await, "key").len(), 3);
    assert_eq!(field(&all_pages(api, "/v1/devices?enabled=false", 2).await, "key"), ["cab:cab-l-b"]);
    assert_eq!(all_pages(api, "/v1/devices?enabled=true", 2).await.len(), 7);
    assert_eq!(all_pages(api, "/v1/devices?status=registered&kind=cab", 2).await.len(), 5);
    assert!(all_pages(api, "/v1/devices?status=online", 2).await.is_empty());
    // A prefix is literal: `_` in it matches only itself.
    assert_eq!(field(&all_pages(api, "/v1/devices?q=cab:cab-l_", 2).await, "key"), ["cab:cab-l_x"]);
    assert_eq!(all_pages(api, "/v1/devices?q=cab:cab-l", 2).await.len(), 4);
    let future = now_ms() + 60_000;
    assert!(all_pages(api, &format!("/v1/devices?changed_from_ms={future}"), 5).await.is_empty());
    assert_eq!(all_pages(api, &format!("/v1/devices?changed_before_ms={future}"), 5).await.len(), 8);

    // Cabinets with their doors and lanes, by id.
    let cabinets = all_pages(api, "/v1/cabinets?q=cab-l-", 2).await;
    assert_eq!(field(&cabinets, "id"), ["cab-l-a", "cab-l-b", "cab-l-c"]);
    assert_eq!(cabinets[0]["doors"].as_array().unwrap().len(), 2);
    assert_eq!(cabinets[0]["doors"][0]["lanes"].as_array().unwrap().len(), 2);
    assert_eq!(cabinets[0]["status"], "registered");

    // Vehicles by state, version, VIN prefix.
    assert_eq!(field(&all_pages(api, "/v1/vehicles?state=activated", 1).await, "vin"), ["LSVL0000000000002"]);
    assert_eq!(field(&all_pages(api, "/v1/vehicles?sw_version=2.1.0", 1).await, "vin"), ["LSVL0000000000002"]);
    assert_eq!(all_pages(api, "/v1/vehicles?q=LSVL", 1).await.len(), 3);

    // Orders, newest first with the id breaking ties, and each filter against the rows written.
    let rows = seed_orders(&stack).await;
    let mut expected = rows.clone();
    expected.sort_by(|a, b| (b.at, &b.id).cmp(&(a.at, &a.id)));
    let expected_ids: Vec<String> = expected.iter().map(|r| r.id.clone()).collect();
    for limit in [1, 7, 40, 500] {
        assert_eq!(field(&all_pages(api, "/v1/orders", limit).await, "id"), expected_ids, "limit {limit}");
    }
    let only =
        |keep: &dyn Fn(&Seeded) -> bool| expected.iter().filter(|r| keep(r)).map(|r| r.id.clone()).collect::<Vec<_>>();
    assert_eq!(
        field(&all_pages(api, "/v1/orders?cabinet_id=cab-l-b", 3).await, "id"),
        only(&|r| r.cabinet == "cab-l-b")
    );
    assert_eq!(field(&all_pages(api, "/v1/orders?user_id=u2", 3).await, "id"), only(&|r| r.user == "u2"));
    assert_eq!(field(&all_pages(api, "/v1/orders?state=cancelled", 3).await, "id"), only(&|r| r.state == "cancelled"));
    assert_eq!(
        field(&all_pages(api, "/v1/orders?payment=unpaid", 3).await, "id"),
        only(&|r| r.payment.as_deref() == Some("unpaid"))
    );
    let review = only(&|r| r.review || r.state == "abnormal");
    assert!(!review.is_empty());
    assert_eq!(field(&all_pages(api, "/v1/orders?review=true", 3).await, "id"), review);
    let (from, to) = (rows[10].at, rows[20].at);
    let ms = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis();
    let window = all_pages(api, &format!("/v1/orders?from_ms={}&to_ms={}", ms(from), ms(to)), 4).await;
    assert_eq!(field(&window, "id"), only(&|r| r.at >= from && r.at < to));
    assert_eq!(
        field(&all_pages(api, "/v1/orders?cabinet_id=cab-l-a&state=settled", 2).await, "id"),
        only(&|r| r.cabinet == "cab-l-a" && r.state == "settled")
    );

    // Anomalies: open or resolved, paged back by id.
    let pg = stack.pg().await;
    for n in 0..9i32 {
        let kind = if n % 3 == 0 { "lane_gain" } else { "cabinet_silent" };
        let resolved: Option<SystemTime> = (n % 2 == 0).then(SystemTime::now);
        pg.execute(
            "INSERT INTO anomalies (kind, source, cabinet_id, door_id, detail, resolved_at) VALUES ($1, $2, 'cab-l-a', 1, '{}', $3)",
            &[&kind, &format!("test:{n}"), &resolved],
        )
        .await
        .unwrap();
    }
    let ids = |v: &Value| v.as_array().unwrap().iter().map(|a| a["id"].as_i64().unwrap()).collect::<Vec<_>>();
    let open = expect(api, "GET", "/v1/anomalies?resolved=false", None, 200).await;
    assert_eq!(open.as_array().unwrap().len(), 4);
    assert!(open.as_array().unwrap().iter().all(|a| a["resolved"] == false));
    let first = ids(&expect(api, "GET", "/v1/anomalies?limit=4", None, 200).await);
    let rest = ids(&expect(api, "GET", &format!("/v1/anomalies?limit=10&before_id={}", first[3]), None, 200).await);
    assert_eq!((first.len(), rest.len()), (4, 5));
    assert!(first.iter().chain(&rest).collect::<Vec<_>>().windows(2).all(|w| w[0] > w[1]), "{first:?} {rest:?}");
    let gains = expect(api, "GET", "/v1/anomalies?kind=lane_gain&resolved=true", None, 200).await;
    assert_eq!(gains.as_array().unwrap().len(), 2, "{gains}");
    assert_eq!(expect(api, "GET", "/v1/anomalies?resolved=maybe", None, 400).await["field"], "resolved");

    // Refusals name the parameter; a viewer may list, a shop may not.
    for (path, name) in [
        ("/v1/devices?colour=red", "colour"),
        ("/v1/devices?status=lost", "status"),
        ("/v1/devices?limit=0", "limit"),
        ("/v1/devices?limit=501", "limit"),
        ("/v1/devices?cursor=zz", "cursor"),
        ("/v1/orders?from_ms=yesterday", "from_ms"),
        ("/v1/orders?review=maybe", "review"),
        ("/v1/vehicles?state=flying", "state"),
    ] {
        let e = expect(api, "GET", path, None, 400).await;
        assert_eq!(e["field"], name, "{path}: {e}");
    }
    let key_cursor = Cursor::after(None, "cab:x").encode();
    let e = expect(api, "GET", &format!("/v1/orders?cursor={key_cursor}"), None, 400).await;
    assert_eq!(e["field"], "cursor");
    let long = "x".repeat(200);
    assert_eq!(expect(api, "GET", &format!("/v1/orders?user_id={long}"), None, 400).await["field"], "user_id");
    let viewer = api.with_key(&stack.key(Role::Viewer, None).await);
    for path in ["/v1/devices", "/v1/cabinets", "/v1/vehicles", "/v1/orders"] {
        expect(viewer, "GET", path, None, 200).await;
    }
    let shop = api.with_key(&stack.key(Role::Shop, Some("shop-1")).await);
    assert_eq!(http(shop, "GET", "/v1/orders", None).await.0, 403);
    svc.stop().await;
}

/// The scan nodes of a plan (`EXPLAIN (FORMAT JSON)`), and whether it sorts anywhere.
fn scans(plan: &Value, out: &mut Vec<(String, Option<String>)>, sorts: &mut bool) {
    let kind = plan["Node Type"].as_str().unwrap_or_default();
    if kind.contains("Sort") {
        *sorts = true;
    }
    if kind.contains("Scan") {
        out.push((kind.to_owned(), plan["Index Name"].as_str().map(str::to_owned)));
    }
    for child in plan["Plans"].as_array().into_iter().flatten() {
        scans(child, out, sorts);
    }
}

#[tokio::test]
async fn every_list_query_is_served_by_its_index_in_the_lists_order() {
    let stack = Stack::new().await;
    let pg = stack.pg().await;
    // The test's tables are nearly empty: forbid the sequential scan and the sort that would
    // win there, so the plan shows the index PostgreSQL would use at 100,000 devices and
    // 10 million orders (BENCHMARKS.md has the plans and timings at those sizes).
    pg.batch_execute("SET enable_seqscan = off; SET enable_sort = off; SET enable_bitmapscan = off").await.unwrap();
    let at = Cursor::after(Some(SystemTime::now()), "x");
    let key = Cursor::after(None, "cab:x");
    let t = Some(SystemTime::now());
    let s = |v: &str| Some(v.to_owned());

    let devices = |f: DeviceFilter| f;
    let mut cases: Vec<(&str, (String, listing::Params), &[&str])> = vec![
        ("devices", fleet::devices_query(&DeviceFilter::default(), Some(&key), 50).unwrap(), &["devices_key_c"]),
        (
            "devices by kind and status",
            fleet::devices_query(
                &devices(DeviceFilter { kind: s("cab"), status: s("offline"), ..Default::default() }),
                Some(&key),
                50,
            )
            .unwrap(),
            &["devices_status_key"],
        ),
        (
            "devices by status",
            fleet::devices_query(&DeviceFilter { status: s("online"), ..Default::default() }, None, 50).unwrap(),
            &["devices_status_key"],
        ),
        (
            "devices by node",
            fleet::devices_query(&DeviceFilter { node: s("gw-1"), ..Default::default() }, Some(&key), 50).unwrap(),
            &["devices_node_key"],
        ),
        (
            "disabled devices",
            fleet::devices_query(&DeviceFilter { enabled: Some(false), ..Default::default() }, None, 50).unwrap(),
            &["devices_disabled"],
        ),
        (
            "devices by prefix",
            fleet::devices_query(&DeviceFilter { key_prefix: s("cab:A1"), ..Default::default() }, None, 50).unwrap(),
            &["devices_key_c"],
        ),
        (
            "devices by last change",
            fleet::devices_query(
                &DeviceFilter { sort: DeviceSort::Changed, changed_before: t, ..Default::default() },
                Some(&at),
                50,
            )
            .unwrap(),
            &["devices_changed"],
        ),
        (
            "offline devices, longest silent last",
            fleet::devices_query(
                &DeviceFilter { status: s("offline"), sort: DeviceSort::Changed, ..Default::default() },
                Some(&at),
                50,
            )
            .unwrap(),
            &["devices_status_changed"],
        ),
        (
            "cabinets",
            fleet::cabinets_query(&CabinetFilter::default(), Some(&key), 50),
            &["cabinets_id_c", "devices_pkey"],
        ),
        (
            "cabinets by prefix",
            fleet::cabinets_query(&CabinetFilter { id_prefix: s("A1"), ..Default::default() }, None, 50),
            &["cabinets_id_c", "devices_pkey"],
        ),
        (
            "vehicles",
            fleet::vehicles_query(&VehicleFilter::default(), Some(&key), 50),
            &["vehicles_vin_c", "devices_pkey"],
        ),
        (
            "vehicles by state",
            fleet::vehicles_query(&VehicleFilter { state: s("activated"), ..Default::default() }, None, 50),
            &["vehicles_state_vin", "devices_pkey"],
        ),
        (
            "vehicles by version",
            fleet::vehicles_query(&VehicleFilter { sw_version: s("2.1.0"), ..Default::default() }, None, 50),
            &["vehicles_version_vin", "devices_pkey"],
        ),
        (
            "vehicles by owner",
            fleet::vehicles_query(&VehicleFilter { owner_user_id: s("u1"), ..Default::default() }, None, 50),
            &["vehicles_owner_vin", "devices_pkey"],
        ),
    ];
    let orders = |f: OrderFilter| order_lists::query(&f, Some(&at), 50).unwrap();
    cases.extend([
        ("orders", orders(OrderFilter::default()), &["orders_created"][..]),
        ("orders in a time range", orders(OrderFilter { from: t, to: t, ..Default::default() }), &["orders_created"]),
        (
            "orders by state",
            orders(OrderFilter { state: s("abnormal"), ..Default::default() }),
            &["orders_state_created"],
        ),
        (
            "orders by cabinet",
            orders(OrderFilter { cabinet_id: s("A1"), from: t, ..Default::default() }),
            &["orders_cabinet_created"],
        ),
        ("orders by user", orders(OrderFilter { user_id: s("u1"), ..Default::default() }), &["orders_user_created"]),
        (
            "orders by payment",
            orders(OrderFilter { payment: s("unpaid"), ..Default::default() }),
            &["orders_payment_created"],
        ),
        ("the review queue", orders(OrderFilter { review: true, ..Default::default() }), &["orders_to_review"]),
    ]);

    let anomalies = |f: device_svc::purchases::anomalies::Filter| device_svc::purchases::anomalies::query(&f, 100);
    type AF = device_svc::purchases::anomalies::Filter;
    cases.extend([
        ("anomalies", anomalies(AF { before_id: Some(1000), ..Default::default() }), &["anomalies_pkey"][..]),
        ("anomalies of an order", anomalies(AF { order_id: s("o1"), ..Default::default() }), &["anomalies_order"]),
        ("anomalies of a cabinet", anomalies(AF { cabinet_id: s("A1"), ..Default::default() }), &["anomalies_cabinet"]),
        ("anomalies of a kind", anomalies(AF { kind: s("lane_gain"), ..Default::default() }), &["anomalies_kind"]),
        ("open anomalies", anomalies(AF { resolved: Some(false), ..Default::default() }), &["anomalies_open"]),
    ]);

    for (name, (sql, params), indexes) in cases {
        let rows = pg.query(&format!("EXPLAIN (FORMAT JSON) {sql}"), &listing::refs(&params)).await.unwrap();
        let plan: Value = rows[0].get(0);
        let (mut found, mut sorts) = (Vec::new(), false);
        scans(&plan[0]["Plan"], &mut found, &mut sorts);
        assert!(!sorts, "{name}: the plan sorts, so no index gives the list's order: {plan}");
        for (kind, index) in &found {
            let index = index.as_deref().unwrap_or("-");
            assert!(
                kind.starts_with("Index") && indexes.contains(&index),
                "{name}: {kind} on {index}, not one of {indexes:?}: {plan}"
            );
        }
        assert!(found.iter().any(|(_, i)| i.as_deref() == Some(indexes[0])), "{name}: {indexes:?} unused: {plan}");
    }
}
