//! The cabinet login (SPEC.md 1.7, 1.9): within the login deadline, an optional `HELLO`
//! answered by a `CHALLENGE` (login version 2), then a `LOGIN` whose tag verifies against the
//! device's secret, covers this connection's nonce (version 2) and whose clock is close to ours.
//! Then the connection map admits it (no replayed version-1 time, no downgrade, no flapping) and
//! claims the device, and the previous session, here or on another node, is told to end.

use std::sync::Arc;
use std::time::Duration;

use protocol::bus::{DeviceKey, UpEvent};
use protocol::cabinet::{
    self, Challenge, ErrorCode, Frame, Hello, LOGIN_V2, LoginResult, LoginStatus, Message, NONCE_LEN,
};
use tokio::time::Instant;

use super::{PROTOCOL, error, error_frame, queue};
use crate::clock::now_ms;
use crate::context::{Ctx, SessionRefused};
use crate::credentials::Lookup;
use crate::registry::{ClaimRefusal, LoginFacts};
use crate::session::EndReason;
use crate::session::SessionHandle;
use crate::transport::{Conn, Event};

/// Largest payload accepted before a successful login: a `LOGIN` is under 200 bytes, and an
/// unauthenticated peer must not make us buffer 4 KiB.
const PRELOGIN_MAX_PAYLOAD: usize = 256;

/// Seconds a cabinet is told to wait after `Busy` or `Unavailable`.
const RETRY_AFTER_S: u16 = 5;

/// A logged-in cabinet.
#[derive(Debug)]
pub(super) struct LoggedIn {
    pub(super) handle: Arc<SessionHandle>,
}

fn count(ctx: &Ctx, result: &str) {
    ctx.metrics.logins.with_label_values(&[PROTOCOL, result]).inc();
}

/// Reads the next frame before the login completes, within `deadline`. Any framing or message
/// error closes the connection (SPEC.md 1.8: before login nothing is worth keeping it for); the
/// `ERROR` is queued here.
async fn read_prelogin(conn: &mut Conn, ctx: &Ctx, deadline: Instant) -> Option<Frame> {
    loop {
        match cabinet::decode(conn.read_buf(), PRELOGIN_MAX_PAYLOAD) {
            Ok(Some(frame)) => {
                ctx.metrics.cabinet.frame_in(frame.message.message_type().label());
                return Some(frame);
            }
            Ok(None) => {}
            Err(e) => {
                ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, e.label()]).inc();
                count(ctx, "protocol_error");
                tracing::debug!(error = %e, "login frame rejected");
                queue(conn, ctx, &error_frame(&e));
                return None;
            }
        }
        match tokio::time::timeout_at(deadline, conn.wait(false)).await {
            Err(_) => {
                count(ctx, "timeout");
                tracing::debug!("no login before the deadline");
                return None;
            }
            Ok(Ok(Event::Read(0) | Event::Writable)) | Ok(Err(_)) => {
                count(ctx, "peer_closed");
                return None;
            }
            Ok(Ok(Event::Read(n))) => ctx.metrics.cabinet.bytes_in(n),
        }
    }
}

/// Answers `HELLO` with a `CHALLENGE` (login version 2) and sends it at once: the cabinet waits
/// for it before it signs its `LOGIN`. Returns the nonce, or `None` when the connection must close.
async fn challenge(conn: &mut Conn, ctx: &Ctx, seq: u32, hello: Hello) -> Option<[u8; NONCE_LEN]> {
    if hello.login_version < LOGIN_V2 {
        count(ctx, "protocol_error");
        ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, "out_of_range"]).inc();
        queue(conn, ctx, &error(seq, ErrorCode::Malformed, "HELLO login_version must be 2 or more"));
        return None;
    }
    let mut nonce = [0u8; NONCE_LEN];
    if let Err(e) = getrandom::fill(&mut nonce) {
        tracing::error!(error = %e, "failed to draw a login challenge");
        return None;
    }
    let answer = Challenge { login_version: LOGIN_V2, nonce, server_time_ms: now_ms() };
    queue(conn, ctx, &Frame::new(seq, Message::Challenge(answer)));
    match conn.flush(Duration::from_millis(ctx.config.cabinet.write_timeout_ms)).await {
        Ok(n) => ctx.metrics.cabinet.bytes_out(n),
        Err(_) => return None,
    }
    Some(nonce)
}

