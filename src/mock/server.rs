//! The TCP server: a listener on `127.0.0.1`, and a hyper HTTP/1 task per
//! connection answering through [`handle`].
//!
//! [`MockVolt::stop`](super::MockVolt::stop) closes every socket at once,
//! kept-alive connections included: the listener and each connection's
//! stream sit in a shared slot that [`close`] empties from outside their
//! tasks. They are closed too when the accept task ends with its runtime.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use super::answer::handle;
use super::{Shared, lock};

type SharedListener = Arc<Mutex<Option<TcpListener>>>;
type SharedStream = Arc<Mutex<Option<TcpStream>>>;

/// Open connections, so that `stop` can close their sockets synchronously.
#[derive(Default)]
struct Connections {
    closed: bool,
    next_id: u64,
    open: HashMap<u64, SharedStream>,
}

pub(super) struct Server {
    listener: SharedListener,
    connections: Arc<Mutex<Connections>>,
    task: JoinHandle<()>,
}

impl Server {
    pub(super) fn spawn(listener: TcpListener, shared: Arc<Shared>) -> Server {
        let listener = Arc::new(Mutex::new(Some(listener)));
        let connections = Arc::new(Mutex::new(Connections::default()));
        let task = tokio::spawn(accept_loop(
            Arc::clone(&listener),
            Arc::clone(&connections),
            shared,
        ));
        Server {
            listener,
            connections,
            task,
        }
    }

    /// Closes the listening socket and every connection's socket now, then ends the tasks.
    pub(super) fn shutdown(self) {
        close(&self.listener, &self.connections);
        self.task.abort();
    }

    /// Whether the server still runs: its task ends with the runtime it was
    /// spawned on.
    pub(super) fn running(&self) -> bool {
        !self.task.is_finished()
    }
}

/// Closes the listening socket and every connection's socket.
fn close(listener: &SharedListener, connections: &Mutex<Connections>) {
    drop(lock(listener).take());
    let open = {
        let mut connections = lock(connections);
        connections.closed = true;
        std::mem::take(&mut connections.open)
    };
    for stream in open.into_values() {
        drop(lock(&stream).take());
    }
}

/// Closes the server's sockets when its accept task ends however it ends:
/// also when the runtime it runs on shuts down, which drops the task without
/// running it again. Else the port would stay open, and connections would
/// be accepted by the system and never answered.
struct CloseOnDrop {
    listener: SharedListener,
    connections: Arc<Mutex<Connections>>,
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        close(&self.listener, &self.connections);
    }
}

