//! The image store against a real `docker-registry` on 127.0.0.1 holding the
//! fixture images of `deploy/images/build.sh`: pulls by tag, digest, index
//! and Docker schema 2; blob dedupe and coalescing; digest-mismatch refusal;
//! overlay rootfs with whiteouts and opaque dirs; clean unmounts.
//!
//! One registry serves the whole file (started once, stopped by its PID when
//! this process exits, via `registry.sh --watch`). Each test uses its own
//! store. Where the tools are missing the tests fail, naming the packages to
//! install; mounted rootfs are unmounted by a drop guard, also on panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use skiff_agent::image::{is_mounted, ImageError, ImageStore, PullOptions, PullPolicy};

struct Fixture {
    addr: String,
    dir: PathBuf,
    images: HashMap<String, String>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn start_fixture() -> Option<Fixture> {
    let missing: Vec<_> = ["docker-registry", "skopeo", "busybox", "zstd", "sha256sum"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    if !missing.is_empty() {
        panic!(
            "registry tests need {}: apt-get install docker-registry skopeo busybox-static zstd",
            missing.join(", ")
        );
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let scripts = repo_root().join("deploy/images");
    let out = Command::new(scripts.join("registry.sh"))
        .args(["start", "--port", &port.to_string(), "--watch"])
        .arg(std::process::id().to_string())
        .output()
        .expect("run registry.sh");
    assert!(
        out.status.success(),
        "registry.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env = parse_env(&String::from_utf8_lossy(&out.stdout));
    let addr = env["REGISTRY_ADDR"].clone();
    let dir = PathBuf::from(&env["REGISTRY_DIR"]);
    let images_dir = dir.join("images");
    let started = Instant::now();
    let out = Command::new(scripts.join("build.sh"))
        .arg(&addr)
        .arg(&images_dir)
        .output()
        .expect("run build.sh");
    assert!(
        out.status.success(),
        "build.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "fixture images built and pushed to {addr} in {:?}",
        started.elapsed()
    );
    let images = parse_env(&std::fs::read_to_string(images_dir.join("images.env")).unwrap());
    Some(Fixture { addr, dir, images })
}

fn fixture() -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    FIXTURE.get_or_init(start_fixture).as_ref()
}

impl Fixture {
    fn reference(&self, name: &str) -> String {
        format!("{}/skiff-test/{name}", self.addr)
    }

    fn digest(&self, name: &str) -> &str {
        &self.images[&format!("skiff-test/{name}")]
    }

    fn store(&self, root: &Path) -> ImageStore {
        ImageStore::open(
            root,
            PullOptions {
                insecure_registries: vec![self.addr.clone()],
                docker_config: Some(root.join("no-docker-config.json")),
                registry_auth_scopes: Vec::new(),
            },
        )
        .unwrap()
    }
}

/// Unmounts a container's rootfs when dropped (idempotent), so a failing
/// test leaves no mount behind.
struct Unmount<'a>(&'a ImageStore, PathBuf);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = self.0.unmount_rootfs(&self.1);
    }
}

