//! Compiles `proto/skiff.proto` with protox (pure Rust) so no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/skiff.proto", "proto/raft.proto", "proto/pki.proto"];
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_build::configure()
        .type_attribute(".", "#[derive(serde::Serialize)]")
        // Messages carrying secret values or the secrets key: their Debug
        // (src/lib.rs) shows lengths only, so no log line can print them.
        .skip_debug(".skiff.v1.SecretValue")
        .skip_debug(".skiff.v1.PutSecretRequest")
        .skip_debug(".skiff.raft.v1.JoinResponse")
        .skip_debug(".skiff.pki.v1.IssueRequest")
        .compile_fds(descriptors)?;
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    Ok(())
}
