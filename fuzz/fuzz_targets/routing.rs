//! Generated requests through the node's router: only a function's own
//! failure may be answered with a 5xx.
#![no_main]

use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use shoal_node::{Node, NodeConfig};
use tower::ServiceExt;

const ADMIN: &str = "fuzz-admin-token-0123456789";

struct Fixture {
    tokio: tokio::runtime::Runtime,
    node: Arc<Node>,
    tenant_token: String,
    _dir: tempfile::TempDir,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let mut config = NodeConfig::new(dir.path());
    config.admin_token = Some(ADMIN.to_string());
    let node = tokio.block_on(Node::start(config)).unwrap();
    tokio.block_on(node.deploy_defaults("demo", shoal_guests::EXAMPLES)).unwrap();
    let tenant_token = node.create_tenant("acme").unwrap().unwrap();
    Fixture { tokio, node, tenant_token, _dir: dir }
});

fuzz_target!(|data: &[u8]| {
    let fixture = &*FIXTURE;
    let mut u = arbitrary::Unstructured::new(data);
    let tokens = [ADMIN, fixture.tenant_token.as_str()];
    let Ok(request) =
        shoal_testkit::fuzz::api_request(&mut u, &tokens, &["demo", "acme"], &["hello", "echo", "upper", "counter"])
    else {
        return;
    };
    let mut builder = axum::http::Request::builder().method(request.method).uri(&request.path_and_query);
    if let Some(token) = &request.token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    let Ok(http_request) = builder.body(axum::body::Body::from(request.body.clone())) else { return };
    let response = fixture.tokio.block_on(fixture.node.router().oneshot(http_request)).unwrap();
    let status = response.status().as_u16();
    assert!(status < 500 || request.path_and_query.contains("/invoke"), "{request:?} answered {status}");
});
