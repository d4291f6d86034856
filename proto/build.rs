//! Generates the Rust types for keel's wire schema with a pure-Rust protobuf
//! compiler (protox), so no system `protoc` is needed. With the `grpc`
//! feature the admin services are compiled too, with tonic client and
//! server code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/cri/v1/cri.proto");
    #[cfg(feature = "cri")]
    if std::env::var_os("CARGO_FEATURE_CRI").is_some() {
        let fds = protox::compile(["proto/cri/v1/cri.proto"], ["proto"])?;
        tonic_prost_build::configure()
            .build_server(false)
            .compile_fds(fds)?;
    }
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    let mut files = vec!["proto/keel/v1/keel.proto"];
    if grpc {
        files.push("proto/keel/v1/admin.proto");
    }
    for f in ["proto/keel/v1/keel.proto", "proto/keel/v1/admin.proto"] {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(&files, ["proto"])?;
    #[cfg(feature = "grpc")]
    if grpc {
        tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
        return Ok(());
    }
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    Ok(())
}
