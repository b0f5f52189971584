//! A vehicle's package download as a head unit on a weak cellular link does it: HTTP/1.1 over
//! plain TCP (loopback only, like every target of the harness), broken off at random points,
//! resumed with `Range` from the last byte kept, hashed as it arrives (nothing is kept but the
//! digest, so memory stays flat whatever the size), then checked: the SHA-256 against the
//! notice's, the Ed25519 signature of the digest against the notice's public key.

use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine as _;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How a download behaves.
#[derive(Debug, Clone, Copy)]
pub struct Cuts {
    /// Probability that a request is broken off at a random point of what it would carry.
    pub probability: f64,
    /// Requests a download may make before it gives up.
    pub max_requests: u32,
}

/// What a finished download saw.
#[derive(Debug, Clone)]
pub struct Downloaded {
    /// SHA-256 of the bytes, hex.
    pub sha256: String,
    /// Bytes received in all.
    pub bytes: u64,
    /// Requests made after the first (resumes).
    pub resumes: u32,
}

/// Why a download failed, as a vehicle reports it (`error` of `ota_status` `failed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The server refused (403: the URL does not grant it).
    Refused(u16),
    /// Too many broken requests.
    GaveUp(String),
}

struct Head {
    status: u16,
    content_length: u64,
    range_start: Option<u64>,
    retry_after: Option<u64>,
}

async fn read_head(stream: &mut TcpStream) -> anyhow::Result<(Head, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed before the head");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 16 * 1024 {
            bail!("head over 16 KiB");
        }
    };
    let text = std::str::from_utf8(&buf[..end]).context("head not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).context("no status")?;
    let mut head = Head { status, content_length: 0, range_start: None, retry_after: None };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => head.content_length = value.parse().unwrap_or(0),
            "content-range" => {
                head.range_start = value.strip_prefix("bytes ").and_then(|r| r.split('-').next()?.parse().ok());
            }
            "retry-after" => head.retry_after = value.parse().ok(),
            _ => {}
        }
    }
    Ok((head, buf[end..].to_vec()))
}

/// Splits `http://host:port/path?query`.
fn split(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url.strip_prefix("http://").context("only http:// URLs (loopback)")?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    Ok((host.to_owned(), if path.is_empty() { "/".into() } else { path.to_owned() }))
}

/// Downloads `url` (`size` bytes), breaking requests off as `cuts` says and resuming them;
/// `progress` is called with the bytes kept so far after every piece.
///
/// # Errors
/// A refusal, or more broken requests than `cuts.max_requests`.
pub async fn fetch(url: &str, size: u64, cuts: Cuts, mut progress: impl FnMut(u64)) -> Result<Downloaded, Failure> {
    let (host, path) = split(url).map_err(|e| Failure::GaveUp(e.to_string()))?;
    let mut hasher = Sha256::new();
    let (mut have, mut requests, mut last_error) = (0u64, 0u32, String::new());
    let mut buf = vec![0u8; 256 * 1024];
    while have < size || (size == 0 && requests == 0) {
        if requests >= cuts.max_requests {
            return Err(Failure::GaveUp(format!("{requests} requests, last: {last_error}")));
        }
        requests += 1;
        let attempt = async {
            let mut stream = TcpStream::connect(&host).await?;
            let range = if have > 0 { format!("Range: bytes={have}-\r\n") } else { String::new() };
            let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{range}Connection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await?;
            let (head, first) = read_head(&mut stream).await?;
            anyhow::Ok((stream, head, first))
        };
        let (mut stream, head, first) = match tokio::time::timeout(Duration::from_secs(30), attempt).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                last_error = e.to_string();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(_) => {
                last_error = "no answer in 30 s".into();
                continue;
            }
        };
        match head.status {
            200 => {
                // The whole package again (a server that ignored the range): start over.
                hasher = Sha256::new();
                have = 0;
            }
            206 if head.range_start == Some(have) => {}
            503 => {
                last_error = "busy".into();
                tokio::time::sleep(Duration::from_secs(head.retry_after.unwrap_or(1).min(10))).await;
                continue;
            }
            s @ (401 | 403 | 404) => return Err(Failure::Refused(s)),
            s => {
                last_error = format!("status {s}");
                continue;
            }
        }
        // Where this request is broken off, if it is.
        let cut_after = (fastrand::f64() < cuts.probability).then(|| fastrand::u64(0..head.content_length.max(1)));
        let mut got = 0u64;
        let mut going = take(&first, cut_after, head.content_length, &mut got, &mut hasher);
        while going && got < head.content_length {
            match tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) | Err(_) => break,
                Ok(Ok(n)) => {
                    going = take(&buf[..n], cut_after, head.content_length, &mut got, &mut hasher);
                    progress(have + got);
                }
            }
        }
        have += got;
        progress(have);
        if have < size {
            last_error = if cut_after.is_some() { "cut".into() } else { "short read".into() };
        }
    }
    Ok(Downloaded { sha256: hex::encode(hasher.finalize()), bytes: have, resumes: requests - 1 })
}

