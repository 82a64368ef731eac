//! Image references, Docker style, parsed by hand: `busybox` is
//! `docker.io/library/busybox:latest`.
//!
//! `oci-spec` parses them with one large regex whose compiled automaton
//! (about 7.5 MB of heap, 17 MB while it compiles) the agent would keep for
//! good after its first pull: more than half of an agent's heap with fifty
//! containers. This parser accepts the same grammar (distribution's
//! `reference/regexp.go`) and normalizes the same way (`normalize.go`), and
//! builds the [`Reference`] with its constructors.

use oci_client::Reference;

use super::ImageError;

const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_LEGACY: &str = "index.docker.io";
const NAME_TOTAL_LENGTH_MAX: usize = 255;

/// Parses `[domain/]path[:tag][@algorithm:hex]`.
pub fn parse(reference: &str) -> Result<Reference, ImageError> {
    let invalid = |reason: &str| ImageError::InvalidReference {
        reference: reference.to_string(),
        reason: reason.to_string(),
    };
    if reference.is_empty() {
        return Err(invalid("repository name must have at least one component"));
    }
    let (rest, digest) = match reference.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (reference, None),
    };
    // A tag follows the last ':' unless a '/' comes after it (then the ':'
    // was a registry's port).
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if !is_name(name) || !tag.is_none_or(is_tag) || !digest.is_none_or(is_digest) {
        return Err(invalid("invalid reference format"));
    }
    let (registry, repository) = split_domain(name);
    // The grammar takes `UPPER/x` as domain `UPPER` and path `x`, but
    // normalization puts `UPPER` back into the path (no `.`, `:` or
    // `localhost`): Docker then refuses the name, as registries would.
    if repository.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(invalid("repository name must be lowercase"));
    }
    if repository.len() > NAME_TOTAL_LENGTH_MAX {
        return Err(invalid(
            "repository name must not be more than 255 characters",
        ));
    }
    if let Some(digest) = digest {
        check_digest_length(digest).map_err(invalid)?;
    }
    Ok(match (tag, digest) {
        (Some(tag), Some(digest)) => {
            Reference::with_tag_and_digest(registry, repository, tag.into(), digest.into())
        }
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest.into()),
        (tag, None) => Reference::with_tag(registry, repository, tag.unwrap_or("latest").into()),
    })
}

/// `[domain '/'] path-component ('/' path-component)*`, where the first
/// component is a domain only if a path component follows it.
fn is_name(name: &str) -> bool {
    let mut components = name.split('/');
    let Some(first) = components.next() else {
        return false;
    };
    let rest: Vec<&str> = components.collect();
    if rest.is_empty() {
        return is_path_component(first);
    }
    (is_path_component(first) || is_domain(first)) && rest.iter().all(|c| is_path_component(c))
}

/// `domain-component ('.' domain-component)* (':' [0-9]+)?`.
fn is_domain(domain: &str) -> bool {
    let (host, port) = match domain.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (domain, None),
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    port_ok && host.split('.').all(is_domain_component)
}

/// `[a-zA-Z0-9]` or `[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]`.
fn is_domain_component(c: &str) -> bool {
    let b = c.as_bytes();
    match (b.first(), b.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && b.iter().all(|&x| x.is_ascii_alphanumeric() || x == b'-')
        }
        _ => false,
    }
}

