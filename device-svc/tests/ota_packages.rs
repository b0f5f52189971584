//! Stored OTA packages end to end: uploads sealed into a real store (a directory, and an
//! S3-protocol server, `moto`), notices carrying signed URLs to real MQTT vehicles, downloads
//! with `Range` byte for byte, resumes at random offsets, tampering, wrong vehicles, deltas
//! chosen by version, and a master-key rotation.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;

use base64::Engine as _;
use common::car::{Car, register_vehicle};
use common::*;
use protocol::mqtt::topic::DownlinkKind;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const K1: &str = "0101010101010101010101010101010101010101010101010101010101010101";
const K2: &str = "0202020202020202020202020202020202020202020202020202020202020202";
const SIGNING: &str = "5555555555555555555555555555555555555555555555555555555555555555";
const MIB: usize = 1 << 20;

fn vin(n: u32) -> String {
    format!("LSVAU2180N3{n:06}")
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| rng.u8(..)).collect()
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn fresh_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("iotgw-{what}-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A configuration with the package path on: keys `masters` (current `current`), the store.
fn config(
    stack: &Stack,
    instance: &str,
    masters: &str,
    current: &str,
    dir: &std::path::Path,
) -> device_svc::config::Config {
    let mut c = stack.svc_config(instance);
    let p = &mut c.ota.packages;
    p.master_keys = device_svc::secret::SecretText(masters.into());
    p.master_key = current.into();
    p.signing_key = device_svc::secret::SecretText(SIGNING.into());
    p.path = dir.to_string_lossy().into_owned();
    p.max_bytes = 16 * MIB as u64;
    c
}

/// A raw HTTP exchange: status, head, body bytes.
async fn exchange(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    // A server refusing an upload early answers and closes before the body is all sent.
    let _ = tcp.write_all(body).await;
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut raw)).await.unwrap().unwrap();
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8(raw[..end].to_vec()).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head, raw[end..].to_vec())
}

