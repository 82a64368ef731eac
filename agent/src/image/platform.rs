//! The node's own OCI platform and the choice of an image index's entry for
//! it: Rust's `std::env::consts::ARCH` in the OCI's (Go's) words, with the
//! CPU variant where the OCI image spec lists one (arm64 v8, arm v7).

use oci_client::manifest::ImageIndexEntry;

/// An OCI platform: `linux/arm64/v8`, `linux/amd64`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

impl Platform {
    /// The platform of the machine this agent runs on.
    pub fn host() -> Platform {
        let little_endian = cfg!(target_endian = "little");
        Platform::for_rust_arch(std::env::consts::ARCH, little_endian)
    }

    /// `linux` with the OCI architecture (and variant) of a Rust target
    /// architecture. A 32-bit `arm` build cannot tell v6 from v7 at compile
    /// time; v7 is what nearly every arm board runs, and a v7 node also runs
    /// v6 and v5 images (see [`choose`]). An architecture the OCI does not
    /// name is kept as Rust spells it, so the error lists what the index has.
    pub fn for_rust_arch(arch: &str, little_endian: bool) -> Platform {
        let (architecture, variant) = match arch {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "powerpc64" if little_endian => ("ppc64le", None),
            "powerpc64" => ("ppc64", None),
            "s390x" => ("s390x", None),
            "riscv64" => ("riscv64", None),
            "loongarch64" => ("loong64", None),
            "mips64" if little_endian => ("mips64le", None),
            "mips64" => ("mips64", None),
            "mips" if little_endian => ("mipsle", None),
            other => (other, None),
        };
        Platform {
            os: "linux".to_string(),
            architecture: architecture.to_string(),
            variant: variant.map(str::to_string),
        }
    }

    /// How well an index entry's platform fits this one: `None` if it cannot
    /// run here, else a rank where higher is better (an exact variant beats
    /// an entry without one, which beats an older compatible variant).
    fn fit(&self, os: &str, architecture: &str, variant: Option<&str>) -> Option<u32> {
        if os != self.os || architecture != self.architecture {
            return None;
        }
        let wanted = self.variant.as_deref();
        match (wanted, variant) {
            (Some(w), Some(v)) if w == v => Some(100),
            (_, None) => Some(50),
            (None, Some(_)) => Some(10),
            // arm64's only variant is v8; armhf runs older arm variants.
            (Some(w), Some(v)) => {
                let level = |s: &str| s.strip_prefix('v').and_then(|n| n.parse::<u32>().ok());
                match (level(w), level(v)) {
                    (Some(w), Some(v)) if self.architecture == "arm" && v < w => Some(v),
                    _ => None,
                }
            }
        }
    }
}

/// The entry of an image index this platform runs best; `Err` lists the
/// platforms the index has (as `os/arch[/variant]`, sorted) for the error.
pub fn choose<'a>(
    entries: &'a [ImageIndexEntry],
    platform: &Platform,
) -> Result<&'a ImageIndexEntry, Vec<String>> {
    let best = entries
        .iter()
        .filter_map(|entry| {
            let p = entry.platform.as_ref()?;
            let rank = platform.fit(
                &p.os.to_string(),
                &p.architecture.to_string(),
                p.variant.as_deref().filter(|v| !v.is_empty()),
            )?;
            Some((rank, entry))
        })
        // The first of equally good entries, as Docker and containerd do.
        .fold(
            None::<(u32, &ImageIndexEntry)>,
            |best, (rank, entry)| match best {
                Some((r, _)) if r >= rank => best,
                _ => Some((rank, entry)),
            },
        );
    match best {
        Some((_, entry)) => Ok(entry),
        None => {
            let mut available: Vec<String> = entries
                .iter()
                .filter_map(|e| e.platform.as_ref())
                .map(|p| {
                    let mut s = format!("{}/{}", p.os, p.architecture);
                    if let Some(v) = p.variant.as_deref().filter(|v| !v.is_empty()) {
                        s.push('/');
                        s.push_str(v);
                    }
                    s
                })
                .collect();
            available.sort();
            available.dedup();
            Err(available)
        }
    }
}

