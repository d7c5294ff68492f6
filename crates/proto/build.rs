//! Generates the gRPC code from `proto/tpserve/v1/worker.proto` with a vendored `protoc`, so
//! no system protobuf compiler is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build runs the compiler named by PROTOC.
    std::env::set_var("PROTOC", protoc);
    // The manifest directory of this build, not the one this script was compiled in (a
    // shared target directory would otherwise compile another checkout's .proto).
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let file = root.join("tpserve/v1/worker.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    tonic_prost_build::configure().compile_protos(&[file], &[root])?;
    Ok(())
}
