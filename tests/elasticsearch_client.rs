//! The Elasticsearch client's connection settings against the stand-in: basic auth and
//! an API key sent as Elasticsearch expects them (a wrong one is a retriable 401, which
//! `/ready` would show), HTTPS with the cluster's CA from `elasticsearch.ca_file` (and
//! refused without it), and a URL list that skips a dead node.

use std::sync::Arc;

use tidemark::config::{Config, ConfigSources};
use tidemark::elasticsearch::{BulkError, EsClient};
use tidemark::sim::es_double::EsDouble;

fn client(sources: ConfigSources) -> EsClient {
    let config = Config::load(&sources.with("elasticsearch.enabled", true)).expect("valid configuration");
    EsClient::new(&config.elasticsearch).expect("client")
}

fn base64(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_and_api_keys_are_sent() {
    let double = EsDouble::start("127.0.0.1:0".parse().expect("addr")).await.expect("stand-in");
    *double.faults.required_authorization.lock() = Some(format!("Basic {}", base64("elastic:hunter2")));
    let urls = vec![double.url()];
    let right = client(
        ConfigSources::default()
            .with("elasticsearch.urls", urls.clone())
            .with("elasticsearch.username", "elastic")
            .with("elasticsearch.password", "hunter2"),
    );
    assert_eq!(right.health().await.as_deref(), Ok("green"));
    right.apply_template().await.expect("template with basic auth");
    let wrong = client(
        ConfigSources::default()
            .with("elasticsearch.urls", urls.clone())
            .with("elasticsearch.username", "elastic")
            .with("elasticsearch.password", "wrong"),
    );
    let error = wrong.health().await.expect_err("wrong password refused");
    assert!(error.contains("401"), "{error}");
    assert!(matches!(wrong.apply_template().await, Err(BulkError::Retriable(e)) if e.contains("401")));

    *double.faults.required_authorization.lock() = Some("ApiKey aWQ6c2VjcmV0".to_string());
    let keyed =
        client(ConfigSources::default().with("elasticsearch.urls", urls).with("elasticsearch.api_key", "aWQ6c2VjcmV0"));
    assert_eq!(keyed.health().await.as_deref(), Ok("green"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_the_clusters_ca() {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("certificate");
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, made.cert.pem()).expect("write CA");
    let key = rustls_pki_types::PrivateKeyDer::try_from(made.signing_key.serialize_der()).expect("key");
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(vec![made.cert.der().clone()], key)
        .expect("server config");
    let double = EsDouble::start_tls("127.0.0.1:0".parse().expect("addr"), Arc::new(server)).await.expect("stand-in");
    assert!(double.url().starts_with("https://"));

    let trusted = client(
        ConfigSources::default()
            .with("elasticsearch.urls", vec![double.url()])
            .with("elasticsearch.ca_file", ca.display().to_string()),
    );
    assert_eq!(trusted.health().await.as_deref(), Ok("green"));
    let untrusted = client(ConfigSources::default().with("elasticsearch.urls", vec![double.url()]));
    assert!(untrusted.health().await.is_err(), "a certificate from an unknown CA is refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_in_the_list_is_skipped_on_retry() {
    let double = EsDouble::start("127.0.0.1:0".parse().expect("addr")).await.expect("stand-in");
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr");
    let client =
        client(ConfigSources::default().with("elasticsearch.urls", vec![format!("http://{dead}"), double.url()]));
    // Round robin: of two attempts, one reaches the live node.
    let outcomes = [client.health().await, client.health().await];
    assert!(outcomes.iter().any(|outcome| outcome.as_deref() == Ok("green")), "{outcomes:?}");
    assert!(outcomes.iter().any(Result::is_err), "{outcomes:?}");
}