/// `oci-client`'s platform resolver for this node (used when it resolves an
/// index itself).
pub(crate) fn host_resolver(entries: &[ImageIndexEntry]) -> Option<String> {
    choose(entries, &Platform::host())
        .ok()
        .map(|e| e.digest.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(platforms: &[&str]) -> Vec<ImageIndexEntry> {
        let manifests: Vec<serde_json::Value> = platforms
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut parts = p.split('/');
                let mut platform = serde_json::json!({
                    "os": parts.next().unwrap(),
                    "architecture": parts.next().unwrap(),
                });
                if let Some(v) = parts.next() {
                    platform["variant"] = v.into();
                }
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": format!("sha256:{i:064}"),
                    "size": 1,
                    "platform": platform,
                })
            })
            .collect();
        serde_json::from_value(serde_json::Value::Array(manifests)).unwrap()
    }

    fn chosen(platforms: &[&str], arch: &str) -> Result<String, Vec<String>> {
        let entries = index(platforms);
        let platform = Platform::for_rust_arch(arch, true);
        choose(&entries, &platform).map(|e| {
            let i: usize = e.digest.trim_start_matches("sha256:").parse().unwrap();
            platforms[i].to_string()
        })
    }

    #[test]
    fn rust_architectures_map_to_oci_names_and_variants() {
        let cases = [
            ("x86_64", true, "linux/amd64"),
            ("aarch64", true, "linux/arm64/v8"),
            ("arm", true, "linux/arm/v7"),
            ("x86", true, "linux/386"),
            ("powerpc64", true, "linux/ppc64le"),
            ("powerpc64", false, "linux/ppc64"),
            ("s390x", false, "linux/s390x"),
            ("riscv64", true, "linux/riscv64"),
            ("loongarch64", true, "linux/loong64"),
        ];
        for (arch, little, want) in cases {
            assert_eq!(Platform::for_rust_arch(arch, little).to_string(), want);
        }
    }

    #[test]
    fn the_host_platform_is_this_build_s_architecture() {
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        if cfg!(target_arch = "x86_64") {
            assert_eq!(host.to_string(), "linux/amd64");
        }
        if cfg!(target_arch = "aarch64") {
            assert_eq!(host.to_string(), "linux/arm64/v8");
        }
    }

    #[test]
    fn an_amd64_node_takes_the_amd64_entry_wherever_it_is_listed() {
        let platforms = [
            "linux/arm64/v8",
            "linux/arm/v7",
            "linux/amd64",
            "linux/s390x",
        ];
        assert_eq!(chosen(&platforms, "x86_64").unwrap(), "linux/amd64");
    }

    #[test]
    fn an_arm64_node_takes_arm64_with_or_without_the_v8_variant() {
        assert_eq!(
            chosen(&["linux/amd64", "linux/arm64/v8"], "aarch64").unwrap(),
            "linux/arm64/v8"
        );
        assert_eq!(
            chosen(&["linux/amd64", "linux/arm64"], "aarch64").unwrap(),
            "linux/arm64"
        );
        // The exact variant wins over an entry without one.
        assert_eq!(
            chosen(&["linux/arm64", "linux/arm64/v8"], "aarch64").unwrap(),
            "linux/arm64/v8"
        );
    }

    #[test]
    fn an_arm_v7_node_prefers_v7_and_falls_back_to_older_arm_variants() {
        assert_eq!(
            chosen(&["linux/arm/v6", "linux/arm/v7", "linux/arm64/v8"], "arm").unwrap(),
            "linux/arm/v7"
        );
        assert_eq!(
            chosen(&["linux/arm/v5", "linux/arm/v6"], "arm").unwrap(),
            "linux/arm/v6"
        );
        // Never a newer variant, and never arm64 for a 32-bit node.
        assert_eq!(
            chosen(&["linux/arm/v8", "linux/arm64/v8"], "arm").unwrap_err(),
            vec!["linux/arm/v8", "linux/arm64/v8"]
        );
    }

    #[test]
    fn no_matching_entry_lists_the_platforms_the_index_has() {
        let err = chosen(
            &[
                "windows/amd64",
                "linux/arm64/v8",
                "linux/arm/v7",
                "linux/arm64/v8",
            ],
            "x86_64",
        )
        .unwrap_err();
        assert_eq!(err, vec!["linux/arm/v7", "linux/arm64/v8", "windows/amd64"]);
    }

    #[test]
    fn an_entry_for_another_os_is_never_chosen() {
        assert!(chosen(&["windows/amd64", "darwin/amd64"], "x86_64").is_err());
    }

    #[test]
    fn the_no_platform_error_names_the_node_s_platform_and_the_index_s() {
        let err = crate::image::ImageError::NoPlatform {
            reference: "127.0.0.1:5000/skiff-test/multiarch:v1".into(),
            platform: Platform::for_rust_arch("aarch64", true).to_string(),
            available: vec!["linux/amd64".into(), "linux/s390x".into()],
        };
        assert_eq!(
            err.to_string(),
            "failed to pull 127.0.0.1:5000/skiff-test/multiarch:v1: no linux/arm64/v8 image \
             in its index (it has linux/amd64, linux/s390x)"
        );
    }
}
