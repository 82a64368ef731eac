//! The default seccomp profile of every container: the same filter Docker
//! applies to a container holding Docker's default capabilities (which is
//! what [`super::spec::DEFAULT_CAPABILITIES`] grants). Everything not listed
//! fails with EPERM; `clone` may not create namespaces; `clone3` fails with
//! ENOSYS so that libc falls back to `clone`, whose flags the filter can
//! read; `personality` takes only the values Docker allows.
//!
//! What Docker allows only with capabilities Skiff does not grant stays
//! out: CAP_SYS_ADMIN (mount, umount2, unshare, setns, bpf, ...),
//! CAP_SYS_MODULE, CAP_SYS_BOOT, CAP_SYS_TIME, CAP_SYS_NICE, CAP_SYS_RAWIO,
//! CAP_SYS_PACCT, CAP_SYS_TTY_CONFIG, CAP_SYSLOG, CAP_DAC_READ_SEARCH. So do
//! io_uring and the keyring, which Docker blocks for everyone.
//!
//! Every name here is known to libseccomp 2.5.4 (Debian 12's, which knows
//! syscalls up to `futex_requeue`, 456). runc skips a name its libseccomp
//! cannot resolve, and answers ENOSYS (not EPERM) for syscalls newer than
//! the newest one the profile names, so libc's fallbacks keep working.

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder,
    LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};
use oci_spec::OciSpecError;

/// Syscalls every container may make, whatever its arguments.
pub const ALLOWED: &[&str] = &[
    // Files and directories.
    "access",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "close",
    "close_range",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "flock",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futimesat",
    "getcwd",
    "getdents",
    "getdents64",
    "lchown",
    "lchown32",
    "link",
    "linkat",
    "_llseek",
    "lseek",
    "lstat",
    "lstat64",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "name_to_handle_at",
    "newfstatat",
    "open",
    "openat",
    "openat2",
    "pread64",
    "preadv",
    "preadv2",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "rename",
    "renameat",
    "renameat2",
    "rmdir",
    "sendfile",
    "sendfile64",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "tee",
    "truncate",
    "truncate64",
    "umask",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vmsplice",
    "write",
    "writev",
    // Extended attributes.
    "fgetxattr",
    "flistxattr",
    "fremovexattr",
    "fsetxattr",
    "getxattr",
    "lgetxattr",
    "listxattr",
    "llistxattr",
    "lremovexattr",
    "lsetxattr",
    "removexattr",
    "setxattr",
    // Waiting for file descriptors and file events.
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "fanotify_mark",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "_newselect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "pselect6",
    "pselect6_time64",
    "select",
    "signalfd",
    "signalfd4",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    // Asynchronous I/O (not io_uring) and I/O priorities.
    "io_cancel",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "io_setup",
    "io_submit",
    "ioprio_get",
    "ioprio_set",
    // Memory.
    "brk",
    "cachestat",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mremap",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "remap_file_pages",
    // Processes and threads (clone and personality: see the argument rules).
    "capget",
    "capset",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "fork",
    "futex",
    "futex_requeue",
    "futex_time64",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "get_robust_list",
    "get_thread_area",
    "getcpu",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getrlimit",
    "getrusage",
    "getsid",
    "gettid",
    "ioctl",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "pidfd_open",
    "pidfd_send_signal",
    "prctl",
    "prlimit64",
    "process_mrelease",
    "restart_syscall",
    "rseq",
    "seccomp",
    "set_robust_list",
    "set_thread_area",
    "set_tid_address",
    "setpgid",
    "setpriority",
    "setrlimit",
    "setsid",
    "sysinfo",
    "times",
    "ugetrlimit",
    "uname",
    "vfork",
    "wait4",
    "waitid",
    "waitpid",
    // Scheduling.
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    // Signals.
    "alarm",
    "kill",
    "pause",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sigaltstack",
    "sigprocmask",
    "sigreturn",
    "tgkill",
    "tkill",
    // User and group ids (the kernel checks CAP_SETUID/CAP_SETGID).
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getuid",
    "getuid32",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setuid",
    "setuid32",
    // Clocks and timers (setting the clock needs CAP_SYS_TIME, which the
    // kernel checks in adjtimex and clock_adjtime).
    "adjtimex",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "getitimer",
    "gettimeofday",
    "nanosleep",
    "setitimer",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    // Sockets (socket itself: see the argument rules).
    "accept",
    "accept4",
    "bind",
    "connect",
    "getpeername",
    "getsockname",
    "getsockopt",
    "listen",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "send",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setsockopt",
    "shutdown",
    "socketcall",
    "socketpair",
    // Pipes and System V / POSIX IPC (in the container's IPC namespace).
    "ipc",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "pipe",
    "pipe2",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    // Tracing a process of the same container (strace, gdb), as Docker
    // allows on kernels 4.8 and later, where a traced process can no longer
    // slip out of its seccomp filter; crossing containers is still stopped
    // by the PID namespace and by the kernel's ptrace access checks.
    "kcmp",
    "pidfd_getfd",
    "process_madvise",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
];

