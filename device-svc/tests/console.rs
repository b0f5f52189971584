//! The operator console in a real browser: headless Chromium (Debian's `chromium` and
//! `chromium-driver`) driven over WebDriver by `fantoccini`. An operator signs in, finds a
//! cabinet, sends it a command and sees the cabinet's answer, settles an order in review,
//! validates then creates and cancels an OTA task; a
//! viewer sees no action and the server refuses one sent by hand; a form without the session's
//! CSRF token is refused. Screenshots of the main pages are kept in
//! `target/console-screenshots/` (named in README).

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use common::buying::*;
use common::*;
use device_svc::auth::Role;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// A chromedriver on a free port, stopped when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn driver() -> Driver {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver runs (scripts/test installs Debian's chromium-driver)");
    let url = format!("http://127.0.0.1:{port}");
    wait_until("chromedriver listening", WAIT, || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ())
    })
    .await;
    Driver { child, url }
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"binary": "/usr/bin/chromium", "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1366,900"]}),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector).capabilities(caps).connect(&driver.url).await.expect("a Chromium session")
}

/// Waits until the browser is at a URL `at` accepts (a click's navigation has happened).
async fn arrived(c: &Client, what: &str, at: impl Fn(&str, &str) -> bool) {
    wait_until(what, WAIT, || async {
        let url = c.current_url().await.ok()?;
        at(url.path(), url.query().unwrap_or_default()).then_some(())
    })
    .await;
}

/// Waits for an element only the page after an action has (a message, a result).
async fn shown(c: &Client, css: &str) -> String {
    c.wait().for_element(Locator::Css(css)).await.unwrap().text().await.unwrap()
}

async fn screenshot(c: &Client, name: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), c.screenshot().await.unwrap()).unwrap();
}

async fn sign_in(c: &Client, base: &str, key: &str) {
    c.goto(&format!("{base}/console")).await.unwrap();
    assert!(c.current_url().await.unwrap().path().ends_with("/console/login"), "not signed in: the sign-in page");
    c.find(Locator::Id("key")).await.unwrap().send_keys(key).await.unwrap();
    c.find(Locator::Css("button[type=submit]")).await.unwrap().click().await.unwrap();
    arrived(c, "the fleet page", |path, _| path == "/console").await;
    let h1 = c.find(Locator::Css("h1")).await.unwrap().text().await.unwrap();
    assert_eq!(h1, "Fleet");
}

async fn text(c: &Client) -> String {
    c.find(Locator::Css("main")).await.unwrap().text().await.unwrap()
}

