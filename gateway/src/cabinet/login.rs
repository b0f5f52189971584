//! The cabinet login (SPEC.md 1.9): the first frame must be a `LOGIN` arriving within the
//! login deadline, whose tag verifies against the device's secret and whose clock is close to
//! ours. Then the device is claimed in the connection map and the previous session, here or on
//! another node, is told to end.

use std::sync::Arc;

use protocol::bus::{DeviceKey, UpEvent};
use protocol::cabinet::{self, ErrorCode, Frame, LoginResult, LoginStatus, Message};
use tokio::time::Instant;

use super::{PROTOCOL, error, error_frame, queue};
use crate::clock::now_ms;
use crate::context::{Ctx, SessionRefused};
use crate::credentials::Lookup;
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

/// Runs the login. On success the `LOGIN_RESULT` is queued (not yet flushed) and the session
/// is registered; on failure the refusal is queued and `None` returned.
pub(super) async fn login(conn: &mut Conn, ctx: &Ctx) -> Option<LoggedIn> {
    let deadline = Instant::now() + ctx.config.login_timeout();
    let frame = loop {
        match cabinet::decode(conn.read_buf(), PRELOGIN_MAX_PAYLOAD) {
            Ok(Some(frame)) => break frame,
            Ok(None) => {}
            Err(e) => {
                // Before a login nothing is worth keeping the connection for.
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
            Ok(Ok(Event::Read(n))) => ctx.metrics.bytes_in.with_label_values(&[PROTOCOL]).inc_by(n as u64),
        }
    };
    ctx.metrics.frames_in.with_label_values(&[PROTOCOL, frame.message.message_type().label()]).inc();
    let seq = frame.seq;
    let Message::Login(login) = frame.message else {
        count(ctx, "not_logged_in");
        ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, "not_logged_in"]).inc();
        queue(conn, ctx, &error(seq, ErrorCode::NotLoggedIn, "send LOGIN first"));
        return None;
    };
    tracing::Span::current().record("device_id", login.device_id().as_str());
    let device = DeviceKey::Cabinet(login.device_id().clone());

    let now = now_ms();
    let refuse = |conn: &mut Conn, status: LoginStatus, result: &str| {
        count(ctx, result);
        let retry_after_s =
            if matches!(status, LoginStatus::Busy | LoginStatus::Unavailable) { RETRY_AFTER_S } else { 0 };
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
        refuse(conn, LoginStatus::ClockSkew, "clock_skew");
        return None;
    }
    let credential = match ctx.credentials.lookup(&device).await {
        Lookup::Found(c) => c,
        Lookup::Unknown => {
            refuse(conn, LoginStatus::UnknownDevice, "unknown_device");
            return None;
        }
        Lookup::Unavailable => {
            refuse(conn, LoginStatus::Unavailable, "unavailable");
            return None;
        }
    };
    if !login.verify(credential.cabinet_secret()) {
        refuse(conn, LoginStatus::BadTag, "bad_tag");
        return None;
    }
    if !credential.enabled {
        refuse(conn, LoginStatus::Disabled, "disabled");
        return None;
    }

    let (handle, epoch) = match ctx.open_session(PROTOCOL, &device, ctx.config.cabinet.command_queue_len).await {
        Ok(opened) => opened,
        Err(SessionRefused::Unavailable) => {
            refuse(conn, LoginStatus::Unavailable, "unavailable");
            return None;
        }
        Err(SessionRefused::Superseded) => {
            refuse(conn, LoginStatus::Busy, "superseded");
            return None;
        }
    };

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
    tracing::info!(epoch, "cabinet logged in");
    Some(LoggedIn { handle })
}
