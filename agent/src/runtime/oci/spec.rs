//! The OCI runtime spec of a container: the image config (Entrypoint and
//! Cmd combined as Docker does, env, user, working dir) merged with the
//! service's overrides, and the defaults a security reviewer expects
//! (Docker's default capabilities, its default seccomp profile,
//! no_new_privileges, a cgroup namespace, masked and read-only /proc paths,
//! a pids limit, memory and CPU limits when given).

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder,
    LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder,
    LinuxResourcesBuilder, LinuxSeccomp, Mount, MountBuilder, ProcessBuilder, RootBuilder, Spec,
    SpecBuilder, UserBuilder,
};

use super::images::ImageDefaults;
use crate::image::ImageUser;
use crate::spec::{interpolate_port, ReplicaSpec};

/// Where the init binary appears in the container.
pub const INIT_PATH: &str = "/sbin/skiff-init";
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
pub const PIDS_LIMIT: i64 = 4096;
const CPU_PERIOD_US: u64 = 100_000;

/// Docker's default capability set (moby: oci/caps/defaults.go).
pub const DEFAULT_CAPABILITIES: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Docker's masked paths.
pub const MASKED_PATHS: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

pub const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Names of programs that already are an init: no second one in front.
const INITS: [&str; 7] = [
    "tini",
    "tini-static",
    "dumb-init",
    "catatonit",
    "docker-init",
    "s6-svscan",
    "init",
];

/// The process arguments as Docker computes them: the image's Entrypoint
/// (or the service's, which also drops the image's Cmd), then the service's
/// command if given, else the image's Cmd. `$PORT` in the service's command
/// and entrypoint becomes `port`.
pub fn process_args(
    replica: &ReplicaSpec,
    image: &ImageDefaults,
    port: u16,
) -> Result<Vec<String>, String> {
    let interpolate = |args: &[String]| -> Vec<String> {
        args.iter().map(|a| interpolate_port(a, port)).collect()
    };
    let (entrypoint, image_cmd) = match &replica.entrypoint {
        Some(entrypoint) => (interpolate(entrypoint), Vec::new()),
        None => (image.entrypoint.clone(), image.cmd.clone()),
    };
    let cmd: Vec<String> = if replica.command.is_empty() {
        image_cmd
    } else {
        interpolate(&replica.command)
    };
    let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if args.is_empty() {
        return Err(format!(
            "image {} has neither Entrypoint nor Cmd; give the command after `--`",
            image.reference
        ));
    }
    Ok(args)
}

/// Whether to run `args` under the init: as asked, else unless the
/// entrypoint already is one.
pub fn wants_init(replica: &ReplicaSpec, args: &[String]) -> bool {
    replica.init.unwrap_or_else(|| {
        let program = args.first().map(String::as_str).unwrap_or_default();
        let name = program.rsplit('/').next().unwrap_or(program);
        !INITS.contains(&name)
    })
}