fn mounted_anywhere_under(dir: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = dir.to_str().unwrap();
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|mp| mp.starts_with(dir)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_by_tag_and_by_digest_agree() {
    let Some(f) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let store = f.store(&tmp.path().join("images"));
    let started = Instant::now();
    let by_tag = store.pull(&f.reference("web:v1")).await.unwrap();
    eprintln!("cold pull of web:v1 took {:?}", started.elapsed());
    assert_eq!(by_tag.manifest_digest, f.digest("web:v1"));
    assert_eq!(by_tag.layers.len(), 2);
    assert_eq!(by_tag.config.entrypoint, ["/usr/local/bin/serve"]);
    assert_eq!(by_tag.config.exposed_ports, ["80/tcp"]);
    assert_eq!(by_tag.config.labels["version"], "v1");
    let index = std::fs::read_to_string(by_tag.layers[1].join("www/index.html")).unwrap();
    assert!(index.contains("v1"));

    let by_digest_ref = format!("{}/skiff-test/web@{}", f.addr, f.digest("web:v1"));
    let by_digest = store.pull(&by_digest_ref).await.unwrap();
    assert_eq!(by_digest.manifest_digest, by_tag.manifest_digest);
    assert_eq!(by_digest.layers, by_tag.layers);
    assert_eq!(by_digest.reference, by_digest_ref);

    // Cached: no new downloads, and fast.
    let before = store.stats();
    let started = Instant::now();
    store.pull(&f.reference("web:v1")).await.unwrap();
    eprintln!("cached pull of web:v1 took {:?}", started.elapsed());
    // Always re-resolves the tag but finds every blob stored.
    store
        .pull_with_policy(&f.reference("web:v1"), PullPolicy::Always)
        .await
        .unwrap();
    assert_eq!(store.stats(), before);

    // A new store on the same root finds everything on disk.
    let reopened = f.store(&tmp.path().join("images"));
    let again = reopened.pull(&f.reference("web:v1")).await.unwrap();
    assert_eq!(again.layers, by_tag.layers);
    assert_eq!(reopened.stats().blobs_downloaded, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_base_layer_is_downloaded_once() {
    let Some(f) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let store = f.store(&tmp.path().join("images"));
    let v1 = store.pull(&f.reference("web:v1")).await.unwrap();
    let after_v1 = store.stats();
    // config + base + page layer
    assert_eq!(after_v1.blobs_downloaded, 3);
    assert_eq!(after_v1.layers_unpacked, 2);
    let v2 = store.pull(&f.reference("web:v2")).await.unwrap();
    let after_v2 = store.stats();
    // Only v2's config and page layer are new.
    assert_eq!(after_v2.blobs_downloaded - after_v1.blobs_downloaded, 2);
    assert_eq!(after_v2.layers_unpacked - after_v1.layers_unpacked, 1);
    assert_eq!(v1.layers[0], v2.layers[0]);
    assert_ne!(v1.layers[1], v2.layers[1]);
    let blobs = std::fs::read_dir(tmp.path().join("images/blobs/sha256"))
        .unwrap()
        .count();
    // 2 manifests + 2 configs + 3 distinct layers
    assert_eq!(blobs, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_one_image_download_it_once() {
    let Some(f) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let store = f.store(&tmp.path().join("images"));
    let pulls = (0..5).map(|i| {
        let store = store.clone();
        // Two spellings of the same image, and a second image sharing its base.
        let reference = match i {
            0 => format!(
                "{}/skiff-test/unhealthy@{}",
                f.addr,
                f.digest("unhealthy:v1")
            ),
            4 => f.reference("web-user:v1"),
            _ => f.reference("unhealthy:v1"),
        };
        tokio::spawn(async move { store.pull(&reference).await })
    });
    let results = futures::future::join_all(pulls).await;
    for r in results {
        r.unwrap().unwrap();
    }
    let stats = store.stats();
    // unhealthy: config + base + page; web-user: config + page (base shared).
    assert_eq!(stats.blobs_downloaded, 5, "{stats:?}");
    assert_eq!(stats.layers_unpacked, 3, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_blob_is_refused_and_not_stored() {
    let Some(f) = fixture() else { return };
    let layer = &f.images["tamper-layer"];
    let hex = layer.strip_prefix("sha256:").unwrap();
    let data = f
        .dir
        .join("data/docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let store = f.store(&tmp.path().join("images"));
    let reference = f.reference("tamper:v1");
    let err = store.pull(&reference).await.unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err:?}");
    assert!(
        msg.contains(&format!("digest mismatch for blob {layer}")),
        "{msg}"
    );
    assert!(msg.contains(&reference), "{msg}");
    assert!(!err.is_retryable());
    assert!(!store.blob_path(layer).unwrap().exists());
    assert_eq!(
        std::fs::read_dir(tmp.path().join("images/tmp"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_images_and_unreachable_registries_say_so() {
    let Some(f) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let store = f.store(&tmp.path().join("images"));
    let reference = f.reference("web:nope");
    let err = store.pull(&reference).await.unwrap_err();
    assert!(matches!(err, ImageError::NotFound { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "skiff-test/web:nope not found in {}: check the repository and tag",
            f.addr
        )
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let store = ImageStore::open(
        &tmp.path().join("other"),
        PullOptions {
            insecure_registries: vec![addr.clone()],
            docker_config: None,
            registry_auth_scopes: Vec::new(),
        },
    )
    .unwrap();
    let err = store
        .pull(&format!("{addr}/skiff-test/web:v1"))
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Unreachable { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with(&format!("registry {addr} unreachable: ")),
        "{err}"
    );
    assert!(err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rootfs_shows_whiteouts_and_opaque_dirs_and_unmounts_cleanly() {
    let Some(f) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let store = f.store(&tmp.path().join("images"));
    let image = store.pull(&f.reference("layers:v1")).await.unwrap();
    assert_eq!(image.layers.len(), 4);
    assert_eq!(image.config.stop_signal.as_deref(), Some("SIGINT"));
    assert_eq!(image.config.command(), ["/bin/sh", "-c", "sleep 3600"]);

    let container = tmp.path().join("containers/c1");
    let _unmount = Unmount(&store, container.clone());
    let rootfs = store.mount_rootfs(&image, &container).unwrap();
    assert_eq!(rootfs, container.join("rootfs"));
    assert!(is_mounted(&rootfs));
    // Idempotent: a second call keeps the one mount.
    store.mount_rootfs(&image, &container).unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(rootfs.to_str().unwrap()))
        .count();
    assert_eq!(mounts, 1);

    let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).ok();
    assert_eq!(read("data/a"), None, "whiteout hides a");
    assert_eq!(read("data/b").as_deref(), Some("b\n"));
    assert_eq!(read("data/b-hardlink").as_deref(), Some("b\n"));
    assert_eq!(read("opq/x"), None, "opaque dir hides the lower x");
    assert_eq!(read("opq/y"), None, "opaque dir hides the lower y");
    assert_eq!(read("opq/z").as_deref(), Some("z\n"));
    assert_eq!(read("keep/k").as_deref(), Some("k\n"));
    assert_eq!(read("etc/layers-version").as_deref(), Some("4\n"));
    assert_eq!(
        std::fs::read_link(rootfs.join("abs-link")).unwrap(),
        PathBuf::from("/etc/passwd")
    );
    assert_eq!(
        std::fs::read_link(rootfs.join("bin/sh")).unwrap(),
        PathBuf::from("/bin/busybox")
    );
    // Writes land in the container's upper dir, not in the shared layers.
    std::fs::write(rootfs.join("keep/new"), "mine").unwrap();
    assert!(container.join("upper/keep/new").exists());
    assert!(!image.layers.iter().any(|l| l.join("keep/new").exists()));

    store.unmount_rootfs(&container).unwrap();
    assert!(!mounted_anywhere_under(&container));
    assert!(!container.join("upper").exists());
    assert!(!container.join("work").exists());
    // Unmounting again is fine.
    store.unmount_rootfs(&container).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_five_layers_mount_even_under_a_long_store_path() {
    let Some(f) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("x".repeat(100)).join("y".repeat(100));
    let store = f.store(&root);
    let image = store.pull(&f.reference("many:v1")).await.unwrap();
    assert_eq!(image.layers.len(), 25);
    let container = tmp.path().join("c");
    let _unmount = Unmount(&store, container.clone());
    let rootfs = store.mount_rootfs(&image, &container).unwrap();
    for i in 1..=24 {
        assert!(rootfs.join(format!("many/{i}")).exists(), "layer {i}");
    }
    store.unmount_rootfs(&container).unwrap();
    assert!(!mounted_anywhere_under(tmp.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_resolve_to_linux_amd64_and_docker_manifests_pull() {
    let Some(f) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let store = f.store(&tmp.path().join("images"));
    let multi = store.pull(&f.reference("multiarch:v1")).await.unwrap();
    assert_eq!(multi.manifest_digest, f.digest("web:v1"));
    let docker = store.pull(&f.reference("web-docker:v1")).await.unwrap();
    assert_eq!(docker.manifest_digest, f.digest("web-docker:v1"));
    assert_eq!(docker.config.entrypoint, ["/usr/local/bin/serve"]);
    assert_eq!(docker.layers, multi.layers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_users_and_healthchecks_come_from_the_image() {
    let Some(f) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let store = f.store(&tmp.path().join("images"));
    let web_user = store.pull(&f.reference("web-user:v1")).await.unwrap();
    assert_eq!(web_user.config.user, "www");
    let user = web_user.lookup_user(&web_user.config.user).unwrap();
    assert_eq!(
        (user.uid, user.gid, user.additional_gids),
        (1000, 1000, vec![50])
    );
    assert_eq!(web_user.lookup_user("").unwrap().uid, 0);
    assert!(web_user.lookup_user("postgres").is_err());

    let unhealthy = store.pull(&f.reference("unhealthy:v1")).await.unwrap();
    let check = unhealthy.config.healthcheck.unwrap();
    assert_eq!(check.test, ["CMD", "/bin/false"]);
    assert_eq!(check.retries, Some(2));
    assert_eq!(check.interval, Some(std::time::Duration::from_secs(1)));
}

fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_removes_unused_images_but_never_what_a_container_uses() {
    let Some(f) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("images");
    let store = f.store(&root);
    let v1 = store.pull(&f.reference("web:v1")).await.unwrap();
    let v2 = store.pull(&f.reference("web:v2")).await.unwrap();
    let layered = store.pull(&f.reference("layers:v1")).await.unwrap();
    let full = store.disk_usage();

    // web:v2 runs in a container nobody told the prune about: its mount
    // alone keeps its layers.
    let container = tmp.path().join("containers/c1");
    let _unmount = Unmount(&store, container.clone());
    let rootfs = store.mount_rootfs(&v2, &container).unwrap();
    let keep = f.reference("web:v1");
    let report = store.prune(move || vec![keep]).await.unwrap();
    assert_eq!(report.images, 2, "web:v2 and layers:v1 forgotten");
    assert!(report.layers >= 1 && report.blobs >= 4, "{report:?}");
    assert!(store.disk_usage() < full);
    assert!(v1.layers.iter().chain(&v2.layers).all(|l| l.is_dir()));
    assert!(layered.layers[1..].iter().all(|l| !l.exists()));
    assert!(std::fs::read_to_string(rootfs.join("www/index.html"))
        .unwrap()
        .contains("v2"));
    // web:v1 is still whole: served from the store without a download.
    let before = store.stats();
    store.pull(&f.reference("web:v1")).await.unwrap();
    assert_eq!(store.stats(), before);

    // Nothing in use any more: everything goes; a pull fetches it again.
    store.unmount_rootfs(&container).unwrap();
    store.prune(Vec::new).await.unwrap();
    for dir in ["refs", "blobs/sha256", "layers", "l"] {
        assert_eq!(count(&root.join(dir)), 0, "{dir} emptied");
    }
    let again = store.pull(&f.reference("web:v1")).await.unwrap();
    assert!(again.layers.iter().all(|l| l.is_dir()));
    assert!(store.stats().blobs_downloaded > before.blobs_downloaded);
}

/// Pushes `web:v1`'s manifest again as `web:sizes-TAG` with its last layer's
/// declared size replaced: the registry stores such a manifest as it is.
fn push_with_last_layer_size(f: &Fixture, tag: &str, size: i64) -> String {
    let accept = "application/vnd.oci.image.manifest.v1+json";
    let base = format!("http://{}/v2/skiff-test", f.addr);
    let out = Command::new("curl")
        .args(["-sf", "-H", &format!("Accept: {accept}")])
        .arg(format!("{base}/web/manifests/v1"))
        .output()
        .expect("run curl");
    assert!(out.status.success(), "GET manifest failed");
    let mut manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let layers = manifest["layers"].as_array_mut().unwrap();
    let last = layers.last_mut().unwrap();
    last["size"] = size.into();
    let body = serde_json::to_vec(&manifest).unwrap();
    let media_type = manifest["mediaType"].as_str().unwrap_or(accept).to_string();
    let mut put = Command::new("curl")
        .args(["-sf", "-X", "PUT", "-H"])
        .arg(format!("Content-Type: {media_type}"))
        .args(["--data-binary", "@-"])
        .arg(format!("{base}/web/manifests/sizes-{tag}"))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run curl");
    use std::io::Write;
    put.stdin.take().unwrap().write_all(&body).unwrap();
    assert!(put.wait().unwrap().success(), "PUT manifest failed");
    f.reference(&format!("web:sizes-{tag}"))
}

/// A manifest comes from the same registry as its blobs, so the size it
/// declares is not trusted either: over the per-blob limit or negative is
/// refused before any download, and a blob longer than declared (0 bytes
/// declared used to mean "no limit") is cut off at the declared size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_sizes_from_the_manifest_are_capped_and_enforced() {
    let Some(f) = fixture() else { return };
    let cases: [(&str, i64, &str); 3] = [
        ("huge", 1 << 40, "over Skiff's limit of 32 GiB per blob"),
        ("negative", -1, "a negative size (-1)"),
        ("zero", 0, "is larger than the 0 bytes its manifest gives"),
    ];
    for (tag, size, expected) in cases {
        let reference = push_with_last_layer_size(f, tag, size);
        let tmp = tempfile::tempdir().unwrap();
        let store = f.store(&tmp.path().join("images"));
        let err = store.pull(&reference).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(expected), "{tag}: {msg}");
        assert!(msg.contains(&reference), "{tag}: {msg}");
        assert_eq!(
            std::fs::read_dir(tmp.path().join("images/tmp"))
                .unwrap()
                .count(),
            0,
            "{tag}: a partial download was left behind"
        );
    }
}

/// A second `docker-registry` that wants a user and password (htpasswd,
/// bcrypt made by Python's `crypt`), killed by PID on drop.
struct AuthRegistry {
    child: std::process::Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl AuthRegistry {
    const USER: &'static str = "node";
    const PASSWORD: &'static str = "s3cret";

    fn start() -> AuthRegistry {
        let dir = tempfile::tempdir().unwrap();
        let hash = Command::new("python3")
            .args([
                "-W",
                "ignore",
                "-c",
                "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
                Self::PASSWORD,
            ])
            .output()
            .expect("run python3");
        assert!(hash.status.success(), "python3 crypt failed");
        let hash = String::from_utf8(hash.stdout).unwrap();
        std::fs::write(
            dir.path().join("htpasswd"),
            format!("{}:{}", Self::USER, hash.trim()),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root}/data\n\
             http:\n  addr: {addr}\nauth:\n  htpasswd:\n    realm: skiff-test\n    path: {root}/htpasswd\n",
            root = dir.path().display()
        );
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let registry = AuthRegistry {
            child,
            addr,
            _dir: dir,
        };
        let started = Instant::now();
        while std::net::TcpStream::connect(&registry.addr).is_err() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "the registry did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        registry
    }

    /// Copies `from` (on the fixture registry) to `to` here, with the password.
    fn copy(&self, f: &Fixture, from: &str, to: &str) {
        let out = Command::new("skopeo")
            .args([
                "copy",
                "--src-tls-verify=false",
                "--dest-tls-verify=false",
                "--dest-creds",
                &format!("{}:{}", Self::USER, Self::PASSWORD),
            ])
            .arg(format!("docker://{}", f.reference(from)))
            .arg(format!("docker://{}/{to}", self.addr))
            .output()
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for AuthRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The confused deputy: the node's credentials for a registry must not pull
/// every image any client names there, only those under the node's
/// `--registry-auth-scope`; out of scope the pull is anonymous and the
/// refusal says how to widen the scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_credentials_pull_only_images_in_the_nodes_auth_scope() {
    let Some(f) = fixture() else { return };
    let registry = AuthRegistry::start();
    registry.copy(f, "web:v1", "acme/web:v1");
    registry.copy(f, "web:v1", "victim/private:v1");
    let tmp = tempfile::tempdir().unwrap();
    let docker_config = tmp.path().join("config.json");
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        AuthRegistry::USER,
        AuthRegistry::PASSWORD
    ));
    std::fs::write(
        &docker_config,
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#,
            registry.addr
        ),
    )
    .unwrap();
    let store = ImageStore::open(
        &tmp.path().join("images"),
        PullOptions {
            insecure_registries: vec![registry.addr.clone()],
            docker_config: Some(docker_config),
            registry_auth_scopes: vec![format!("{}/acme/", registry.addr)],
        },
    )
    .unwrap();
    let inside = format!("{}/acme/web:v1", registry.addr);
    store
        .pull(&inside)
        .await
        .expect("an image in scope pulls with the node's credentials");
    let outside = format!("{}/victim/private:v1", registry.addr);
    let err = store.pull(&outside).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err:?}");
    assert!(
        msg.contains(&format!("--registry-auth-scope {}/victim/", registry.addr)),
        "{msg}"
    );
}
