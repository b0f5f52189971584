//! MQTT test clients (rumqttc) share this: the client's event loop runs in a task of its own and
//! hands every event to the test through a channel, so a test awaits the packet it expects.

use rumqttc::{Event, EventLoop};
use tokio::sync::mpsc;

/// What the event loop saw: events, then its error (as text) when the connection ends.
pub type Events = mpsc::UnboundedReceiver<Result<Event, String>>;

/// Polls `eventloop` in a task until the connection ends or the receiver is dropped.
pub fn forward(mut eventloop: EventLoop) -> Events {
    let (tx, events) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let e = eventloop.poll().await.map_err(|e| e.to_string());
            let end = e.is_err();
            if tx.send(e).is_err() || end {
                return;
            }
        }
    });
    events
}