/// Hashes what of `bytes` this request keeps (up to the cut, if any, and the body's length);
/// returns whether to read on.
fn take(bytes: &[u8], cut_after: Option<u64>, length: u64, got: &mut u64, hasher: &mut Sha256) -> bool {
    let room = cut_after.map_or(u64::MAX, |c| c.saturating_sub(*got));
    let n = (bytes.len() as u64).min(room).min(length - *got);
    hasher.update(&bytes[..usize::try_from(n).unwrap_or(0)]);
    *got += n;
    cut_after.is_none() || room > n
}

/// Whether `signature` (base64) is the Ed25519 signature of the digest `sha256` (hex) under
/// `public_key` (base64).
pub fn signature_ok(sha256: &str, signature: &str, public_key: &str) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    let (Ok(digest), Ok(sig), Ok(key)) = (hex::decode(sha256), b64.decode(signature), b64.decode(public_key)) else {
        return false;
    };
    let (Ok(key), Ok(sig)) = (<[u8; 32]>::try_from(key.as_slice()), ed25519_dalek::Signature::from_slice(&sig)) else {
        return false;
    };
    let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&key) else { return false };
    key.verify_strict(&digest, &sig).is_ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::SocketAddr;

    use tokio::net::TcpListener;

    use super::*;

    /// A minimal server of `data` honouring `Range: bytes=N-` (what the vehicle sends).
    async fn serve(data: Vec<u8>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let data = data.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && s.read_exact(&mut b).await.is_ok() {
                        head.push(b[0]);
                    }
                    let head = String::from_utf8_lossy(&head).to_string();
                    let from: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Range: bytes="))
                        .and_then(|r| r.trim_end_matches('-').parse().ok())
                        .unwrap_or(0);
                    let (status, range) = if from > 0 {
                        (
                            "206 Partial Content",
                            format!("Content-Range: bytes {from}-{}/{}\r\n", data.len() - 1, data.len()),
                        )
                    } else {
                        ("200 OK", String::new())
                    };
                    let answer = format!("HTTP/1.1 {status}\r\n{range}Content-Length: {}\r\n\r\n", data.len() - from);
                    let _ = s.write_all(answer.as_bytes()).await;
                    let _ = s.write_all(&data[from..]).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_cut_download_resumes_to_the_same_digest_and_a_tampered_one_is_caught() {
        // Where requests are cut is random; seeded (this thread's generator: the test runs on
        // one), so that the run is the same every time. Unseeded, one run in ten cut nothing.
        fastrand::seed(1);
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let digest = hex::encode(Sha256::digest(&data));
        let addr = serve(data.clone()).await;
        let url = format!("http://{addr}/pkg");
        let cuts = Cuts { probability: 0.9, max_requests: 500 };
        let got = fetch(&url, data.len() as u64, cuts, |_| {}).await.unwrap();
        assert_eq!((got.sha256.as_str(), got.bytes), (digest.as_str(), data.len() as u64));
        assert!(got.resumes > 0, "cut and resumed");

        // Signed by the platform: the vehicle's check passes; on other bytes it fails.
        let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
        let b64 = base64::engine::general_purpose::STANDARD;
        let raw = hex::decode(&digest).unwrap();
        let signature = b64.encode(ed25519_dalek::Signer::sign(&key, &raw).to_bytes());
        let public = b64.encode(key.verifying_key().to_bytes());
        assert!(signature_ok(&got.sha256, &signature, &public));
        let mut tampered = data.clone();
        tampered[1_500_000] ^= 0x40;
        let bad = serve(tampered).await;
        let got = fetch(&format!("http://{bad}/pkg"), data.len() as u64, cuts, |_| {}).await.unwrap();
        assert_ne!(got.sha256, digest, "the vehicle sees the bytes are not the package");
        assert!(!signature_ok(&got.sha256, &signature, &public), "and the signature does not cover them");
        // Nobody answering: given up after the allowed requests, not retried forever.
        let few = Cuts { probability: 0.0, max_requests: 3 };
        let closed = fetch("http://127.0.0.1:9/none", 10, few, |_| {}).await.map(|_| ());
        assert!(matches!(closed, Err(Failure::GaveUp(_))), "{closed:?}");
    }
}
