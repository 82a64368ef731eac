//! The agent's allocator settings. Most of an idle agent's heap is glibc's
//! per-thread malloc arenas: every thread that ever allocated (tokio
//! workers, blocking threads that ran starts) keeps an arena, and freed
//! memory stays in them. The only unsafe code of the agent, two libc calls.
#![allow(unsafe_code)]

/// Caps glibc's malloc arenas at two: threads share them instead of each
/// keeping its own (the effect of `MALLOC_ARENA_MAX=2`). The agent's
/// threads mostly wait on I/O, so contention on the arenas costs nothing
/// measurable. Call before the agent spawns its threads.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a tuning parameter of glibc's allocator;
    // it is thread-safe and has no memory-safety preconditions.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Returns freed heap memory to the OS; glibc otherwise keeps it after a
/// burst of allocations (say, fifty replicas starting at once).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own arenas;
    // it is thread-safe and has no memory-safety preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
