//! Replay throughput of the admin gRPC API (records/s): an in-process
//! `GrpcServer` over loopback TLS with the cluster CA and the admin client
//! certificate (what cloudcore serves), read by a tonic client in the same
//! process, as `keel replay` reads it.
//!
//! `cargo bench -p keel-benches --bench grpc_replay`
//!
//! The log: 8 streams of 50,000 records each (300-byte payloads, object
//! keys spread over 1,000 pods). "one stream" replays one of them from
//! seq 0; "all streams" replays all 400,000 records. Each replay drains
//! the whole response; records are decoded by the client (prost) but not
//! otherwise processed. In-process rather than a cloudcore child: filling a
//! cloudcore's log with 400,000 records through its Kubernetes API would
//! measure the API, not the replay; the server code is the same.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

// keel's allocator (see `keel_benches`).
use keel_benches as _;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keel_cloud::grpc::cli::{Credentials, connect_cloud};
use keel_cloud::grpc::{GrpcServer, LogApi};
use keel_log::{Entry, PayloadKind, Role, Store, StoreOptions};
use keel_proto::log_service_client::LogServiceClient;
use keel_proto::{RecordFilter, ReplayRequest, replay_item};

const STREAMS: usize = 8;
const PER_STREAM: u64 = 50_000;
const PAYLOAD: usize = 300;

fn fill(store: &Store) {
    for s in 0..STREAMS {
        let name = format!("edge-{s}/down");
        store.create_stream(&name, Role::Writer, 1).unwrap();
        let mut n = 0u64;
        while n < PER_STREAM {
            let batch: Vec<Entry> = (0..10_000)
                .map(|i| {
                    Entry::new(
                        "user:keel-admin",
                        format!("pods/default/p{}", (n + i) % 1000),
                        PayloadKind::Change,
                        vec![0xab; PAYLOAD],
                    )
                })
                .collect();
            store.append(&name, batch).unwrap();
            n += 10_000;
        }
    }
}

async fn replay(
    client: &mut LogServiceClient<tonic::transport::Channel>,
    streams: Vec<String>,
) -> u64 {
    let mut s = client
        .replay(ReplayRequest {
            filter: Some(RecordFilter {
                streams,
                ..RecordFilter::default()
            }),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0u64;
    while let Some(item) = s.message().await.unwrap() {
        if let Some(replay_item::Item::Records(r)) = item.item {
            n += r.records.len() as u64;
        }
    }
    n
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Store::open(dir.path().join("log"), StoreOptions::default()).unwrap();
    fill(&store);
    let ca = keel_cloud::pki::ClusterCa::load_or_create(dir.path()).unwrap();
    let server = ca.server_cert(&["127.0.0.1"]).unwrap();
    let admin = ca.admin_cert().unwrap();
    let creds = Credentials {
        ca_pem: ca.cert_pem().to_owned(),
        cert_pem: admin.cert_pem,
        key_pem: admin.key_pem,
    };
    let (srv, mut client) = rt.block_on(async {
        let tls = keel_cloud::pki::api_tls_config(&ca, &server.cert_pem, &server.key_pem).unwrap();
        let log = LogApi::new(store.clone(), vec![]);
        let srv = GrpcServer::bind_tls("127.0.0.1:0".parse().unwrap(), tls, log, None)
            .await
            .unwrap();
        let ch = connect_cloud(&srv.local_addr().to_string(), &creds)
            .await
            .unwrap();
        (
            srv,
            LogServiceClient::new(ch).max_decoding_message_size(64 << 20),
        )
    });
    let mut g = c.benchmark_group("grpc_replay");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Elements(PER_STREAM));
    g.bench_function("one_stream", |b| {
        b.iter(|| {
            let n = rt.block_on(replay(&mut client, vec!["edge-0/down".into()]));
            assert_eq!(n, PER_STREAM);
        });
    });
    let total = PER_STREAM * STREAMS as u64;
    g.throughput(Throughput::Elements(total));
    g.bench_function("all_streams", |b| {
        b.iter(|| {
            let n = rt.block_on(replay(&mut client, vec![]));
            assert_eq!(n, total);
        });
    });
    g.finish();
    rt.block_on(srv.shutdown());
}

criterion_group!(benches, bench);
criterion_main!(benches);
