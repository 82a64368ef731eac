//! Compiles `proto/skiff.proto` with protox (pure Rust) so no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/skiff.proto", "proto/raft.proto"];
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_build::configure()
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_fds(descriptors)?;
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    Ok(())
}