/// Syscalls Docker allows because the container holds one of its default
/// capabilities: CAP_SYS_CHROOT.
pub const FOR_DEFAULT_CAPABILITIES: &[&str] = &["chroot"];

/// Syscalls that exist on some architectures only, allowed there.
fn allowed_on(arch: &str) -> &'static [&'static str] {
    match arch {
        "x86_64" | "x86" => &["arch_prctl", "modify_ldt"],
        "aarch64" | "arm" => &[
            "arm_fadvise64_64",
            "arm_sync_file_range",
            "breakpoint",
            "cacheflush",
            "set_tls",
            "sync_file_range2",
        ],
        _ => &[],
    }
}

/// The ABIs a process of this node may call the kernel with: a 64-bit node
/// also runs 32-bit binaries, which must meet the same filter.
fn architectures(arch: &str) -> Vec<Arch> {
    match arch {
        "x86_64" => vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32],
        "x86" => vec![Arch::ScmpArchX86],
        "aarch64" => vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm],
        "arm" => vec![Arch::ScmpArchArm],
        // Elsewhere the runtime filters the native ABI only.
        _ => Vec::new(),
    }
}

/// `personality(2)` values Docker allows: PER_LINUX, PER_LINUX32,
/// UNAME26, UNAME26|PER_LINUX32, and 0xffffffff (query only).
pub const PERSONALITY_ALLOWED: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// The `clone` flags that create namespaces, which need CAP_SYS_ADMIN.
pub const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

/// `socket(2)` families refused: AF_VSOCK reaches the host's hypervisor
/// sockets, outside every namespace.
const AF_VSOCK: u64 = libc::AF_VSOCK as u64;

const EPERM: u32 = libc::EPERM as u32;
const ENOSYS: u32 = libc::ENOSYS as u32;

/// The default profile for this node's architecture.
pub fn default_profile() -> Result<LinuxSeccomp, OciSpecError> {
    profile_for(std::env::consts::ARCH)
}

/// The default profile for a node of `arch` (as `std::env::consts::ARCH`).
pub fn profile_for(arch: &str) -> Result<LinuxSeccomp, OciSpecError> {
    let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let allow = |list: &[&str]| {
        LinuxSyscallBuilder::default()
            .names(names(list))
            .action(LinuxSeccompAction::ScmpActAllow)
            .build()
    };
    let mut syscalls: Vec<LinuxSyscall> = vec![allow(ALLOWED)?, allow(FOR_DEFAULT_CAPABILITIES)?];
    if !allowed_on(arch).is_empty() {
        syscalls.push(allow(allowed_on(arch))?);
    }
    // One rule per value: the rules of one syscall are alternatives, the
    // arguments of one rule must all match.
    for value in PERSONALITY_ALLOWED {
        syscalls.push(
            LinuxSyscallBuilder::default()
                .names(names(&["personality"]))
                .action(LinuxSeccompAction::ScmpActAllow)
                .args(vec![LinuxSeccompArgBuilder::default()
                    .index(0usize)
                    .value(value)
                    .op(LinuxSeccompOperator::ScmpCmpEq)
                    .build()?])
                .build()?,
        );
    }
    // (flags & CLONE_NAMESPACE_FLAGS) == 0. On s390 the flags are the
    // second argument; Skiff does not run there.
    syscalls.push(
        LinuxSyscallBuilder::default()
            .names(names(&["clone"]))
            .action(LinuxSeccompAction::ScmpActAllow)
            .args(vec![LinuxSeccompArgBuilder::default()
                .index(0usize)
                .value(CLONE_NAMESPACE_FLAGS)
                .value_two(0u64)
                .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
                .build()?])
            .build()?,
    );
    // clone3 passes its flags in memory, out of the filter's reach.
    syscalls.push(
        LinuxSyscallBuilder::default()
            .names(names(&["clone3"]))
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(ENOSYS)
            .build()?,
    );
    syscalls.push(
        LinuxSyscallBuilder::default()
            .names(names(&["socket"]))
            .action(LinuxSeccompAction::ScmpActAllow)
            .args(vec![LinuxSeccompArgBuilder::default()
                .index(0usize)
                .value(AF_VSOCK)
                .op(LinuxSeccompOperator::ScmpCmpNe)
                .build()?])
            .build()?,
    );
    let mut profile = LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(EPERM)
        .syscalls(syscalls);
    let arches = architectures(arch);
    if !arches.is_empty() {
        profile = profile.architectures(arches);
    }
    profile.build()
}

/// Every syscall name a profile lets through, with or without conditions.
pub fn allowed_names(profile: &LinuxSeccomp) -> Vec<&str> {
    profile
        .syscalls()
        .iter()
        .flatten()
        .filter(|s| s.action() == LinuxSeccompAction::ScmpActAllow)
        .flat_map(|s| s.names().iter().map(String::as_str))
        .collect()
}

