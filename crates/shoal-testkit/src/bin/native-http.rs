//! The native baseline of `scripts/bench-http.sh`: a plain hyper server
//! answering what the benchmark's guests answer, with no sandbox at all.
//!
//! `native-http ADDR`: `GET /` answers `Hello, wasi:http/proxy world!\n` (the
//! `wstd` hello component's answer), `/big?mib=N` streams N MiB in 1 MiB
//! chunks (the HTTP probe's `/big`), anything else `hello world`.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};

type Body = BoxBody<Bytes, Infallible>;

async fn answer(request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let full = |text: &'static str| Full::new(Bytes::from_static(text.as_bytes())).boxed();
    let body = match request.uri().path() {
        "/" => full("Hello, wasi:http/proxy world!\n"),
        "/big" => {
            let mib: usize = request
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("mib=")))
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
            Counted { left: mib, chunk: Bytes::from(vec![b'x'; 1 << 20]) }.boxed()
        }
        _ => full("hello world"),
    };
    Ok(Response::new(body))
}

/// `left` more frames of `chunk`, made as they are asked for.
struct Counted {
    left: usize,
    chunk: Bytes,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        self.left -= 1;
        std::task::Poll::Ready(Some(Ok(Frame::data(self.chunk.clone()))))
    }
}

fn main() {
    let addr: std::net::SocketAddr =
        std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:18493".into()).parse().expect("an address");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, hyper::service::service_fn(answer))
                    .await;
            });
        }
    });
}