/// `[a-z0-9]+ (separator [a-z0-9]+)*` with separator `[._]|__|-*`.
fn is_path_component(c: &str) -> bool {
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let b = c.as_bytes();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let separator = &b[start..i];
        let ok = matches!(separator, b"." | b"_" | b"__") || separator.iter().all(|&x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[\w][\w.-]{0,127}`, with `\w` ASCII as in distribution's Go regexp
/// (`oci-spec`'s Rust regex also takes other Unicode word characters, which
/// no registry accepts in a tag).
fn is_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut bytes = tag.bytes();
    tag.len() <= 128
        && bytes.next().is_some_and(word)
        && bytes.all(|b| word(b) || b == b'.' || b == b'-')
}

/// `[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}`.
fn is_digest(digest: &str) -> bool {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return false;
    };
    let algorithm_ok = algorithm.split(['-', '_', '+', '.']).all(|part| {
        let mut b = part.bytes();
        b.next().is_some_and(|x| x.is_ascii_alphabetic()) && b.all(|x| x.is_ascii_alphanumeric())
    });
    algorithm_ok && hex.len() >= 32 && hex.bytes().all(|x| x.is_ascii_hexdigit())
}

fn check_digest_length(digest: &str) -> Result<(), &'static str> {
    let (algorithm, hex) = digest.split_once(':').unwrap_or((digest, ""));
    let expected = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err("unsupported digest algorithm"),
    };
    if hex.len() == expected {
        Ok(())
    } else {
        Err("invalid checksum digest length")
    }
}

/// Docker's normalization: no domain means Docker Hub, and a single-component
/// path there is an official image under `library/`.
fn split_domain(name: &str) -> (String, String) {
    let (mut domain, mut remainder) = match name.split_once('/') {
        Some((left, right)) if left.contains(['.', ':']) || left == "localhost" => {
            (left.to_string(), right.to_string())
        }
        _ => (DOCKER_HUB.to_string(), name.to_string()),
    };
    if domain == DOCKER_HUB_LEGACY {
        domain = DOCKER_HUB.to_string();
    }
    if domain == DOCKER_HUB && !remainder.contains('/') {
        remainder = format!("library/{remainder}");
    }
    (domain, remainder)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:7cc4b5aefd1d0cadf8d97d4350462ba51c694ebca145b08d7d41b41acc8db5aa";

    /// The regex parser of `oci-spec` is the reference implementation,
    /// except that we take only ASCII tags and, like Docker, lowercase
    /// repositories only.
    fn agrees_with_oci_spec(input: &str) {
        let ours = parse(input).ok();
        let theirs = input.parse::<Reference>().ok().filter(|r| {
            r.tag().is_none_or(|t| t.is_ascii())
                && !r.repository().bytes().any(|b| b.is_ascii_uppercase())
        });
        assert_eq!(ours, theirs, "{input}");
    }

    #[test]
    fn parses_like_oci_spec() {
        let with_digest = |s: &str| format!("{s}@{DIGEST}");
        let mut inputs: Vec<String> = [
            "busybox",
            "busybox:1.36",
            "library/busybox",
            "docker.io/busybox",
            "index.docker.io/library/busybox:latest",
            "127.0.0.1:5000/skiff-test/web:v1",
            "localhost/web",
            "localhost:5000/web:v1",
            "test.com:tag",
            "test.com:5000",
            "test.com/repo:tag",
            "test:5000/repo",
            "test:5000/repo:tag",
            "sub-dom1.foo.com/bar/baz/quux",
            "sub-dom1.foo.com/bar/baz/quux:some-long-tag",
            "b.gcr.io/test.example.com/my-app:test.example.com",
            "xn--n3h.com/myimage:xn--n3h.com",
            "foo_bar.com:8080",
            "foo/foo_bar.com:8080",
            "a__b/c.d-e---f:T_a.g-1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let invalid = [
            "",
            ":justtag",
            "@sha256:ffff",
            "Uppercase:tag",
            "repo@sha256:ffff",
            "a___b",
            "a._b",
            "-a/b",
            "a-/b",
            "a/b-",
            "a//b",
            "/a",
            "a/",
            "a:",
            "a:.tag",
            "a@",
            "a@sha256:abc",
            "a@md5:7cc4b5aefd1d0cadf8d97d4350462ba51c694ebca145b08d7d41b41acc8db5aa",
            "a@sha256:7cc4b5aefd1d0cadf8d97d4350462ba51c694ebca145b08d7d41b41acc8db5a",
            "host:port/a",
            "-host.com/a",
            "host-.com/a",
            "host..com/a",
            "host.com:/a",
            "a b",
            "aa/asdf$$^/aa",
        ];
        inputs.extend(invalid.iter().map(|s| s.to_string()));
        inputs.push(format!("a:{}", "t".repeat(128)));
        inputs.push(format!("a:{}", "t".repeat(129)));
        inputs.push("a/".repeat(128) + "a");
        let digests: Vec<String> = inputs.iter().map(|s| with_digest(s)).collect();
        for input in inputs.iter().chain(&digests) {
            agrees_with_oci_spec(input);
        }
    }

    /// Random strings over the grammar's characters, from a fixed seed.
    #[test]
    fn parses_random_strings_like_oci_spec() {
        use rand::{Rng, SeedableRng};
        let pieces = [
            "a",
            "b",
            "Z",
            "0",
            "9",
            "-",
            "--",
            ".",
            "_",
            "__",
            ":",
            "/",
            "@",
            "sha256:",
            "localhost",
            "docker.io",
            "index.docker.io",
            ":5000",
            "é",
            " ",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let len = rng.gen_range(1..10);
            let mut input: String = (0..len)
                .map(|_| pieces[rng.gen_range(0..pieces.len())])
                .collect();
            if rng.gen_bool(0.2) {
                input = format!("{input}@{DIGEST}");
            }
            agrees_with_oci_spec(&input);
        }
    }

    #[test]
    fn normalizes_docker_hub_names() {
        let r = parse("busybox").unwrap();
        assert_eq!(r.whole(), "docker.io/library/busybox:latest");
        let r = parse("127.0.0.1:5000/skiff-test/web:v1").unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("127.0.0.1:5000", "skiff-test/web", Some("v1"))
        );
    }

    /// Found by fuzzing (issue #17): `UPPER/case` parsed as
    /// `docker.io/UPPER/case:latest`, a name whose own text fails to parse.
    #[test]
    fn an_uppercase_first_component_without_a_dot_is_refused_like_docker() {
        let err = parse("UPPER/case").unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid image reference UPPER/case: repository name must be lowercase"
        );
        let r = parse("Registry.Example.com/app:v1").unwrap();
        assert_eq!(r.whole(), "Registry.Example.com/app:v1");
        assert_eq!(parse(&r.whole()).unwrap(), r);
    }

    #[test]
    fn says_why_a_reference_is_invalid() {
        let err = parse("Web:v1").unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid image reference Web:v1: invalid reference format"
        );
        let err = parse("web@sha256:abcd").unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid image reference web@sha256:abcd: invalid reference format"
        );
    }
}
