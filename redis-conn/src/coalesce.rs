//! Redis calls of many tasks leaving in one write.
//!
//! A gateway's logins each make a few small Redis calls (credentials, the map claim, the
//! release). Made from each session's own task, every call is a write of its own: the
//! multiplexed connection's writer task runs as soon as one task has queued a request (the
//! runtime runs a task just woken before the others), so a thousand logins a second cost a
//! thousand writes, and as many wake-ups of Redis and of the gateway. Where Redis shares the
//! gateway's core, each of those is also a switch between the two processes.
//!
//! [`Coalesced`] hands each call to one funnel task instead. The funnel takes what has been
//! queued, lets every other runnable task queue its calls first (one `yield_now`), then polls
//! them all together, so they reach the connection's writer together and leave in one write;
//! their replies come back in one read. Nothing waits for a timer: with nobody else runnable
//! the funnel goes on at once. Each call is still its own request: nothing about its
//! atomicity, its Redis Cluster routing or its errors changes.

use std::future::Future;
use std::pin::Pin;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use redis::aio::ConnectionLike;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use tokio::sync::{mpsc, oneshot};

use crate::RedisConn;

/// Calls waiting for the funnel at most; a caller past this waits to hand its call over.
const QUEUE: usize = 1024;
/// Calls the funnel has in progress at most; past this it takes no new ones until some end.
const IN_PROGRESS_MAX: usize = 4096;

/// One call, with where its reply goes.
type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A connection whose calls go out through a funnel task shared by its clones (see the module
/// documentation). Cheap to clone.
#[derive(Clone)]
pub struct Coalesced {
    inner: RedisConn,
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Coalesced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalesced").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl Coalesced {
    /// Wraps `inner` and starts the funnel task on the current Tokio runtime. The task ends
    /// once every clone is dropped and the calls in progress are answered.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn new(inner: RedisConn) -> Self {
        let (jobs, rx) = mpsc::channel(QUEUE);
        tokio::spawn(funnel(rx));
        Self { inner, jobs }
    }

    /// Runs `call` on the funnel and returns its result. If the funnel is gone, runs it here.
    async fn through_funnel<T: Send + 'static>(
        &self,
        call: impl Future<Output = RedisResult<T>> + Send + 'static,
    ) -> RedisResult<T> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::pin(async move {
            let _ = reply.send(call.await);
        });
        if let Err(mpsc::error::SendError(job)) = self.jobs.send(job).await {
            job.await;
        }
        // Dropped unanswered: the funnel task ended under it (its runtime is shutting down).
        answer.await.unwrap_or_else(|_| Err(std::io::Error::other("the Redis call funnel stopped").into()))
    }
}

/// Takes calls and polls them together: see the module documentation.
async fn funnel(mut rx: mpsc::Receiver<Job>) {
    let mut running: FuturesUnordered<Job> = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            Some(()) = running.next(), if !running.is_empty() => {}
            job = rx.recv(), if running.len() < IN_PROGRESS_MAX => match job {
                Some(job) => {
                    running.push(job);
                    // Every task that is ready to run queues its calls before these go out.
                    tokio::task::yield_now().await;
                    while running.len() < IN_PROGRESS_MAX {
                        let Ok(job) = rx.try_recv() else { break };
                        running.push(job);
                    }
                }
                None => break,
            },
        }
    }
    while running.next().await.is_some() {}
}

impl ConnectionLike for Coalesced {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let cmd = cmd.clone();
        let mut inner = self.inner.clone();
        Box::pin(self.through_funnel(async move { inner.req_packed_command(&cmd).await }))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let pipeline = pipeline.clone();
        let mut inner = self.inner.clone();
        Box::pin(self.through_funnel(async move { inner.req_packed_commands(&pipeline, offset, count).await }))
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

impl Coalesced {
    /// The connection the funnel sends through, for calls that are batches already.
    pub(crate) fn inner(&self) -> &RedisConn {
        &self.inner
    }
}
