//! Cabinet connections (SPEC.md part 1): the login handshake ([`login`]) and the session that
//! follows ([`session`]).

mod login;
mod session;

use std::sync::Arc;
use std::time::Duration;

use protocol::cabinet::{self, ErrorCode, ErrorMessage, Frame, FrameError, Message, MessageError};

use crate::context::Ctx;
use crate::server::ConnGuard;
use crate::transport::Conn;

/// The `protocol` metric label of everything here.
pub(crate) const PROTOCOL: &str = "cabinet";

/// Serves one cabinet connection from its first byte to its close.
pub async fn serve(mut conn: Conn, ctx: Arc<Ctx>, _guard: ConnGuard) {
    // Boxed: the login's futures (Redis calls) are large and needed once; the session loop that
    // lives for days should not carry their size.
    let Some(login) = Box::pin(login::login(&mut conn, &ctx)).await else {
        let _ = conn.flush(Duration::from_millis(ctx.config.cabinet.write_timeout_ms)).await;
        conn.close().await;
        return;
    };
    let mut live = session::Live::new(login);
    session::run(&mut conn, &ctx, &mut live).await;
}

/// Encodes `frame` into the connection's write buffer and counts it.
pub(crate) fn queue(conn: &mut Conn, ctx: &Ctx, frame: &Frame) {
    match cabinet::encode(frame, conn.write_buf()) {
        Ok(()) => {
            ctx.metrics.cabinet.frame_out(frame.message.message_type().label());
        }
        Err(e) => tracing::error!(error = %e, "failed to encode frame to cabinet"),
    }
}

/// The `ERROR` frame answering a rejected frame (SPEC.md 1.7, `ERROR`).
pub(crate) fn error_frame(err: &FrameError) -> Frame {
    let code = match err {
        FrameError::BadMagic(_) => ErrorCode::BadMagic,
        FrameError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
        FrameError::TooLarge { .. } => ErrorCode::TooLarge,
        FrameError::BadChecksum { .. } => ErrorCode::BadChecksum,
        FrameError::Invalid { reason: MessageError::UnknownType(_), .. } => ErrorCode::UnknownType,
        FrameError::Invalid { .. } => ErrorCode::Malformed,
    };
    let seq = err.seq();
    let detail = match err {
        FrameError::UnsupportedVersion(_) => format!("supported versions: {}", cabinet::frame::VERSION),
        other => other.to_string(),
    };
    let detail = truncate(detail, cabinet::TEXT_MAX_LEN);
    Frame::new(seq, Message::Error(ErrorMessage { code, detail }))
}

/// A plain `ERROR` frame.
pub(crate) fn error(seq: u32, code: ErrorCode, detail: &str) -> Frame {
    Frame::new(seq, Message::Error(ErrorMessage { code, detail: detail.to_owned() }))
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}