/// The environment: the image's, then the service's (overriding by key),
/// then `PORT` and Skiff's own variables; `PATH` and `HOME` filled in when
/// the image gives none.
pub fn environment(
    replica: &ReplicaSpec,
    image: &ImageDefaults,
    port: u16,
    home: &str,
    hostname: &str,
) -> Vec<String> {
    let mut vars: Vec<(String, String)> = Vec::new();
    let mut set = |key: &str, value: String| match vars.iter_mut().find(|(k, _)| k == key) {
        Some(entry) => entry.1 = value,
        None => vars.push((key.to_string(), value)),
    };
    for entry in &image.env {
        let (k, v) = entry.split_once('=').unwrap_or((entry, ""));
        set(k, v.to_string());
    }
    for (k, v) in replica.environment_for(port) {
        set(&k, v);
    }
    set("HOSTNAME", hostname.to_string());
    if !vars.iter().any(|(k, _)| k == "PATH") {
        vars.insert(0, ("PATH".into(), DEFAULT_PATH.into()));
    }
    if !vars.iter().any(|(k, _)| k == "HOME") {
        vars.push(("HOME".into(), home.to_string()));
    }
    vars.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Everything [`build`] needs besides the replica and its image.
#[derive(Debug, Clone)]
pub struct ContainerSetup {
    pub rootfs: PathBuf,
    pub hostname: String,
    /// `None`: the host's network namespace.
    pub netns: Option<PathBuf>,
    /// The init binary on the host, bind-mounted at [`INIT_PATH`].
    pub init: Option<PathBuf>,
    pub resolv_conf: PathBuf,
    pub hosts: PathBuf,
    /// e.g. `/skiff/<alloc-id>`.
    pub cgroups_path: PathBuf,
    /// The port the process listens on (`PORT`).
    pub port: u16,
    /// The seccomp filter, normally [`super::seccomp::default_profile`];
    /// `None` runs the container unconfined (Docker's
    /// `--security-opt seccomp=unconfined`).
    pub seccomp: Option<LinuxSeccomp>,
    /// Volumes and bind mounts, after the standard mounts.
    pub binds: Vec<crate::volumes::Bind>,
}

pub fn build(
    replica: &ReplicaSpec,
    image: &ImageDefaults,
    user: &ImageUser,
    setup: &ContainerSetup,
) -> Result<Spec, String> {
    let e = |err: oci_spec::OciSpecError| format!("invalid runtime spec: {err}");
    let mut args = process_args(replica, image, setup.port)?;
    if setup.init.is_some() && wants_init(replica, &args) {
        args.splice(0..0, [INIT_PATH.to_string(), "--".to_string()]);
    }
    let cwd = [replica.workdir.as_str(), image.working_dir.as_str()]
        .into_iter()
        .find(|w| !w.is_empty())
        .unwrap_or("/");
    let caps: oci_spec::runtime::Capabilities = DEFAULT_CAPABILITIES.into_iter().collect();
    // Like Docker: a non-root process keeps the bounding set but starts with
    // no effective or permitted capabilities.
    let running_caps = if user.uid == 0 {
        caps.clone()
    } else {
        Default::default()
    };
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps)
        .effective(running_caps.clone())
        .permitted(running_caps)
        .inheritable(oci_spec::runtime::Capabilities::default())
        .ambient(oci_spec::runtime::Capabilities::default())
        .build()
        .map_err(e)?;
    let mut user_builder = UserBuilder::default().uid(user.uid).gid(user.gid);
    if !user.additional_gids.is_empty() {
        user_builder = user_builder.additional_gids(user.additional_gids.clone());
    }
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(user_builder.build().map_err(e)?)
        .args(args)
        .env(environment(
            replica,
            image,
            setup.port,
            &user.home,
            &setup.hostname,
        ))
        .cwd(cwd)
        .capabilities(capabilities)
        .no_new_privileges(true)
        .build()
        .map_err(e)?;

    let mut namespaces = Vec::new();
    for typ in [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
        // As Docker on cgroup v2 (`--cgroupns=private`): the container sees
        // its own cgroup as `/` in /proc/self/cgroup and /sys/fs/cgroup.
        LinuxNamespaceType::Cgroup,
    ] {
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(typ)
                .build()
                .map_err(e)?,
        );
    }
    if let Some(netns) = &setup.netns {
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Network)
                .path(netns.clone())
                .build()
                .map_err(e)?,
        );
    }

    let mut resources = LinuxResourcesBuilder::default()
        .devices(vec![LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()
            .map_err(e)?])
        .pids(
            LinuxPidsBuilder::default()
                .limit(PIDS_LIMIT)
                .build()
                .map_err(e)?,
        );
    if replica.memory_mb > 0 {
        let bytes = i64::from(replica.memory_mb) * 1024 * 1024;
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(bytes)
                .build()
                .map_err(e)?,
        );
    }
    if replica.cpu_millis > 0 {
        let quota = i64::from(replica.cpu_millis) * (CPU_PERIOD_US as i64) / 1000;
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(quota)
                .period(CPU_PERIOD_US)
                .build()
                .map_err(e)?,
        );
    }

    let mut linux = LinuxBuilder::default();
    if setup.netns.is_some() {
        // As Docker does: in its own network namespace a non-root process
        // may bind any port (nginx as its user on 80).
        linux = linux.sysctl(std::collections::HashMap::from([(
            "net.ipv4.ip_unprivileged_port_start".to_string(),
            "0".to_string(),
        )]));
    }
    if let Some(seccomp) = &setup.seccomp {
        linux = linux.seccomp(seccomp.clone());
    }
    let linux = linux
        .namespaces(namespaces)
        .resources(resources.build().map_err(e)?)
        .cgroups_path(setup.cgroups_path.clone())
        .masked_paths(
            MASKED_PATHS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .readonly_paths(
            READONLY_PATHS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .build()
        .map_err(e)?;

    SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path(setup.rootfs.clone())
                .readonly(false)
                .build()
                .map_err(e)?,
        )
        .hostname(setup.hostname.clone())
        .mounts(mounts(setup)?)
        .process(process)
        .linux(linux)
        .build()
        .map_err(e)
}

