//! The `wstd` crate's HTTP server hello world.

use wstd::http::{Body, Request, Response, StatusCode};

#[wstd::http_server]
async fn main(request: Request<Body>) -> Result<Response<Body>, wstd::http::Error> {
    match request.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/") {
        "/" => Ok(Response::new("Hello, wasi:http/proxy world!\n".into())),
        _ => Ok(Response::builder().status(StatusCode::NOT_FOUND).body("not found\n".into())?),
    }
}