/// The filter a replica's spec asks for: Docker's default profile when it
/// names none, no filter for `"unconfined"`, else the OCI `linux.seccomp`
/// object it carries (validated by `skiff_spec` before it got here).
pub fn for_replica(asked: Option<&str>) -> Result<Option<LinuxSeccomp>, String> {
    match asked {
        None => default_profile()
            .map(Some)
            .map_err(|e| format!("invalid seccomp profile: {e}")),
        Some(skiff_spec::SECCOMP_UNCONFINED) => Ok(None),
        Some(json) => serde_json::from_str(json)
            .map(Some)
            .map_err(|e| format!("invalid seccomp profile of the service: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules<'a>(profile: &'a LinuxSeccomp, name: &str) -> Vec<&'a LinuxSyscall> {
        profile
            .syscalls()
            .iter()
            .flatten()
            .filter(|s| s.names().iter().any(|n| n == name))
            .collect()
    }

    #[test]
    fn everything_not_listed_fails_with_eperm() {
        let profile = profile_for("x86_64").unwrap();
        assert_eq!(profile.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(profile.default_errno_ret(), Some(1));
        assert_eq!(
            profile.architectures().as_deref(),
            Some(&[Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32][..])
        );
        assert_eq!(
            profile_for("aarch64").unwrap().architectures().as_deref(),
            Some(&[Arch::ScmpArchAarch64, Arch::ScmpArchArm][..])
        );
    }

    #[test]
    fn a_service_may_ask_for_no_filter_or_its_own() {
        assert!(for_replica(None).unwrap().is_some());
        assert!(for_replica(Some("unconfined")).unwrap().is_none());
        let own = r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mount"],"action":"SCMP_ACT_ERRNO"}]}"#;
        let profile = for_replica(Some(own)).unwrap().unwrap();
        assert_eq!(profile.default_action(), LinuxSeccompAction::ScmpActAllow);
        assert!(for_replica(Some("{")).is_err());
    }

    #[test]
    fn no_syscall_is_listed_twice() {
        for arch in ["x86_64", "aarch64", "riscv64"] {
            let mut names = ALLOWED.to_vec();
            names.extend(FOR_DEFAULT_CAPABILITIES);
            names.extend(allowed_on(arch));
            names.extend(["personality", "clone", "clone3", "socket"]);
            let mut sorted = names.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), names.len(), "{arch}: a name appears twice");
        }
    }

    #[test]
    fn syscalls_that_need_capabilities_skiff_does_not_grant_are_refused() {
        let profile = profile_for("x86_64").unwrap();
        let allowed = allowed_names(&profile);
        for name in [
            "mount",
            "umount2",
            "unshare",
            "setns",
            "bpf",
            "kexec_load",
            "init_module",
            "finit_module",
            "delete_module",
            "reboot",
            "settimeofday",
            "clock_settime",
            "swapon",
            "pivot_root",
            "open_by_handle_at",
            "perf_event_open",
            "keyctl",
            "add_key",
            "io_uring_setup",
            "userfaultfd",
            "sethostname",
            "syslog",
            "acct",
        ] {
            assert!(!allowed.contains(&name), "{name} is allowed");
        }
        assert!(allowed.contains(&"chroot"), "CAP_SYS_CHROOT is granted");
        assert!(allowed.contains(&"arch_prctl") && allowed.contains(&"read"));
        assert!(!allowed.contains(&"cacheflush"), "arm only");
    }

    #[test]
    fn clone_may_not_create_namespaces_and_clone3_says_enosys() {
        let profile = profile_for("x86_64").unwrap();
        let clone = rules(&profile, "clone");
        assert_eq!(clone.len(), 1);
        let args = clone[0].args().as_ref().unwrap();
        assert_eq!(args.len(), 1);
        assert_eq!(args[0].index(), 0);
        assert_eq!(args[0].op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
        assert_eq!(args[0].value(), 0x7e02_0000, "NEWNS|NEWCGROUP..NEWNET");
        assert_eq!(args[0].value_two(), Some(0));
        let clone3 = rules(&profile, "clone3");
        assert_eq!(clone3.len(), 1);
        assert_eq!(clone3[0].action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(clone3[0].errno_ret(), Some(38));
    }

    #[test]
    fn personality_takes_only_dockers_values() {
        let profile = profile_for("x86_64").unwrap();
        let mut values: Vec<u64> = rules(&profile, "personality")
            .iter()
            .map(|r| {
                let args = r.args().as_ref().unwrap();
                assert_eq!(args.len(), 1);
                assert_eq!(args[0].op(), LinuxSeccompOperator::ScmpCmpEq);
                args[0].value()
            })
            .collect();
        values.sort_unstable();
        assert_eq!(values, PERSONALITY_ALLOWED);
    }

    #[test]
    fn the_profile_serializes_as_runc_reads_it() {
        let json = serde_json::to_value(profile_for("x86_64").unwrap()).unwrap();
        assert_eq!(json["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(json["defaultErrnoRet"], 1);
        assert_eq!(json["architectures"][0], "SCMP_ARCH_X86_64");
        let clone = json["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["names"][0] == "clone")
            .unwrap();
        assert_eq!(clone["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
        assert_eq!(clone["args"][0]["valueTwo"], 0);
    }
}