fn mount(dest: &str, typ: &str, source: &Path, options: &[&str]) -> Result<Mount, String> {
    MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(|err| format!("invalid mount {dest}: {err}"))
}

fn mounts(setup: &ContainerSetup) -> Result<Vec<Mount>, String> {
    let p = Path::new;
    let mut mounts = vec![
        mount("/proc", "proc", p("proc"), &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            p("tmpfs"),
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            p("devpts"),
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            p("shm"),
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            p("mqueue"),
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            p("sysfs"),
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            p("cgroup"),
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        )?,
        mount(
            "/etc/resolv.conf",
            "bind",
            &setup.resolv_conf,
            &["rbind", "rprivate", "nosuid", "nodev", "noexec"],
        )?,
        mount(
            "/etc/hosts",
            "bind",
            &setup.hosts,
            &["rbind", "rprivate", "nosuid", "nodev", "noexec"],
        )?,
    ];
    if let Some(init) = &setup.init {
        mounts.push(mount(
            INIT_PATH,
            "bind",
            init,
            &["bind", "ro", "nosuid", "nodev"],
        )?);
    }
    for bind in &setup.binds {
        let mut options = vec!["rbind", "rprivate"];
        if bind.read_only {
            options.push("ro");
        }
        mounts.push(mount(&bind.target, "bind", &bind.source, &options)?);
    }
    Ok(mounts)
}

/// `/etc/resolv.conf` for a container: the host's, without loopback
/// nameservers (unreachable from a bridge), falling back to public ones.
pub fn resolv_conf(host: &str, bridge: bool) -> String {
    let mut out = String::new();
    let mut servers = 0;
    for line in host.lines() {
        let loopback = line
            .strip_prefix("nameserver")
            .map(str::trim)
            .is_some_and(|ip| ip.starts_with("127.") || ip == "::1");
        if loopback && bridge {
            continue;
        }
        if line.starts_with("nameserver") {
            servers += 1;
        }
        out.push_str(line);
        out.push('\n');
    }
    if servers == 0 {
        out.push_str("nameserver 8.8.8.8\nnameserver 1.1.1.1\n");
    }
    out
}