/// Runs the login (SPEC.md 1.7 and 1.9). On success the `LOGIN_RESULT` is queued (not yet
/// flushed) and the session is registered; on failure the refusal is queued and `None` returned.
/// Bytes the cabinet sent behind its `LOGIN` stay in the read buffer for the session.
pub(super) async fn login(conn: &mut Conn, ctx: &Ctx) -> Option<LoggedIn> {
    let deadline = Instant::now() + ctx.config.login_timeout();
    let mut frame = read_prelogin(conn, ctx, deadline).await?;
    let mut nonce = None;
    if let Message::Hello(hello) = frame.message {
        nonce = Some(challenge(conn, ctx, frame.seq, hello).await?);
        frame = read_prelogin(conn, ctx, deadline).await?;
    }
    let seq = frame.seq;
    let login = match frame.message {
        Message::Login(login) => login,
        Message::Hello(_) => {
            count(ctx, "protocol_error");
            ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, "unexpected"]).inc();
            queue(conn, ctx, &error(seq, ErrorCode::Unexpected, "HELLO sent twice"));
            return None;
        }
        _ => {
            count(ctx, "not_logged_in");
            ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, "not_logged_in"]).inc();
            queue(conn, ctx, &error(seq, ErrorCode::NotLoggedIn, "send LOGIN first"));
            return None;
        }
    };
    tracing::Span::current().record("device_id", login.device_id().as_str());
    let device = DeviceKey::Cabinet(login.device_id().clone());

    let now = now_ms();
    let refuse = |conn: &mut Conn, status: LoginStatus, result: &str, retry_after_s: u16| {
        count(ctx, result);
        let answer = LoginResult {
            status,
            server_time_ms: now_ms(),
            heartbeat_interval_s: ctx.config.cabinet.heartbeat_interval_s,
            retry_after_s,
        };
        queue(conn, ctx, &Frame::new(seq, Message::LoginResult(answer)));
        tracing::info!(result, "login refused");
    };

    if login.device_time_ms().abs_diff(now) > ctx.config.cabinet.max_clock_skew_s * 1000 {
        refuse(conn, LoginStatus::ClockSkew, "clock_skew", 0);
        return None;
    }
    let changes = ctx.credentials.changes();
    let credential = match ctx.credentials.lookup(&device).await {
        Lookup::Found(c) => c,
        Lookup::Unknown => {
            refuse(conn, LoginStatus::UnknownDevice, "unknown_device", 0);
            return None;
        }
        Lookup::Unavailable => {
            refuse(conn, LoginStatus::Unavailable, "unavailable", RETRY_AFTER_S);
            return None;
        }
    };
    if !login.verify(credential.cabinet_secret()) {
        refuse(conn, LoginStatus::BadTag, "bad_tag", 0);
        return None;
    }
    // The tag is genuine; whether it was made for this connection is the nonce's to say. A
    // version-2 login without our challenge, or with another connection's, is a recording.
    if login.nonce() != nonce.as_ref() {
        let status =
            if nonce.is_some() && login.nonce().is_none() { LoginStatus::LoginVersion } else { LoginStatus::Replayed };
        let result = if status == LoginStatus::Replayed { "replayed" } else { "login_version" };
        refuse(conn, status, result, 0);
        return None;
    }
    if login.version() < ctx.config.cabinet.min_login_version {
        refuse(conn, LoginStatus::LoginVersion, "login_version", 0);
        return None;
    }
    if !credential.enabled {
        refuse(conn, LoginStatus::Disabled, "disabled", 0);
        return None;
    }

    let facts = LoginFacts { device_time_ms: Some(login.device_time_ms()), version: login.version() };
    let (handle, epoch) = match ctx.open_session(PROTOCOL, &device, ctx.config.cabinet.command_queue_len, facts).await {
        Ok(opened) => opened,
        Err(refused) => {
            let (status, retry_after_s) = match refused {
                SessionRefused::Unavailable => (LoginStatus::Unavailable, RETRY_AFTER_S),
                SessionRefused::Superseded => (LoginStatus::Busy, RETRY_AFTER_S),
                SessionRefused::Refused(ClaimRefusal::Replayed) => (LoginStatus::Replayed, 0),
                SessionRefused::Refused(ClaimRefusal::Downgrade) => (LoginStatus::LoginVersion, 0),
                SessionRefused::Refused(ClaimRefusal::Flapping { retry_after, .. }) => {
                    (LoginStatus::Busy, u16::try_from(retry_after.as_secs().max(1)).unwrap_or(u16::MAX))
                }
            };
            refuse(conn, status, refused.label(), retry_after_s);
            return None;
        }
    };

    if !ctx.credentials.still_valid(&device, changes, &credential).await {
        // Rotated or disabled while this login was being checked: the session ends at once.
        handle.end(EndReason::Revoked);
    }
    count(ctx, "accepted");
    let answer = LoginResult {
        status: LoginStatus::Accepted,
        server_time_ms: now_ms(),
        heartbeat_interval_s: ctx.config.cabinet.heartbeat_interval_s,
        retry_after_s: 0,
    };
    queue(conn, ctx, &Frame::new(seq, Message::LoginResult(answer)));
    ctx.upstream
        .send(&UpEvent::SessionOpened {
            device,
            epoch,
            node: ctx.node().to_owned(),
            at_ms: now_ms(),
            info: login.firmware_version().to_owned(),
        })
        .await;
    tracing::info!(epoch, login_version = login.version(), "cabinet logged in");
    Some(LoggedIn { handle })
}
