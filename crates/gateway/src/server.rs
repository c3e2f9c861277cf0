//! The HTTP/1 server loop of the merchant API, with bounds on slow clients
//! (issue 15 point 5).
//!
//! `axum::serve` (axum 0.8) builds its hyper connection without a timer and
//! exposes no builder, so a client that never finishes its request headers,
//! or an idle keep-alive connection, holds a connection and a task for ever.
//! This loop serves the same `Router` with hyper's HTTP/1 connection builder
//! and a per-connection [`Timer`] that enforces two bounds:
//!
//! - **header read**: a request's line and headers must be complete within
//!   `header_read_timeout`, counted from the connection's accept for its
//!   first request and from the first byte of each later one (a client that
//!   trickles a byte at a time is cut all the same);
//! - **idle**: a kept-alive connection may wait at most `idle_timeout` after
//!   an answer for the first byte of its next request. Keep it above the
//!   idle timeout of a load balancer in front (60 s on many), so the
//!   balancer, not paygate, closes idle connections.
//!
//! hyper arms its header-read timer each time it starts waiting for a
//! request head (right after accept, and after every answer on a kept-alive
//! connection); the [`ConnTimer`] turns that one timer into the two bounds
//! by watching when the connection's bytes arrive. A cut connection counts
//! in `paygate_inbound_connections_cut_total{reason}`. The body and the
//! handler's time are bounded by the inbound timeouts of the router, not
//! here.
//!
//! Graceful shutdown: when `signal` completes the listener closes, idle
//! connections are closed, and connections with a request in flight close
//! after their answer; the future ends when every connection has. Dropping
//! the future aborts every connection task.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::Router;
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

/// The slow-client bounds of one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Time to read a request's line and headers.
    pub header_read_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
}

/// Serves `router` on `listener` until `signal`, then drains (see the
/// module's doc).
///
/// # Errors
/// None today (accept errors are logged and retried); the `Result` keeps
/// the shape of `axum::serve`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    signal: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(connection(stream, router.clone(), limits, closing.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = closing_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Serves one connection until it closes, is cut, or shutdown drains it.
async fn connection(
    stream: TcpStream,
    router: Router,
    limits: ConnLimits,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    let clock = Arc::new(ConnClock::default());
    let io = TokioIo::new(Watched {
        inner: stream,
        clock: clock.clone(),
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(ConnTimer { clock, limits })
        .header_read_timeout(limits.header_read_timeout);
    let conn = builder.serve_connection(io, TowerToHyperService::new(router));
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            changed = closing.wait_for(|c| *c), if !draining => {
                draining = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// What a connection's [`ConnTimer`] needs to know of its bytes.
#[derive(Debug, Default)]
struct ConnClock(Mutex<ClockState>);

#[derive(Debug, Default)]
struct ClockState {
    /// Request heads hyper started waiting for on this connection.
    heads: u64,
    /// The first byte read since hyper last started waiting for a head.
    first_byte: Option<Instant>,
}

impl ConnClock {
    fn lock(&self) -> std::sync::MutexGuard<'_, ClockState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// hyper starts waiting for a request head: the `n`th on the connection.
    fn arm(&self) -> u64 {
        let mut s = self.lock();
        s.heads += 1;
        s.first_byte = None;
        s.heads
    }

    fn bytes_read(&self) {
        let mut s = self.lock();
        if s.first_byte.is_none() {
            s.first_byte = Some(Instant::now());
        }
    }

    fn first_byte(&self) -> Option<Instant> {
        self.lock().first_byte
    }
}

/// The connection's stream, noting when bytes arrive.
struct Watched {
    inner: TcpStream,
    clock: Arc<ConnClock>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// hyper's timer for one connection. hyper uses it only for its header
/// read timeout (HTTP/1 server); each sleep it asks for is one wait for a
/// request head, which this timer bounds as the module's doc says.
struct ConnTimer {
    clock: Arc<ConnClock>,
    limits: ConnLimits,
}

impl hyper::rt::Timer for ConnTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, _deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let armed_at = Instant::now();
        let first_head = self.clock.arm() == 1;
        let mut sleep = HeadSleep {
            clock: self.clock.clone(),
            limits: self.limits,
            armed_at,
            first_head,
            inner: Box::pin(tokio::time::sleep_until(armed_at.into())),
        };
        let (deadline, _) = sleep.deadline();
        sleep.inner.as_mut().reset(deadline.into());
        Box::pin(sleep)
    }
}

/// One wait for a request head.
struct HeadSleep {
    clock: Arc<ConnClock>,
    limits: ConnLimits,
    armed_at: Instant,
    first_head: bool,
    inner: Pin<Box<tokio::time::Sleep>>,
}

impl HeadSleep {
    /// When this wait ends, and which bound that is.
    fn deadline(&self) -> (Instant, &'static str) {
        if self.first_head {
            return (
                self.armed_at + self.limits.header_read_timeout,
                "header_read_timeout",
            );
        }
        match self.clock.first_byte() {
            None => (self.armed_at + self.limits.idle_timeout, "idle_timeout"),
            Some(at) => (at + self.limits.header_read_timeout, "header_read_timeout"),
        }
    }
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // hyper polls this each time the connection wakes without a whole
        // head, so a first byte moves the deadline here.
        let (deadline, reason) = self.deadline();
        let deadline = tokio::time::Instant::from_std(deadline);
        if self.inner.deadline() != deadline {
            self.inner.as_mut().reset(deadline);
        }
        match self.inner.as_mut().poll(cx) {
            Poll::Ready(()) => {
                metrics::counter!("paygate_inbound_connections_cut_total", "reason" => reason)
                    .increment(1);
                tracing::info!(reason, "slow client: connection cut");
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl hyper::rt::Sleep for HeadSleep {}