/// Signs in over plain HTTP; returns the session cookie and the CSRF token of a page.
async fn raw_session(addr: SocketAddr, key: &str) -> (String, String) {
    let body = format!("key={key}");
    let request = format!(
        "POST /console/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, head, _) = testkit::http::exchange(addr, &request).await;
    assert_eq!(status, 303, "{head}");
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: ").or_else(|| l.strip_prefix("Set-Cookie: ")))
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert!(head.to_ascii_lowercase().contains("httponly; samesite=strict"), "{head}");
    let lower = head.to_ascii_lowercase();
    for header in ["frame-ancestors 'none'", "x-frame-options: deny", "cache-control: no-store", "default-src 'none'"] {
        assert!(lower.contains(header), "{header} missing: {head}");
    }
    let request = format!("GET /console HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n");
    let (status, _, page) = testkit::http::exchange(addr, &request).await;
    assert_eq!(status, 200);
    let page = page.as_str().unwrap().to_owned();
    let csrf = page.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    (cookie, csrf)
}

async fn raw_post(addr: SocketAddr, cookie: &str, path: &str, body: &str) -> u16 {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    testkit::http::exchange(addr, &request).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_the_fleet_from_the_console_and_a_viewer_only_looks() {
    let (stack, _, svc, shop) = setup("cab-con-1", |_| {}).await;
    let api = stack.api(svc.addr);
    let base = format!("http://{}", svc.addr);
    let operator = stack.key(Role::Operator, None).await;
    let viewer = stack.key(Role::Viewer, None).await;
    // An order the operator will settle: its door was seen hanging open, so it is in review.
    let stuck = open(api, "cora", "cab-con-1", 1).await;
    let body = json!({"operator": "olga", "reason": "lock broken", "door": "open"});
    expect(api, "POST", &format!("/v1/orders/{stuck}/force-close"), Some(body), 200).await;

    let driver = driver().await;
    let c = browser(&driver).await;
    sign_in(&c, &base, &operator).await;
    assert!(text(&c).await.contains("online"), "devices by status");
    screenshot(&c, "fleet").await;

    // Find the cabinet by its id and open its page.
    c.find(Locator::Css("input[name=q]")).await.unwrap().send_keys("cab:cab-con").await.unwrap();
    c.find(Locator::Css("form[role=search] button")).await.unwrap().click().await.unwrap();
    arrived(&c, "the search's page", |_, query| query.contains("q=cab")).await;
    c.find(Locator::LinkText("cab:cab-con-1")).await.unwrap().click().await.unwrap();
    arrived(&c, "the cabinet's page", |path, _| path.starts_with("/console/devices/")).await;
    assert_eq!(c.find(Locator::Css("h1")).await.unwrap().text().await.unwrap(), "cab:cab-con-1");

    // Ask the cabinet for door 1's state: its own answer is shown (the door hangs open).
    c.find(Locator::Id("action")).await.unwrap().select_by_value("query_door").await.unwrap();
    c.find(Locator::Id("send-command")).await.unwrap().click().await.unwrap();
    let result = shown(&c, "#command-result").await;
    assert!(result.contains("\"outcome\": \"answered\"") && result.contains("\"door_state\": \"open\""), "{result}");
    assert!(text(&c).await.contains("key:"), "the command is in the device's last commands");
    screenshot(&c, "device").await;

    // The review queue holds the stuck order; settle it with the item counted.
    c.goto(&format!("{base}/console/orders?review=true")).await.unwrap();
    screenshot(&c, "orders").await;
    c.find(Locator::LinkText(&stuck)).await.unwrap().click().await.unwrap();
    arrived(&c, "the order's page", |path, _| path.ends_with(stuck.as_str())).await;
    let lane = c.find(Locator::Id("settle-lane-3")).await.unwrap();
    lane.clear().await.unwrap();
    lane.send_keys("1").await.unwrap();
    c.find(Locator::Id("settle")).await.unwrap().click().await.unwrap();
    assert!(shown(&c, "p.ok").await.starts_with("Settled"));
    assert_eq!(c.find(Locator::Id("order-state")).await.unwrap().text().await.unwrap(), "settled");
    screenshot(&c, "order").await;
    assert_eq!(expect(api, "GET", &format!("/v1/orders/{stuck}"), None, 200).await["amount_cents"], COLA.2);
    c.goto(&format!("{base}/console/audit")).await.unwrap();
    assert!(text(&c).await.contains(&format!("/console/orders/{stuck}/settle")), "the settlement is audited");
    screenshot(&c, "audit").await;

    // An OTA task: validation first (one vehicle refused, nothing pushed), then created and
    // cancelled.
    for (vin, version) in [("LSVCEN00000000001", "1.0.0"), ("LSVCEN00000000002", "2.0.0")] {
        expect(api, "POST", "/v1/vehicles", Some(json!({"vin": vin, "token": format!("tok-{vin}")})), 201).await;
        expect(api, "PATCH", &format!("/v1/vehicles/{vin}"), Some(json!({"sw_version": version})), 200).await;
    }
    c.goto(&format!("{base}/console/ota")).await.unwrap();
    for (id, value) in [
        ("ota-name", "spring fix"),
        ("ota-version", "2.0.0"),
        ("ota-package-id", "pkg-2.0.0"),
        ("ota-size", "734003200"),
        ("ota-sha256", &"9a".repeat(32)),
        ("ota-signature", "sig"),
        ("ota-url", "https://updates.example/pkg-2.0.0"),
        ("ota-vins", "LSVCEN00000000001\nLSVCEN00000000002"),
    ] {
        c.find(Locator::Id(id)).await.unwrap().send_keys(value).await.unwrap();
    }
    c.find(Locator::Id("ota-validate")).await.unwrap().click().await.unwrap();
    let validation = shown(&c, "#validation").await;
    assert!(validation.contains("1 vehicle(s) would be upgraded, 1 refused"), "{validation}");
    assert!(validation.contains("LSVCEN00000000002") && validation.contains("same_version"), "{validation}");
    let tasks = expect(api, "GET", "/v1/ota/tasks", None, 200).await;
    assert_eq!(tasks.as_array().unwrap().len(), 0, "validation creates nothing: {tasks}");
    screenshot(&c, "ota").await;
    c.find(Locator::Id("ota-create")).await.unwrap().click().await.unwrap();
    arrived(&c, "the new task's page", |path, _| path.starts_with("/console/ota/")).await;
    c.find(Locator::Id("ota-cancel")).await.unwrap().click().await.unwrap();
    assert_eq!(shown(&c, "p.ok").await, "Cancelled.");
    assert_eq!(c.find(Locator::Id("task-state")).await.unwrap().text().await.unwrap(), "cancelled");
    let tasks = expect(api, "GET", "/v1/ota/tasks", None, 200).await;
    assert_eq!((tasks.as_array().unwrap().len(), tasks[0]["state"].as_str()), (1, Some("cancelled")), "{tasks}");

    // The remaining pages answer for an operator.
    for (path, heading) in [
        ("/console/anomalies", "Anomalies"),
        ("/console/alerts", "Alerts and notices"),
        ("/console/dead-letters", "Dead letters"),
    ] {
        c.goto(&format!("{base}{path}")).await.unwrap();
        assert_eq!(c.find(Locator::Css("h1")).await.unwrap().text().await.unwrap(), heading);
    }
    assert!(text(&c).await.contains("Dead letters"));

    // A viewer sees the same pages without a single action.
    c.delete_all_cookies().await.unwrap();
    sign_in(&c, &base, &viewer).await;
    c.goto(&format!("{base}/console/devices/cab:cab-con-1")).await.unwrap();
    assert!(c.find(Locator::Id("send-command")).await.is_err(), "a viewer is shown no command form");
    c.goto(&format!("{base}/console/orders/{stuck}")).await.unwrap();
    assert!(c.find(Locator::Css("fieldset")).await.is_err(), "a viewer is shown no order action");
    c.goto(&format!("{base}/console/ota")).await.unwrap();
    assert!(c.find(Locator::Id("ota-create")).await.is_err(), "a viewer is shown no OTA form");
    c.close().await.unwrap();

    // By hand: the viewer's session is refused an action; an operator's without the token too;
    // a shop key cannot sign in.
    let (cookie, csrf) = raw_session(svc.addr, &viewer).await;
    let path = "/console/devices/cab:cab-con-1/commands";
    assert_eq!(raw_post(svc.addr, &cookie, path, &format!("csrf={csrf}&action=query_door&door_id=1")).await, 403);
    let (cookie, csrf) = raw_session(svc.addr, &operator).await;
    assert_eq!(raw_post(svc.addr, &cookie, path, "csrf=forged&action=query_door&door_id=1").await, 403);
    assert_eq!(raw_post(svc.addr, &cookie, path, &format!("csrf={csrf}&action=query_door&door_id=1")).await, 200);
    let shop_key = stack.key(Role::Shop, Some("shop-1")).await;
    let body = format!("key={shop_key}");
    let request = format!(
        "POST /console/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(testkit::http::exchange(svc.addr, &request).await.0, 401);
    // Without a session every page sends the browser to sign in.
    let (status, head, _) =
        testkit::http::exchange(svc.addr, "GET /console/orders HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(status == 303 && head.contains("/console/login"), "{head}");
    drop(driver);
    shop.stop().await;
    svc.stop().await;
}
