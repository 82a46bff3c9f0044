//! Compiles `proto/serverpb.proto` with prost, using the `protoc` binary that
//! the `protoc-bin-vendored` crate ships, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/serverpb.proto");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    config.compile_protos(&["proto/serverpb.proto"], &["proto"])?;
    Ok(())
}