async fn upload(stack: &Stack, addr: SocketAddr, id: &str, query: &str, bytes: &[u8]) -> (u16, Value) {
    let key = stack.parties.key_for("PUT", "/v1/ota/packages").unwrap();
    let head = format!(
        "PUT /v1/ota/packages/{id}?{query} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        bytes.len()
    );
    let (status, _, body) = exchange(addr, &head, bytes).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// GET of a download URL's path and query, with an optional `Range`.
async fn get(addr: SocketAddr, path: &str, range: Option<&str>) -> (u16, String, Vec<u8>) {
    let range = range.map(|r| format!("Range: {r}\r\n")).unwrap_or_default();
    exchange(addr, &format!("GET {path} HTTP/1.1\r\nHost: api\r\n{range}Connection: close\r\n\r\n"), &[]).await
}

fn path_of(url: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap();
    rest[rest.find('/').unwrap()..].to_owned()
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Creates a task installing stored package `pkg` for `vins`; returns its id.
async fn task_with(api: Api, pkg: &str, version: &str, vins: &[String], rollout: Option<Value>) -> String {
    let mut body = json!({"name": "stored", "version": version, "upgrade_type": "silent", "task_type": "normal",
                          "package_id": pkg, "vins": vins, "created_by": "op-1"});
    if let Some(r) = rollout {
        body["rollout"] = r;
    }
    let created = expect(api, "POST", "/v1/ota/tasks", Some(body), 201).await;
    assert_eq!(created["rejected"], json!([]), "{created}");
    created["id"].as_str().unwrap().to_owned()
}

/// Uploads, checks refusals, then downloads whole, by ranges across chunk borders and resumed
/// at random offsets; returns the notice's URL path.
async fn round_trip(stack: &Stack, svc: &device_svc::DeviceService, data: &[u8], n: u32) -> (String, String) {
    let api = stack.api(svc.addr);
    let digest = sha256_hex(data);
    let pkg = format!("pkg-{n}");
    // A wrong digest stores nothing.
    let (status, body) = upload(stack, svc.addr, &pkg, &format!("version=2.0.0&sha256={}", "0".repeat(64)), data).await;
    assert_eq!((status, body["error"].as_str()), (422, Some("digest_mismatch")), "{body}");
    expect(api, "GET", &format!("/v1/ota/packages/{pkg}"), None, 404).await;
    let (status, stored) = upload(stack, svc.addr, &pkg, &format!("version=2.0.0&sha256={digest}"), data).await;
    assert_eq!(status, 201, "{stored}");
    assert_eq!((stored["state"].as_str(), stored["sha256"].as_str()), (Some("ready"), Some(digest.as_str())));
    // The signature checks with the published key.
    let published = expect(api.anonymous(), "GET", "/v1/ota/signing-key", None, 200).await;
    assert_eq!(published["public_key"], stored["public_key"]);
    let b64 = base64::engine::general_purpose::STANDARD;
    let key: [u8; 32] = b64.decode(stored["public_key"].as_str().unwrap()).unwrap().try_into().unwrap();
    let sig = b64.decode(stored["signature"].as_str().unwrap()).unwrap();
    ed25519_dalek::VerifyingKey::from_bytes(&key)
        .unwrap()
        .verify_strict(&hex::decode(&digest).unwrap(), &ed25519_dalek::Signature::from_slice(&sig).unwrap())
        .unwrap();
    let (status, _) = upload(stack, svc.addr, &pkg, &format!("version=2.0.0&sha256={digest}"), data).await;
    assert_eq!(status, 409, "an id is uploaded once");

    let v = vin(n);
    let token = register_vehicle(api, &v, json!({"sw_version": "1.0.0"})).await;
    let mut car = Car::connect(stack.mqtt_addr(), &v, &token).await;
    let task = task_with(api, &pkg, "2.0.0", std::slice::from_ref(&v), None).await;
    let notice = car.next(DownlinkKind::OtaNotify).await;
    let p = &notice["package"];
    assert_eq!(
        (p["id"].as_str(), p["kind"].as_str(), p["sha256"].as_str()),
        (Some(pkg.as_str()), Some("full"), Some(digest.as_str()))
    );
    assert_eq!((p["size_bytes"].as_u64(), notice["attempt"].as_u64()), (Some(data.len() as u64), Some(1)));
    let path = path_of(p["url"].as_str().unwrap());

    let (status, head, body) = get(svc.addr, &path, None).await;
    assert_eq!(status, 200, "{head}");
    assert!(body == data, "the whole package comes back byte for byte");
    assert_eq!(header(&head, "etag"), Some(format!("\"{digest}\"").as_str()));
    assert_eq!(header(&head, "accept-ranges"), Some("bytes"));
    // Ranges across chunk borders and at the edges.
    let len = data.len();
    let mut ranges =
        vec![(MIB - 10, MIB + 10), (0, 0), (len - 1, len - 1), (MIB, (2 * MIB).min(len) - 1), (0, len - 1)];
    let mut rng = fastrand::Rng::with_seed(u64::from(n));
    ranges.extend((0..8).map(|_| {
        let a = rng.usize(..len);
        (a, rng.usize(a..len))
    }));
    for (a, b) in ranges {
        let (status, head, body) = get(svc.addr, &path, Some(&format!("bytes={a}-{b}"))).await;
        assert_eq!(status, 206, "{a}-{b}: {head}");
        assert_eq!(header(&head, "content-range"), Some(format!("bytes {a}-{b}/{len}").as_str()));
        assert!(body == data[a..=b], "bytes {a}-{b} equal");
    }
    // A download cut at random points and resumed from what it kept.
    let mut kept: Vec<u8> = Vec::new();
    let mut resumes = 0;
    while kept.len() < len {
        let cut = kept.len() + rng.usize(1..=MIB);
        let range = format!("bytes={}-{}", kept.len(), cut.min(len) - 1);
        let (status, _, body) = get(svc.addr, &path, Some(&range)).await;
        assert_eq!(status, 206);
        kept.extend_from_slice(&body);
        resumes += 1;
    }
    assert!(kept == data && resumes > 2, "resumed {resumes} times, byte for byte");
    // Past the end.
    let (status, head, _) = get(svc.addr, &path, Some(&format!("bytes={len}-"))).await;
    assert_eq!((status, header(&head, "content-range")), (416, Some(format!("bytes */{len}").as_str())));
    (path, task)
}

#[tokio::test]
async fn packages_round_trip_on_the_filesystem_refuse_strangers_and_tampering_and_survive_a_key_rotation() {
    let stack = Stack::new().await;
    let dir = fresh_dir("ota-fs");
    let svc = stack.service_with(config(&stack, "svc-1", &format!("k1:{K1}"), "", &dir)).await;
    let api = stack.api(svc.addr);
    let data = random_bytes(2 * MIB + 12_345, 7);
    let (path, task) = round_trip(&stack, &svc, &data, 1).await;

    // Over the limit: refused before a byte is stored.
    let big = vec![0u8; 16 * MIB + 1];
    let (status, body) =
        upload(&stack, svc.addr, "pkg-big", &format!("version=2.0.0&sha256={}", sha256_hex(&big)), &big).await;
    assert_eq!((status, body["error"].as_str()), (413, Some("too_large")), "{body}");

    // Strangers: the URL altered for another vehicle, or signed for a vehicle not in the task.
    let other = path.replace(&vin(1), &vin(2));
    let (status, _, body) = get(svc.addr, &other, None).await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    register_vehicle(api, &vin(2), json!({"sw_version": "1.0.0"})).await;
    let pk = svc.app.ota_packages.clone().unwrap();
    let foreign = device_svc::vehicles::ota::download::url(&svc.app, &pk, "pkg-1", &vin(2), &task);
    let (status, _, body) = get(svc.addr, &path_of(&foreign), None).await;
    assert_eq!(status, 403);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["error"], "not_in_task");
    let metrics = svc.app.metrics.render();
    assert!(metrics.contains("devsvc_ota_download_refusals_total{reason=\"bad_signature\"} 1"), "{metrics}");
    assert!(metrics.contains("devsvc_ota_download_resumes_total"), "resumes counted");

    // Rotation: k2 becomes current; every data key is rewrapped; k1 can go.
    svc.stop().await;
    let both = format!("k1:{K1},k2:{K2}");
    let svc = stack.service_with(config(&stack, "svc-2", &both, "k2", &dir)).await;
    let api = stack.api(svc.addr);
    assert_eq!(expect(api, "POST", "/v1/ota/packages/rewrap", None, 200).await["rewrapped"], 1);
    assert_eq!(expect(api, "POST", "/v1/ota/packages/rewrap", None, 200).await["rewrapped"], 0);
    svc.stop().await;
    // This instance serves one download at a time, at 1 MiB/s.
    let mut c = config(&stack, "svc-3", &format!("k2:{K2}"), "", &dir);
    c.ota.downloads.max_concurrent = 1;
    c.ota.downloads.bytes_per_s = 1 << 20;
    let svc = stack.service_with(c).await;
    let api = stack.api(svc.addr);
    assert_eq!(expect(api, "GET", "/v1/ota/packages/pkg-1", None, 200).await["master_key"], "k2");
    // The URL was signed under k1's derived key: no longer configured, so refused; a fresh one
    // (as a re-sent notice would carry) works, and the bytes are the same.
    assert_eq!(get(svc.addr, &path, None).await.0, 403);
    let pk = svc.app.ota_packages.clone().unwrap();
    let fresh = path_of(&device_svc::vehicles::ota::download::url(&svc.app, &pk, "pkg-1", &vin(1), &task));
    let first = tokio::spawn({
        let fresh = fresh.clone();
        let addr = svc.addr;
        async move { get(addr, &fresh, None).await }
    });
    let pk = svc.app.ota_packages.clone().unwrap();
    wait_until("a download being served", WAIT, || async { (pk.downloads.available_permits() == 0).then_some(()) })
        .await;
    // The one slot is taken (the first download is held to the bandwidth): the next waits.
    let (status, head, _) = get(svc.addr, &fresh, Some("bytes=0-9")).await;
    assert_eq!((status, header(&head, "retry-after")), (503, Some("5")), "{head}");
    let (status, _, body) = first.await.unwrap();
    assert!(status == 200 && body == data, "after the rotation the package reads the same");
    assert!(svc.app.metrics.render().contains("devsvc_ota_download_refusals_total{reason=\"busy\"} 1"));

    // Tampering with the stored ciphertext: the chunk does not authenticate.
    let object = stack
        .pg()
        .await
        .query_one("SELECT object FROM ota_packages WHERE id = 'pkg-1'", &[])
        .await
        .unwrap()
        .get::<_, String>(0);
    let file = dir.join(object);
    let mut sealed = std::fs::read(&file).unwrap();
    sealed[MIB + 100] ^= 1; // in the second chunk
    std::fs::write(&file, &sealed).unwrap();
    let (status, _, body) = get(svc.addr, &fresh, Some("bytes=0-99")).await;
    assert!(status == 206 && body == data[..100], "the first chunk is intact");
    let (status, _, body) = get(svc.addr, &fresh, Some(&format!("bytes={}-{}", MIB + 50, MIB + 60))).await;
    assert_eq!(status, 500);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["error"], "package_corrupt");
    // The whole package breaks off before the tampered chunk's bytes: never a whole body.
    let (status, _, body) = get(svc.addr, &fresh, None).await;
    assert!(status == 200 && body.len() < data.len(), "a tampered download is cut short");
    assert!(svc.app.metrics.render().contains("devsvc_ota_download_refusals_total{reason=\"tampered\"}"));
    svc.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A private `moto` S3 server (PyPI `moto[server]`, installed by scripts/test), stopped on drop.
struct Moto(std::process::Child, u16);

impl Moto {
    async fn start() -> Self {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = std::process::Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 with moto[server] (scripts/test installs it)");
        let moto = Moto(child, port);
        wait_until("moto answers", WAIT, || async { TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ()) })
            .await;
        moto
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn packages_round_trip_on_an_s3_compatible_store_and_deltas_go_to_their_version() {
    let moto = Moto::start().await;
    // moto accepts any credentials; the bucket is made with a plain request.
    let addr: SocketAddr = format!("127.0.0.1:{}", moto.1).parse().unwrap();
    let (status, head, _) =
        exchange(addr, "PUT /ota HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", &[])
            .await;
    assert_eq!(status, 200, "{head}");
    let stack = Stack::new().await;
    let dir = fresh_dir("ota-s3-unused");
    let mut c = config(&stack, "svc-s3", &format!("k1:{K1}"), "", &dir);
    c.ota.packages.storage = "s3".into();
    c.ota.packages.s3_bucket = "ota".into();
    c.ota.packages.s3_endpoint = format!("http://{addr}");
    c.ota.packages.s3_allow_http = true;
    c.ota.packages.s3_access_key_id = "test".into();
    c.ota.packages.s3_secret_access_key = device_svc::secret::SecretText("test".into());
    let svc = stack.service_with(c).await;
    let api = stack.api(svc.addr);
    let data = random_bytes(MIB + 777, 11);
    round_trip(&stack, &svc, &data, 3).await;
    assert!(std::fs::read_dir(&dir).unwrap().next().is_none(), "nothing written to the directory");

    // Deltas: a vehicle at 1.5.0 gets the delta from 1.5.0, one at 1.2.0 the full package.
    let full = random_bytes(200_000, 12);
    let delta = random_bytes(30_000, 13);
    let q = |sha: &str| format!("version=3.0.0&sha256={sha}");
    assert_eq!(upload(&stack, svc.addr, "full-3", &q(&sha256_hex(&full)), &full).await.0, 201);
    let dq = format!("{}&kind=delta&from_version=1.5.0", q(&sha256_hex(&delta)));
    assert_eq!(upload(&stack, svc.addr, "delta-3", &dq, &delta).await.0, 201);
    let (status, body) = upload(&stack, svc.addr, "delta-3b", &dq, &delta).await;
    assert_eq!((status, body["error"].as_str()), (409, Some("delta_exists")), "{body}");
    // A delta is not something a task installs for everyone.
    let bad = json!({"name": "x", "version": "3.0.0", "upgrade_type": "silent", "task_type": "normal",
                     "package_id": "delta-3", "vins": [vin(4)]});
    assert_eq!(expect(api, "POST", "/v1/ota/tasks", Some(bad), 400).await["field"], "package_id");
    let (a, b) = (vin(4), vin(5));
    let ta = register_vehicle(api, &a, json!({"sw_version": "1.5.0"})).await;
    let tb = register_vehicle(api, &b, json!({"sw_version": "1.2.0"})).await;
    let mut car_a = Car::connect(stack.mqtt_addr(), &a, &ta).await;
    let mut car_b = Car::connect(stack.mqtt_addr(), &b, &tb).await;
    task_with(api, "full-3", "3.0.0", &[a.clone(), b.clone()], None).await;
    let na = car_a.next(DownlinkKind::OtaNotify).await;
    let nb = car_b.next(DownlinkKind::OtaNotify).await;
    assert_eq!(
        (na["package"]["kind"].as_str(), na["package"]["from_version"].as_str()),
        (Some("delta"), Some("1.5.0"))
    );
    assert_eq!((nb["package"]["kind"].as_str(), nb["package"]["id"].as_str()), (Some("full"), Some("full-3")));
    let (status, _, body) = get(svc.addr, &path_of(na["package"]["url"].as_str().unwrap()), None).await;
    assert!(status == 200 && body == delta, "the delta downloads");
    let (status, _, body) = get(svc.addr, &path_of(nb["package"]["url"].as_str().unwrap()), None).await;
    assert!(status == 200 && body == full, "the full package downloads");
    // A's URL does not fetch B's package.
    let crossed = path_of(na["package"]["url"].as_str().unwrap()).replace("delta-3", "full-3");
    assert_eq!(get(svc.addr, &crossed, None).await.0, 403);
    svc.stop().await;
    drop(moto);
    let _ = std::fs::remove_dir_all(&dir);
}
