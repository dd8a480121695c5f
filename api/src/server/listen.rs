//! The listener: accepts connections and serves HTTP/1.1 on each with hyper. Two things
//! `axum::serve` does not do are done here: a header-read timeout (a client that trickles its
//! request head is cut off instead of holding a connection open), and a JSON error body on the
//! answers hyper gives by itself before a request reaches the router (400 for an unparsable
//! request, 414 for a too-long URI, 431 for too-large headers).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// How long to wait before accepting again after `accept` failed (e.g. out of fds).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Serves `router` on `listener` until `stop` completes, then waits for open connections to end.
pub(super) async fn serve(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    stop: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of fds or a connection reset before accept: keep listening.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(JsonErrors::new(stream));
        let connection = http.serve_connection(io, TowerToHyperService::new(router.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A TCP stream that replaces hyper's own empty-bodied error answers with JSON ones.
///
/// hyper answers a request it cannot parse without calling the service: it writes a bare head
/// (`HTTP/1.1 431 ...`, `content-length: 0`) and closes. No answer of the router has an empty
/// error body, so such a head, written as a whole, can only come from hyper.
struct JsonErrors {
    inner: TcpStream,
    /// Bytes of a replacement answer still to be written.
    pending: Vec<u8>,
}

impl JsonErrors {
    fn new(inner: TcpStream) -> Self {
        JsonErrors {
            inner,
            pending: Vec::new(),
        }
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for JsonErrors {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for JsonErrors {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_drain(cx))?;
        if let Some(answer) = json_error_answer(buf) {
            self.pending = answer;
            // The replacement is flushed by `poll_flush`/`poll_shutdown`; hyper's bytes count as written.
            let _ = self.poll_drain(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// If `written` is exactly one bodiless error head of the kind hyper writes for a request it could
/// not parse, the same answer with a JSON error body.
fn json_error_answer(written: &[u8]) -> Option<Vec<u8>> {
    // Cheap tests first: this runs on every write of every answer.
    let status = written.strip_prefix(b"HTTP/1.1 ")?.get(..3)?;
    if !matches!(status, b"400" | b"414" | b"431") || written.len() > 4096 || !written.ends_with(b"\r\n\r\n") {
        return None;
    }
    let head = std::str::from_utf8(&written[9..]).ok()?;
    let head = head.strip_suffix("\r\n\r\n")?;
    if head.contains("\r\n\r\n") {
        return None;
    }
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let (code, message) = match status_line.get(..3)? {
        "400" => ("bad_request", "the request could not be parsed as HTTP/1.1"),
        "414" => ("uri_too_long", "the request URI is too long"),
        "431" => ("headers_too_large", "the request headers are too large or too many"),
        _ => return None,
    };
    let headers: Vec<&str> = lines.collect();
    let empty = headers.iter().any(|h| h.eq_ignore_ascii_case("content-length: 0"));
    if !empty {
        return None;
    }
    let error = super::error::ErrorBody {
        error: super::error::ErrorDetail {
            code: code.to_owned(),
            message: message.to_owned(),
        },
    };
    let body = serde_json::to_string(&error).ok()?;
    let mut answer = format!(
        "HTTP/1.1 {status_line}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for header in headers {
        let name = header.split(':').next().unwrap_or("").trim();
        if !name.eq_ignore_ascii_case("content-length") && !name.eq_ignore_ascii_case("connection") {
            answer.push_str(header);
            answer.push_str("\r\n");
        }
    }
    answer.push_str("\r\n");
    answer.push_str(&body);
    Some(answer.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::json_error_answer;

    #[test]
    fn test_hypers_bare_431_gets_a_json_body() {
        let bare = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let answer = String::from_utf8(json_error_answer(bare).expect("rewritten")).expect("utf8");
        let (head, body) = answer.split_once("\r\n\r\n").expect("head");
        assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
        assert!(
            head.contains("content-type: application/json") && head.contains("date: x"),
            "{head}"
        );
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let json: crate::server::ErrorBody = serde_json::from_str(body).expect("json");
        assert_eq!(json.error.code, "headers_too_large");
    }

    #[test]
    fn test_answers_with_a_body_or_another_status_pass_unchanged() {
        assert!(json_error_answer(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\n").is_none());
        assert!(json_error_answer(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(json_error_answer(b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n\r\n{}").is_none());
    }
}
