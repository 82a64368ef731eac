//! Image references, image configs, manifests and indexes: what a registry
//! (or a stack file) hands the agent.

use skiff_agent::image::fuzzing::{
    choose, digest_hex, parse_config, parse_reference, OciManifest, Reference,
};
use skiff_agent::image::Platform;

/// A reference parses like `oci-spec`'s regex parser (ASCII tags and, as
/// Docker, lowercase repositories only),
/// and its normalized form parses back to the same reference.
pub fn image_reference(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = skiff_spec::validate_image_reference(text);
    let ours = parse_reference(text);
    let theirs = text.parse::<Reference>().ok().filter(|r| {
        r.tag().is_none_or(|t| t.is_ascii())
            && !r.repository().bytes().any(|b| b.is_ascii_uppercase())
    });
    assert_eq!(ours.as_ref().ok(), theirs.as_ref(), "{text:?}");
    if let Ok(reference) = ours {
        let whole = reference.whole();
        let again = parse_reference(&whole)
            .unwrap_or_else(|e| panic!("{text:?} normalizes to {whole:?}, which fails: {e}"));
        assert_eq!(again, reference, "{text:?} -> {whole:?}");
    }
}

/// An image config blob, or a manifest / index: parsing never panics, a
/// diff id becomes a store path only as 64 lowercase hex digits, and the
/// entry chosen from an index is for the node's OS and architecture.
pub fn image_config(data: &[u8]) {
    if let Ok(parsed) = parse_config(data) {
        let _ = parsed.config.command();
        for diff_id in &parsed.diff_ids {
            if let Ok(hex) = digest_hex(diff_id, "fuzz") {
                assert!(
                    hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
                    "{diff_id:?} gave the store path component {hex:?}"
                );
            }
        }
    }
    let Ok(manifest) = serde_json::from_slice::<OciManifest>(data) else {
        return;
    };
    match manifest {
        OciManifest::Image(m) => {
            let _ = digest_hex(&m.config.digest, "fuzz");
            for layer in &m.layers {
                let _ = digest_hex(&layer.digest, "fuzz");
            }
        }
        OciManifest::ImageIndex(index) => {
            let platforms = [
                Platform::host(),
                Platform::for_rust_arch("aarch64", true),
                Platform::for_rust_arch("arm", true),
                Platform::for_rust_arch("s390x", false),
            ];
            for platform in &platforms {
                match choose(&index.manifests, platform) {
                    Ok(entry) => {
                        let p = entry
                            .platform
                            .as_ref()
                            .expect("a chosen entry has a platform");
                        assert_eq!(p.os.to_string(), platform.os);
                        assert_eq!(p.architecture.to_string(), platform.architecture);
                    }
                    Err(available) => {
                        assert!(available.windows(2).all(|w| w[0] < w[1]), "{available:?}");
                    }
                }
            }
        }
    }
}
