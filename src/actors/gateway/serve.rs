//! The HTTP server loop: hyper with the limits `axum::serve` does not expose — a
//! deadline for a request's header (`http.header_read_timeout`), a cap on open
//! connections (`http.max_connections`: past it, new connections wait in the listen
//! backlog until one closes) — and graceful shutdown of the connections in flight.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::tls::{GatewayTls, ReloadingCert};

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn reload_certificates(cert: Arc<ReloadingCert>, every: Duration) {
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(100)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match cert.reload_if_changed() {
            Some(Ok(())) => tracing::info!("TLS certificate reloaded"),
            Some(Err(error)) => {
                tracing::warn!(%error, "TLS certificate not reloaded; the previous one stays in service")
            }
            None => {}
        }
    }
}

/// The largest request head (request line and header fields) read; larger gets 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;

#[derive(Clone, Copy, Debug)]
pub struct ServeLimits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// How long a graceful shutdown waits for requests in flight.
    pub drain_timeout: Duration,
    /// How often TLS certificate files are checked for a change.
    pub tls_reload_interval: Duration,
}

/// Serve `app` on `listener` (over TLS when `tls` is set) until `shutdown` resolves, then
/// let the requests in flight finish (at most `drain_timeout`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    tls: Option<Arc<GatewayTls>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    // Certificate renewals are picked up while serving.
    let _reloader = tls
        .as_ref()
        .map(|tls| AbortOnDrop(tokio::spawn(reload_certificates(Arc::clone(&tls.cert), limits.tls_reload_interval))));
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stopping, stop_signal) = tokio::sync::watch::channel(false);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).max_buf_size(MAX_HEAD_BYTES);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // The peer's address for the handlers (per-IP rate limits).
        let with_peer = axum::Extension(axum::extract::ConnectInfo::<std::net::SocketAddr>(peer));
        let service = TowerToHyperService::new(tower::Layer::layer(&with_peer, app.clone()));
        let stop_signal = stop_signal.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let handshake_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            // A client that stalls or breaks the protocol only ends its own connection.
            let outcome = match tls {
                None => {
                    let io = TokioIo::new(JsonParseErrors::new(stream));
                    drive(builder.serve_connection(io, service).with_upgrades(), stop_signal).await
                }
                Some(tls) => match tokio::time::timeout(handshake_timeout, tls.acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let io = TokioIo::new(JsonParseErrors::new(stream));
                        drive(builder.serve_connection(io, service).with_upgrades(), stop_signal).await
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%error, %peer, "TLS handshake failed");
                        Ok(())
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        Ok(())
                    }
                },
            };
            if let Err(error) = outcome {
                tracing::debug!(%error, "connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = stopping.send(true);
    // Every connection holds a permit until it ends (an upgraded WebSocket hands its
    // socket over and ends its HTTP connection; the live feed closes those itself).
    let all = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    if tokio::time::timeout(limits.drain_timeout, permits.acquire_many(all)).await.is_err() {
        tracing::warn!(timeout = ?limits.drain_timeout, "requests still in flight at shutdown were cut off");
    }
    Ok(())
}

/// Serve one connection (upgrades included: `GET /ws`) until it ends; once `stopping`
/// turns true, finish the request in flight and close it.
async fn drive<C>(connection: C, mut stopping: tokio::sync::watch::Receiver<bool>) -> Result<(), hyper::Error>
where
    C: std::future::Future<Output = Result<(), hyper::Error>> + GracefulShutdown,
{
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        outcome = connection.as_mut() => return outcome,
        _ = stopping.wait_for(|stopping| *stopping) => {}
    }
    connection.as_mut().shut_down_gracefully();
    connection.await
}

/// What [`drive`] needs of a hyper connection (hyper-util's own trait is sealed and
/// does not cover connections that may upgrade).
trait GracefulShutdown {
    fn shut_down_gracefully(self: Pin<&mut Self>);
}

impl<I, B, S> GracefulShutdown for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shut_down_gracefully(self: Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

/// hyper answers a request head it cannot take (400 malformed, 414 URI too long, 431
/// header too large) itself, with an empty body, before any handler runs. This wrapper
/// around the connection rewrites exactly those responses into the API's JSON error
/// shape; everything else passes through untouched. (The gateway's own responses always
/// carry a body, so a bodiless 400/414/431 can only be hyper's.)
struct JsonParseErrors<S> {
    inner: S,
    /// A rewritten response being written: its bytes, how many went out, and the
    /// length of the original buffer to report once done.
    rewrite: Option<(Vec<u8>, usize)>,
}

impl<S> JsonParseErrors<S> {
    fn new(inner: S) -> Self {
        Self { inner, rewrite: None }
    }
}

/// The JSON replacement for `buf` if it is hyper's automatic error response.
fn automatic_error_response(buf: &[u8]) -> Option<Vec<u8>> {
    let (status, code, message) = match buf.get(..13)? {
        b"HTTP/1.1 400 " => (400, "bad_request", "the request is not valid HTTP/1.1"),
        b"HTTP/1.1 414 " => (414, "uri_too_long", "the request URI is longer than 65,534 bytes"),
        b"HTTP/1.1 431 " => {
            (431, "header_too_large", "the request header is too large (more than 100 fields or 64 KiB)")
        }
        _ => return None,
    };
    // The whole buffer is one bodiless head.
    let head_end = memchr::memmem::find(buf, b"\r\n\r\n")? + 4;
    if head_end != buf.len() || memchr::memmem::find(&buf[..head_end], b"\r\ncontent-length: 0\r\n").is_none() {
        return None;
    }
    let reason = std::str::from_utf8(&buf[13..memchr::memmem::find(buf, b"\r\n")?]).ok()?;
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    Some(
        format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonParseErrors<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.rewrite.is_none()
            && let Some(replacement) = automatic_error_response(buf)
        {
            this.rewrite = Some((replacement, 0));
        }
        let Some((bytes, written)) = this.rewrite.as_mut() else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        while *written < bytes.len() {
            match Pin::new(&mut this.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
        this.rewrite = None;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    // Not vectored: hyper then writes each response head as one buffer, which is what
    // the check above looks at.
}

#[cfg(test)]
mod tests {
    use super::automatic_error_response;

    #[test]
    fn only_bodiless_parse_errors_are_rewritten() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let rewritten = String::from_utf8(automatic_error_response(hyper_431).expect("rewritten")).expect("utf-8");
        assert!(rewritten.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{rewritten}");
        assert!(rewritten.ends_with(r#"{"error":{"code":"header_too_large","message":"the request header is too large (more than 100 fields or 64 KiB)"}}"#), "{rewritten}");
        let app_400 = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 5\r\n\r\n{...}";
        assert!(automatic_error_response(app_400).is_none());
        let app_200 = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert!(automatic_error_response(app_200).is_none());
    }
}