pub fn hosts_file(hostname: &str, ip: Option<std::net::Ipv4Addr>) -> String {
    let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    match ip {
        Some(ip) => out.push_str(&format!("{ip}\t{hostname}\n")),
        None => out.push_str(&format!("127.0.1.1\t{hostname}\n")),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::oci::seccomp;
    use crate::spec::{test_spec, RuntimeKind};
    use oci_spec::runtime::{LinuxSeccompAction, LinuxSeccompOperator};

    fn image() -> ImageDefaults {
        ImageDefaults {
            reference: "demo/pg:v1".into(),
            entrypoint: vec!["docker-entrypoint.sh".into()],
            cmd: vec!["postgres".into()],
            env: vec![
                "PATH=/usr/lib/postgresql/bin:/usr/bin".into(),
                "PGDATA=/var/lib/pg".into(),
            ],
            working_dir: "/srv".into(),
            ..Default::default()
        }
    }

    fn replica(command: &[&str]) -> ReplicaSpec {
        let mut r = test_spec("3f2a9c0d-11", command, 20001);
        r.runtime = RuntimeKind::Oci;
        r.image = "demo/pg:v1".into();
        r
    }

    fn setup() -> ContainerSetup {
        ContainerSetup {
            rootfs: "/data/c/rootfs".into(),
            hostname: "web-3f2a9c0d".into(),
            netns: Some("/run/netns/skiff-x".into()),
            init: Some("/usr/bin/tini-static".into()),
            resolv_conf: "/data/c/resolv.conf".into(),
            hosts: "/data/c/hosts".into(),
            cgroups_path: "/skiff/3f2a9c0d-11".into(),
            port: 80,
            seccomp: Some(seccomp::default_profile().unwrap()),
            binds: vec![],
        }
    }

    #[test]
    fn volumes_are_bind_mounted_after_the_standard_mounts_read_only_when_asked() {
        let mut s = setup();
        s.binds = vec![crate::volumes::Bind {
            source: "/data/volumes/db-0/_data".into(),
            target: "/var/lib/db".into(),
            read_only: true,
        }];
        let oci = build(&replica(&["true"]), &image(), &root(), &s).unwrap();
        let last = oci.mounts().as_ref().unwrap().last().unwrap().clone();
        assert_eq!(last.destination(), Path::new("/var/lib/db"));
        assert_eq!(
            last.source().as_deref(),
            Some(Path::new("/data/volumes/db-0/_data"))
        );
        let options = last.options().clone().unwrap();
        assert!(options.contains(&"ro".to_string()) && options.contains(&"rbind".to_string()));
    }

    fn root() -> ImageUser {
        ImageUser {
            uid: 0,
            gid: 0,
            additional_gids: vec![],
            home: "/root".into(),
        }
    }

    #[test]
    fn entrypoint_and_cmd_combine_as_docker_does() {
        assert_eq!(
            process_args(&replica(&[]), &image(), 80).unwrap(),
            ["docker-entrypoint.sh", "postgres"]
        );
        assert_eq!(
            process_args(&replica(&["postgres", "-p", "$PORT"]), &image(), 5432).unwrap(),
            ["docker-entrypoint.sh", "postgres", "-p", "5432"],
            "the service's command replaces Cmd only"
        );
        let mut own = replica(&[]);
        own.entrypoint = Some(vec!["/bin/sh".into(), "-c".into(), "echo $PORT".into()]);
        assert_eq!(
            process_args(&own, &image(), 80).unwrap(),
            ["/bin/sh", "-c", "echo 80"],
            "a service's entrypoint drops the image's Cmd too"
        );
        own.command = vec!["exec sleep 1".into()];
        own.entrypoint = Some(vec!["/bin/sh".into(), "-c".into()]);
        assert_eq!(
            process_args(&own, &image(), 80).unwrap(),
            ["/bin/sh", "-c", "exec sleep 1"]
        );
        let bare = ImageDefaults {
            reference: "x".into(),
            ..Default::default()
        };
        assert!(process_args(&replica(&[]), &bare, 80)
            .unwrap_err()
            .contains("neither Entrypoint nor Cmd"));
    }

    #[test]
    fn init_is_prefixed_unless_the_entrypoint_is_one_or_it_is_off() {
        let spec = build(&replica(&[]), &image(), &root(), &setup()).unwrap();
        let args = spec.process().as_ref().unwrap().args().clone().unwrap();
        assert_eq!(args[..3], [INIT_PATH, "--", "docker-entrypoint.sh"]);
        let mut tini = image();
        tini.entrypoint = vec!["/usr/bin/tini".into(), "--".into()];
        assert!(!wants_init(
            &replica(&[]),
            &process_args(&replica(&[]), &tini, 80).unwrap()
        ));
        let mut off = replica(&[]);
        off.init = Some(false);
        assert!(!wants_init(&off, &["sh".into()]));
        let mut no_init = setup();
        no_init.init = None;
        let spec = build(&replica(&[]), &image(), &root(), &no_init).unwrap();
        assert_eq!(
            spec.process().as_ref().unwrap().args().as_ref().unwrap()[0],
            "docker-entrypoint.sh"
        );
        assert!(!spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.destination() == Path::new(INIT_PATH)));
    }

    #[test]
    fn env_merges_image_then_service_then_port() {
        let mut r = replica(&[]);
        r.env.insert("PGDATA".into(), "/data".into());
        r.env.insert("URL".into(), "http://x:$PORT".into());
        let env = environment(&r, &image(), 80, "/root", "h");
        assert!(env.contains(&"PATH=/usr/lib/postgresql/bin:/usr/bin".to_string()));
        assert!(env.contains(&"PGDATA=/data".to_string()));
        assert!(env.contains(&"URL=http://x:80".to_string()));
        assert!(env.contains(&"PORT=80".to_string()));
        assert!(env.contains(&"HOME=/root".to_string()));
        assert_eq!(env.iter().filter(|v| v.starts_with("PGDATA=")).count(), 1);
        let bare = environment(&r, &ImageDefaults::default(), 80, "/", "h");
        assert_eq!(bare[0], format!("PATH={DEFAULT_PATH}"));
    }

    #[test]
    fn defaults_harden_the_container() {
        let spec = build(&replica(&[]), &image(), &root(), &setup()).unwrap();
        let process = spec.process().as_ref().unwrap();
        assert_eq!(process.no_new_privileges(), Some(true));
        assert_eq!(process.cwd(), Path::new("/srv"));
        let caps = process.capabilities().as_ref().unwrap();
        let bounding = caps.bounding().as_ref().unwrap();
        assert_eq!(bounding.len(), 14);
        assert!(
            bounding.contains(&Capability::Setuid)
                && bounding.contains(&Capability::NetBindService)
        );
        assert!(!bounding.contains(&Capability::SysAdmin));
        let linux = spec.linux().as_ref().unwrap();
        assert!(linux
            .masked_paths()
            .as_ref()
            .unwrap()
            .contains(&"/proc/kcore".to_string()));
        assert!(linux
            .readonly_paths()
            .as_ref()
            .unwrap()
            .contains(&"/proc/sys".to_string()));
        let res = linux.resources().as_ref().unwrap();
        assert_eq!(res.pids().as_ref().unwrap().limit(), PIDS_LIMIT);
        assert!(res.memory().is_none() && res.cpu().is_none());
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/skiff/3f2a9c0d-11"))
        );
        let netns = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .find(|n| n.typ() == LinuxNamespaceType::Network)
            .unwrap();
        assert_eq!(
            netns.path().as_deref(),
            Some(Path::new("/run/netns/skiff-x"))
        );
        let dests: Vec<_> = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.destination().clone())
            .collect();
        assert!(
            dests.contains(&PathBuf::from("/etc/resolv.conf"))
                && dests.contains(&PathBuf::from("/etc/hosts"))
        );
    }

    #[test]
    fn every_container_gets_dockers_seccomp_profile_and_a_cgroup_namespace() {
        let spec = build(&replica(&[]), &image(), &root(), &setup()).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        let profile = linux.seccomp().as_ref().expect("a seccomp profile");
        assert_eq!(profile.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(profile.default_errno_ret(), Some(1), "EPERM");
        let allowed = seccomp::allowed_names(profile);
        for refused in ["mount", "umount2", "unshare", "setns", "bpf"] {
            assert!(!allowed.contains(&refused), "{refused} is allowed");
        }
        assert!(allowed.contains(&"chroot"));
        let clone = profile
            .syscalls()
            .iter()
            .flatten()
            .find(|s| s.names() == &["clone"])
            .expect("a clone rule");
        let mask = &clone.args().as_ref().unwrap()[0];
        assert_eq!(mask.op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
        assert_eq!(
            (mask.value(), mask.value_two()),
            (seccomp::CLONE_NAMESPACE_FLAGS, Some(0))
        );
        assert!(linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .any(|n| n.typ() == LinuxNamespaceType::Cgroup && n.path().is_none()));

        let mut unconfined = setup();
        unconfined.seccomp = None;
        let spec = build(&replica(&[]), &image(), &root(), &unconfined).unwrap();
        assert!(spec.linux().as_ref().unwrap().seccomp().is_none());
    }

    #[test]
    fn limits_are_set_when_given_and_host_mode_has_no_netns() {
        let mut r = replica(&[]);
        r.memory_mb = 64;
        r.cpu_millis = 250;
        let mut s = setup();
        s.netns = None;
        let spec = build(&r, &image(), &root(), &s).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        let res = linux.resources().as_ref().unwrap();
        assert_eq!(
            res.memory().as_ref().unwrap().limit(),
            Some(64 * 1024 * 1024)
        );
        let cpu = res.cpu().as_ref().unwrap();
        assert_eq!((cpu.quota(), cpu.period()), (Some(25_000), Some(100_000)));
        assert!(!linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .any(|n| n.typ() == LinuxNamespaceType::Network));
    }

    #[test]
    fn non_root_users_start_without_capabilities() {
        let user = ImageUser {
            uid: 101,
            gid: 101,
            additional_gids: vec![5],
            home: "/var/cache/nginx".into(),
        };
        let spec = build(&replica(&[]), &image(), &user, &setup()).unwrap();
        let process = spec.process().as_ref().unwrap();
        assert_eq!((process.user().uid(), process.user().gid()), (101, 101));
        assert_eq!(process.user().additional_gids().as_deref(), Some(&[5][..]));
        let caps = process.capabilities().as_ref().unwrap();
        assert!(caps.effective().as_ref().unwrap().is_empty());
        assert_eq!(caps.bounding().as_ref().unwrap().len(), 14);
    }

    #[test]
    fn resolv_conf_drops_loopback_servers_in_bridge_mode() {
        let host = "search lan\nnameserver 127.0.0.53\nnameserver 10.0.0.1\n";
        assert_eq!(resolv_conf(host, true), "search lan\nnameserver 10.0.0.1\n");
        assert!(resolv_conf(host, false).contains("127.0.0.53"));
        assert!(resolv_conf("nameserver 127.0.0.1\n", true).contains("8.8.8.8"));
    }
}