async fn accept_loop(
    listener: SharedListener,
    connections: Arc<Mutex<Connections>>,
    shared: Arc<Shared>,
) {
    // Declared first, so dropped last: after the connection tasks.
    let _close = CloseOnDrop {
        listener: Arc::clone(&listener),
        connections: Arc::clone(&connections),
    };
    let mut tasks = JoinSet::new();
    loop {
        let accept = poll_fn(|cx| match lock(&listener).as_ref() {
            Some(listener) => listener.poll_accept(cx).map(Some),
            None => Poll::Ready(None),
        });
        let accepted = tokio::select! {
            accepted = accept => accepted,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        match accepted {
            None => break,
            Some(Ok((stream, peer))) => {
                if let Some((id, stream)) = register(&connections, stream) {
                    tasks.spawn(serve_connection(
                        id,
                        stream,
                        peer,
                        Arc::clone(&connections),
                        Arc::clone(&shared),
                    ));
                }
            }
            Some(Err(err)) => {
                tracing::debug!(error = %err, "mock Volt server: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

fn register(connections: &Mutex<Connections>, stream: TcpStream) -> Option<(u64, SharedStream)> {
    let _ = stream.set_nodelay(true);
    let mut connections = lock(connections);
    if connections.closed {
        return None;
    }
    let id = connections.next_id;
    connections.next_id += 1;
    let stream = Arc::new(Mutex::new(Some(stream)));
    connections.open.insert(id, Arc::clone(&stream));
    Some((id, stream))
}

/// Removes a connection from the registry when its task ends.
struct Deregister {
    id: u64,
    connections: Arc<Mutex<Connections>>,
}

impl Drop for Deregister {
    fn drop(&mut self) {
        lock(&self.connections).open.remove(&self.id);
    }
}

async fn serve_connection(
    id: u64,
    stream: SharedStream,
    peer: SocketAddr,
    connections: Arc<Mutex<Connections>>,
    shared: Arc<Shared>,
) {
    let _deregister = Deregister { id, connections };
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
    });
    let io = TokioIo::new(ClosableStream(stream));
    if let Err(err) = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service)
        .await
    {
        tracing::debug!(error = %err, %peer, "mock Volt server: connection ended with an error");
    }
}

/// A TCP stream whose socket `stop` can close from outside the connection task.
struct ClosableStream(SharedStream);

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "mock Volt server stopped")
}

impl AsyncRead for ClosableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match lock(&self.0).as_mut() {
            Some(stream) => Pin::new(stream).poll_read(cx, buf),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for ClosableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match lock(&self.0).as_mut() {
            Some(stream) => Pin::new(stream).poll_write(cx, buf),
            None => Poll::Ready(Err(closed())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match lock(&self.0).as_mut() {
            Some(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(closed())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match lock(&self.0).as_mut() {
            Some(stream) => Pin::new(stream).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match lock(&self.0).as_mut() {
            Some(stream) => Pin::new(stream).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::MockVolt;
    use crate::mock::tests::{banks, password_request, send};
    use bytes::Bytes;
    use http::StatusCode;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn tcp_server_stop_and_restart() {
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::TokioExecutor;

        let mock = MockVolt::start().await.expect("start");
        let url = mock.url();
        assert!(url.starts_with("http://127.0.0.1:") && !url.ends_with('/'));
        let addr: SocketAddr = url["http://".len()..].parse().expect("address");

        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http::<Full<Bytes>>();
        let call = |req: Request<Full<Bytes>>| {
            let client = client.clone();
            async move {
                let response = client.request(req).await?;
                let status = response.status();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map(|collected| collected.to_bytes())
                    .unwrap_or_default();
                Ok::<_, hyper_util::client::legacy::Error>((status, body))
            }
        };
        let with_base = |req: Request<Full<Bytes>>| {
            let (mut parts, body) = req.into_parts();
            parts.uri = format!("{url}{}", parts.uri.path()).parse().expect("uri");
            Request::from_parts(parts, body)
        };

        let (status, body) = call(with_base(password_request())).await.expect("oauth");
        assert_eq!(status, StatusCode::OK);
        let tokens: serde_json::Value = serde_json::from_slice(&body).expect("json");
        let access = tokens["access_token"].as_str().expect("token").to_owned();
        let (status, _) = call(with_base(banks(Some(&access)))).await.expect("banks");
        assert_eq!(status, StatusCode::OK);

        // A kept-alive connection, to check that stop() closes it.
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .expect("handshake");
        let connection = tokio::spawn(connection);
        let response = sender.send_request(banks(None)).await.expect("request");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let _ = response.into_body().collect().await.expect("body");

        mock.stop();
        let closed = tokio::time::timeout(Duration::from_secs(10), connection).await;
        assert!(closed.is_ok(), "stop() must close open connections");
        let refused = TcpStream::connect(addr).await.expect_err("stopped");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        let err = call(with_base(banks(Some(&access))))
            .await
            .expect_err("stopped");
        assert!(err.is_connect(), "{err:?}");

        mock.restart().await.expect("restart");
        mock.restart()
            .await
            .expect("restart while running is a no-op");
        assert_eq!(mock.url(), url);
        // Same state: the token issued before the restart still works.
        let (status, _) = call(with_base(banks(Some(&access)))).await.expect("banks");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(mock.api_calls(), 3);
        assert_eq!(mock.oauth_calls(), 1);

        // The in-process service shares the state.
        assert_eq!(send(&mock, banks(Some(&access))).await.status, 200);
        assert_eq!(mock.api_calls(), 4);

        drop(mock);
        let refused = TcpStream::connect(addr).await.expect_err("dropped");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
    }
}
