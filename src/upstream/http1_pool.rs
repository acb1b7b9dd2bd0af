//! Keep-alive HTTP/1.1 connections to a plain `http://` upstream, each driven by the request
//! that is using it. hyper-util's pooled client gives every connection a task of its own and
//! hands each request to it over a channel, so a request costs two extra task wake-ups and a
//! pool lookup; at NextChat's message rates through a sidecar that bookkeeping was a measurable
//! share of a passthrough request's CPU (docs/BENCHMARKS.md, #9). Here the request's own task
//! moves the connection's bytes while it waits for the response head, and the response body
//! keeps doing so while the caller reads it; a finished body puts the connection back. TLS
//! upstreams keep the pooled client (`transport`).

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery};
use http::{header, HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::body::{Body, Frame, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::config::UpstreamConfig;

type Driver = http1::Connection<TokioIo<TcpStream>, Full<Bytes>>;

/// Why a request on a pooled connection failed.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection could be opened (refused, unresolvable, timed out).
    Connect(String),
    /// The connection failed after the request went out.
    Reset(hyper::Error),
}

/// One connection: the handle that sends requests and the state machine that moves its bytes.
struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    /// `None` once the connection has ended.
    driver: Option<Driver>,
}

impl Conn {
    /// Moves the connection's bytes as far as they go; false once it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(driver) = self.driver.as_mut() {
            if Pin::new(driver).poll(cx).is_ready() {
                self.driver = None;
            }
        }
        self.driver.is_some()
    }

    /// Whether it can carry another request.
    fn reusable(&self) -> bool {
        self.driver.is_some() && !self.sender.is_closed()
    }
}

/// The idle connections of one upstream, newest last.
pub(crate) struct Http1Pool {
    authority: Authority,
    host: HeaderValue,
    /// `host:port` to connect to.
    addr: String,
    /// Boxed: a connection's state is large, and a response carrying it is moved through
    /// several layers; a pointer is cheaper to move.
    idle: Mutex<Vec<(Box<Conn>, Instant)>>,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
    builder: http1::Builder,
}

impl Http1Pool {
    /// A pool for `cfg`'s upstream, or `None` when it is not a plain `http://` URL (TLS and
    /// anything unusual stay on the pooled client).
    pub(crate) fn for_upstream(cfg: &UpstreamConfig) -> Option<Arc<Self>> {
        let uri: Uri = cfg.url.parse().ok()?;
        if uri.scheme_str() != Some("http") {
            return None;
        }
        let authority = uri.authority()?.clone();
        // Credentials in the URL are the pooled client's business (it strips them).
        if authority.as_str().contains('@') {
            return None;
        }
        let host = HeaderValue::from_str(authority.as_str()).ok()?;
        let addr = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        Some(Arc::new(Self {
            authority,
            host,
            addr,
            idle: Mutex::new(Vec::new()),
            max_idle: cfg.pool_max_idle_per_host,
            idle_timeout: Duration::from_millis(cfg.pool_idle_timeout_ms),
            connect_timeout: cfg.timeout(),
            builder: http1::Builder::new(),
        }))
    }

    /// Whether requests to `uri` can go through this pool (same host and port).
    pub(crate) fn serves(&self, uri: &Uri) -> bool {
        // Byte equality, not `Authority`'s case-insensitive one: every URI comes from the
        // upstream's own configured URL, spelled the same way.
        uri.scheme_str() == Some("http")
            && uri.authority().map(Authority::as_str) == Some(self.authority.as_str())
    }

    /// Sends `req` (an absolute URI this pool serves) on an idle connection or a new one.
    pub(crate) async fn send(
        self: &Arc<Self>,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let (mut parts, body) = req.into_parts();
        // HTTP/1.1 wants the origin form on the request line and the authority in Host.
        parts.uri = Uri::from(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        parts.headers.insert(header::HOST, self.host.clone());
        let mut conn = self.ready_conn().await?;
        let mut response =
            std::pin::pin!(conn.sender.send_request(Request::from_parts(parts, body)));
        let head = poll_fn(|cx| {
            conn.drive(cx);
            response.as_mut().poll(cx)
        })
        .await
        .map_err(SendError::Reset)?;
        let pool = Arc::clone(self);
        Ok(head.map(|body| UpstreamBody {
            body,
            lease: Some(Lease { conn, pool }),
            finished: false,
        }))
    }

    /// An idle connection that is still open and ready, or a new one.
    async fn ready_conn(&self) -> Result<Box<Conn>, SendError> {
        while let Some(mut conn) = self.checkout() {
            // Reading an idle connection is how a close by the upstream shows up.
            let ready = poll_fn(|cx| {
                if !conn.drive(cx) {
                    return Poll::Ready(false);
                }
                conn.sender.poll_ready(cx).map(|r| r.is_ok())
            })
            .await;
            if ready {
                return Ok(conn);
            }
        }
        self.connect().await
    }

    /// The newest idle connection, dropping any that sat idle too long.
    fn checkout(&self) -> Option<Box<Conn>> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let expired =
            idle.partition_point(|(_, since)| now.duration_since(*since) >= self.idle_timeout);
        // Closing sockets is a system call each; do it after the lock is released.
        let stale: Vec<_> = idle.drain(..expired).collect();
        let conn = idle.pop().map(|(conn, _)| conn);
        drop(idle);
        drop(stale);
        conn
    }

    /// Puts a connection whose exchange finished back for the next request.
    fn checkin(&self, conn: Box<Conn>) {
        if !conn.reusable() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push((conn, Instant::now()));
        }
    }

    async fn connect(&self) -> Result<Box<Conn>, SendError> {
        let stream = match tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(&self.addr),
        )
        .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                return Err(SendError::Connect(format!(
                    "connecting to {}: {e}",
                    self.addr
                )))
            }
            Err(_) => {
                return Err(SendError::Connect(format!(
                    "connecting to {}: timed out after {:?}",
                    self.addr, self.connect_timeout
                )))
            }
        };
        // Small request and SSE frames must not wait for Nagle; keep-alive probes find an
        // upstream that vanished under a long stream.
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let (sender, driver) = self
            .builder
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| SendError::Connect(format!("connecting to {}: {e}", self.addr)))?;
        Ok(Box::new(Conn {
            sender,
            driver: Some(driver),
        }))
    }
}

/// An upstream response body. On a connection from [`Http1Pool`] reading it also drives the
/// connection, and once it has been read to the end the connection goes back to the pool;
/// dropping it earlier closes the connection, which is how the upstream learns of a cancel.
pub struct UpstreamBody {
    body: Incoming,
    /// The connection and where it goes back; `None` on the pooled client.
    lease: Option<Lease>,
    finished: bool,
}

/// A connection out of its pool for one exchange.
struct Lease {
    conn: Box<Conn>,
    pool: Arc<Http1Pool>,
}

impl UpstreamBody {
    /// A body from the pooled client, which drives its own connections.
    pub(crate) fn pooled(body: Incoming) -> Self {
        Self {
            body,
            lease: None,
            finished: false,
        }
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("pooled", &self.lease.is_none())
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(lease) = this.lease.as_mut() {
            lease.conn.drive(cx);
        }
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            this.finished = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if !(self.finished || self.body.is_end_stream()) {
            return;
        }
        if let Some(Lease { conn, pool }) = self.lease.take() {
            pool.checkin(conn);
        }
    }
}
