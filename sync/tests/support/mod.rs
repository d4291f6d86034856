//! QUIC on loopback for the tests that need real connections: a
//! self-signed certificate for `localhost`, the crate's own endpoints.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;

/// A server endpoint on loopback and a client endpoint that trusts it
/// (`transport` for the client's connections, if given).
pub fn endpoints(transport: Option<quinn::TransportConfig>) -> (quinn::Endpoint, quinn::Endpoint) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server_config = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).unwrap(),
    ));
    let server =
        keel_sync::quic::server_endpoint(server_config, ([127, 0, 0, 1], 0).into(), None).unwrap();
    let mut client_config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).unwrap(),
    ));
    if let Some(t) = transport {
        client_config.transport_config(Arc::new(t));
    }
    let mut client = keel_sync::quic::client_endpoint(([127, 0, 0, 1], 0).into()).unwrap();
    client.set_default_client_config(client_config);
    (server, client)
}

/// A connection from `client` to `server`, as each side sees it.
pub async fn connect(
    server: &quinn::Endpoint,
    client: &quinn::Endpoint,
) -> (quinn::Connection, quinn::Connection) {
    let addr = server.local_addr().unwrap();
    let (accepted, dialled) = tokio::join!(
        async { server.accept().await.unwrap().await.unwrap() },
        async { client.connect(addr, "localhost").unwrap().await.unwrap() }
    );
    (accepted, dialled)
}
